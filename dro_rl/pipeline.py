"""Retrieve -> select -> generate, and the side-by-side comparison a run ends with."""

from __future__ import annotations

from typing import Sequence

from .evaluation import baseline_picks, score_picks, select_greedy
from .generator import GeneratorPrompt
from .retrieval import BM25Retriever, DenseRetriever, rank_candidates
from .selector import IdGrammar, SelectorPrompt, passage_text


def make_retriever(kind: str, model_name_or_path: str):
    """``dense`` (sentence-transformers) or ``bm25``."""
    if kind == "dense":
        return DenseRetriever(model_name_or_path)
    if kind == "bm25":
        return BM25Retriever()
    raise ValueError(f"unknown retriever {kind!r}: use 'dense' or 'bm25'")


def retrieval_order(rows: Sequence[dict], retriever) -> list[dict]:
    """Rows with candidates sorted by the first-stage retriever (the order the selector sees as [1]..[N])."""
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


def compare(
    rows: Sequence[dict], selector, tokenizer, grammar: IdGrammar, selector_prompt: SelectorPrompt, generator,
    generator_tokenizer, generator_prompt: GeneratorPrompt, seed: int = 0,
) -> dict[str, dict]:
    """Support recall@K and answer EM/F1 for random, retrieval-order, selector and oracle picks, greedily decoded."""
    k = selector_prompt.k
    picks = {
        "random": baseline_picks(rows, k, "random", seed),
        "retrieval": baseline_picks(rows, k, "retrieval"),
        "selector": select_greedy(selector, tokenizer, grammar, selector_prompt, rows, progress=True),
        "oracle": baseline_picks(rows, k, "oracle"),
    }
    return {
        name: {"picks": p, **score_picks(rows, p, generator, generator_tokenizer, generator_prompt)}
        for name, p in picks.items()
    }
