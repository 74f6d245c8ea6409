import json
import sys
from pathlib import Path

import pytest
from test_data import HOTPOT_COLUMNS, SHARED, needs_shared

from dro_rl import retrieval
from dro_rl.data import load, load_hf
from dro_rl.evaluation import answer_recall, exact_match, f1_score
from dro_rl.retrieval import (
    BM25Retriever,
    DenseRetriever,
    load_corpus,
    rank_candidates,
    retrieve_candidates,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def dense():
    return DenseRetriever()


CORPUS = [
    {"id": "a", "title": "Paris", "text": "Paris is the capital of France."},
    {"id": "b", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"id": "c", "title": "Pasta", "text": "Pasta is made from durum wheat."},
    {"id": "d", "title": "Rome", "text": "Rome is the capital of Italy."},
]


def test_dense_and_bm25_rank_the_matching_passage_first(dense):
    questions = ["What is the capital of Germany?", "what is pasta made from"]
    for retriever in (dense, BM25Retriever()):
        ranks = rank_candidates(retriever, questions, [[p["text"] for p in CORPUS]] * 2)
        assert ranks[0][0] == 1 and ranks[1][0] == 2


def test_faiss_index_agrees_with_exact_search(dense):
    questions = ["capital of Italy", "wheat products", "French capital city"]
    exact = retrieval.search_corpus(dense, questions, CORPUS, top_n=3)
    faiss = retrieval.search_corpus(dense, questions, CORPUS, top_n=3, faiss_threshold=0)
    assert exact == faiss and exact[0][0] == 3


def test_corpus_hits_are_cached_and_reused(tmp_path, monkeypatch):
    rows = [{"id": "q", "question": "capital of Germany", "answers": ["Berlin"], "passages": [], "gold": []}]
    cache = str(tmp_path / "hits.json")
    first = retrieve_candidates(rows, CORPUS, BM25Retriever(), 2, cache, "bm25")
    assert first[0]["passages"][0]["id"] == "b" and json.loads(Path(cache).read_text())["hits"]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(retrieval, "search_corpus", fail)
    assert retrieve_candidates(rows, CORPUS, BM25Retriever(), 2, cache, "bm25") == first
    with pytest.raises(AssertionError):  # other settings miss the cache
        retrieve_candidates(rows, CORPUS, BM25Retriever(), 3, cache, "bm25")


def test_hf_dataset_loader_offline_from_a_local_json(tmp_path):
    path = tmp_path / "hp.jsonl"
    path.write_text(json.dumps(HOTPOT_COLUMNS) + "\n")
    rows, stats = load_hf("json", "train", "hotpotqa", data_files=str(path))
    assert stats.kept == 1 and rows[0]["gold"] == [True, True, False]


@needs_shared
def test_flashrag_questions_retrieve_from_the_corpus_and_score(tmp_path):
    from retrieve import RetrieveArguments
    from retrieve import main as retrieve_main

    out = tmp_path / "toy.jsonl"
    rows = retrieve_main(RetrieveArguments(
        questions=str(SHARED / "flashrag_toy" / "test.jsonl"), format="flashrag", output=str(out),
        corpus=str(SHARED / "flashrag_toy" / "sample_data.jsonl"), top_n=5, retriever="bm25",
    ))
    back, _ = load(str(out))
    assert len(back) == 17 and all(len(r["passages"]) == 5 for r in back)
    assert [p["id"] for p in back[0]["passages"]] == [p["id"] for p in rows[0]["passages"]]
    corpus_ids = {p["id"] for p in load_corpus(str(SHARED / "flashrag_toy" / "sample_data.jsonl"))}
    assert all(p["id"] in corpus_ids for r in back for p in r["passages"])
    assert exact_match(back[0]["answers"][0], back[0]["answers"]) == 1.0
    assert f1_score("Röntgen", back[0]["answers"]) > 0


@needs_shared
def test_nq_open_scores_end_to_end_against_a_corpus(tmp_path):
    rows, _ = load(str(SHARED / "nq_open" / "NQ-open.dev.jsonl"), "nq_open", limit=10)
    corpus = load_corpus(str(SHARED / "flashrag_toy" / "sample_data.jsonl"))
    with_hits = retrieve_candidates(rows, corpus, BM25Retriever(), 4)
    assert all(len(r["passages"]) == 4 for r in with_hits)
    assert len({tuple(p["id"] for p in r["passages"]) for r in with_hits}) > 5  # hits depend on the question
    recall = [answer_recall(r["passages"], r["answers"]) for r in with_hits]
    assert all(x in (0.0, 1.0) for x in recall)
    # scoring a prediction against NQ's answer lists: the first gold scores 1, an unrelated string 0
    assert exact_match(rows[0]["answers"][0], rows[0]["answers"]) == 1.0 and f1_score("zzz", rows[0]["answers"]) == 0
