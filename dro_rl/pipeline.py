"""Retrieve -> select -> generate, and the side-by-side comparison a run ends with."""

from __future__ import annotations

import os
from typing import Sequence

from .data import DataError, LoadStats, load
from .evaluation import baseline_picks, score_picks, select_greedy
from .generator import GeneratorPrompt
from .models import GENERATOR, SELECTOR, as_role
from .retrieval import (
    BM25Retriever,
    DenseRetriever,
    load_corpus,
    rank_candidates,
    retrieve_candidates,
)
from .selector import IdGrammar, SelectorPrompt, passage_text


def make_retriever(kind: str, model_name_or_path: str, progress: bool | None = None):
    """``dense`` (sentence-transformers), ``bm25``, or None for ``none`` (keep the data file's order).

    ``progress``: progress bars while encoding and searching (default: when stderr is a terminal).
    """
    if kind == "dense":
        return DenseRetriever(model_name_or_path, progress=progress)
    if kind == "bm25":
        return BM25Retriever(progress=progress)
    if kind == "none":
        return None
    raise ValueError(f"unknown retriever {kind!r}: use 'dense', 'bm25' or 'none'")


def retrieval_order(rows: Sequence[dict], retriever) -> list[dict]:
    """Rows with candidates sorted by the first-stage retriever (the order the selector sees as [1]..[N]).

    With no retriever (``retriever: none``) the rows keep the order their file gives. A row without candidates is
    an error: it has nothing to rank (retrieve its candidates from a corpus first).
    """
    empty = [i for i, r in enumerate(rows) if not r["passages"]]
    if empty:
        raise DataError(f"{len(empty)} of {len(rows)} rows have no candidate passages (the first: question "
                        f"{empty[0] + 1}, id {rows[empty[0]].get('id')!r}): give a corpus to retrieve them from")
    if retriever is None:
        return [dict(row) for row in rows]
    rankings = rank_candidates(
        retriever, [r["question"] for r in rows], [[passage_text(p) for p in r["passages"]] for r in rows]
    )
    out = []
    for row, order in zip(rows, rankings):
        gold = row.get("gold") or []
        out.append(
            {**row, "passages": [row["passages"][i] for i in order], "gold": [gold[i] for i in order] if gold else []}
        )
    return out


def describe_order(retriever, retriever_name: str = "") -> str:
    """The candidate order that gets scored, in words, for the log."""
    if retriever is None:
        return "in the file's own order (retriever: none)"
    settings = getattr(retriever, "settings", None)
    if settings:
        name = settings["retriever"] + (f" ({settings['model']})" if "model" in settings else "")
    else:
        name = retriever_name or type(retriever).__name__
    return f"in the order of the first-stage retriever {name} (retriever: none keeps the file's order)"


def parse_spec(spec: str) -> tuple[str, str, str]:
    """(format, path, name) of a ``[format:]path`` dataset argument; the name (the file's stem) labels its results."""
    fmt, path = spec.split(":", 1) if ":" in spec and not os.path.exists(spec) else ("canonical", spec)
    return fmt, path, os.path.splitext(os.path.basename(path))[0]


def load_ranked(
    spec: str, retriever, corpus: str | None = None, top_n: int = 20, cache_dir: str | None = None,
    on_error: str = "raise", limit: int | None = None, retriever_name: str = "",
) -> tuple[str, list[dict], LoadStats]:
    """(name, rows in retrieval order, what the loader kept and skipped) for ``[format:]path``.

    Rows with their own candidates are re-ranked by ``retriever`` (or kept in the file's order with None); rows
    without candidates retrieve their top-N from ``corpus`` — in one file, each row the way it needs. The log says
    which order was scored.
    """
    fmt, path, name = parse_spec(spec)
    rows, stats = load(path, fmt, on_error, limit=limit)
    own = [r for r in rows if r["passages"]]
    bare = [r for r in rows if not r["passages"]]
    if bare and not corpus and on_error == "skip":  # nothing to read them from: skipped and counted as malformed
        stats.skipped += [f"{path}: id {r['id']!r}: no candidate passages and no corpus to retrieve them from"
                          for r in bare]
        stats.kept -= len(bare)
        rows, bare = own, []
    print(stats.summary(), flush=True)
    if bare:
        if not corpus:
            raise DataError(f"{path}: {len(bare)} of {len(rows)} rows have no candidate passages (the first: id "
                            f"{bare[0]['id']!r}): give a corpus to retrieve them from")
        if retriever is None:
            raise ValueError(f"{path} has {len(bare)} rows without candidate passages and retriever is 'none': "
                             "choose 'dense' or 'bm25' to search the corpus")
        cache = os.path.join(cache_dir, f"{name}.retrieval-cache.json") if cache_dir else None  # beside outputs
        print(f"{name}: retrieving the top-{top_n} passages of {corpus} for {len(bare)} rows without candidates",
              flush=True)
        found = iter(retrieve_candidates(bare, load_corpus(corpus), retriever, top_n, cache))
    if own:
        print(f"{name}: {len(own)} rows' own candidates scored {describe_order(retriever, retriever_name)}",
              flush=True)
        ranked = iter(retrieval_order(own, retriever))
    return name, [next(ranked) if r["passages"] else next(found) for r in rows], stats


def compare(
    rows: Sequence[dict], selector, tokenizer, grammar: IdGrammar, selector_prompt: SelectorPrompt, generator,
    generator_tokenizer, generator_prompt: GeneratorPrompt, seed: int = 0, max_new_tokens: int = 32,
    batch_size: int = 32, progress: bool = True,
) -> dict[str, dict]:
    """Support recall@K and answer EM/F1 for random, retrieval-order, selector and oracle picks, greedily decoded
    ``batch_size`` questions at a time. The oracle is scored on the rows with gold passage labels only (its ``n``),
    and left out when no row has any: without labels its "gold first" pick is the retrieval order."""
    k = selector_prompt.k
    with as_role(selector, SELECTOR):  # a shared base plays each role with its own adapter
        selected = select_greedy(selector, tokenizer, grammar, selector_prompt, rows, batch_size, progress)
    labelled = [r for r in rows if any(r.get("gold") or [])]
    picks = {
        "random": (rows, baseline_picks(rows, k, "random", seed)),
        "retrieval": (rows, baseline_picks(rows, k, "retrieval")),
        "selector": (rows, selected),
        **({"oracle": (labelled, baseline_picks(labelled, k, "oracle"))} if labelled else {}),
    }
    with as_role(generator, GENERATOR):
        return {
            name: {"picks": p, **score_picks(scored, p, generator, generator_tokenizer, generator_prompt,
                                             max_new_tokens, batch_size, progress)}
            for name, (scored, p) in picks.items()
        }
