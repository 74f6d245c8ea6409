import json
import re
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
    first = retrieve_candidates(rows, CORPUS, BM25Retriever(), 2, cache)
    assert first[0]["passages"][0]["id"] == "b" and json.loads(Path(cache).read_text())["hits"]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(retrieval, "search_corpus", fail)
    assert retrieve_candidates(rows, CORPUS, BM25Retriever(), 2, cache) == first
    with pytest.raises(AssertionError):  # other settings miss the cache
        retrieve_candidates(rows, CORPUS, BM25Retriever(), 3, cache)


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


# ---------------------------------------------------------------------------------------------------------------
# The corpus cache cannot hand a row another question's or another corpus's passages (docs/reliability.md)
# ---------------------------------------------------------------------------------------------------------------

QUESTIONS = [{"id": f"q{i}", "question": q, "answers": ["x"], "passages": [], "gold": []}
             for i, q in enumerate(["capital of Germany", "what is pasta made from", "capital of Italy"])]


def test_a_corpus_with_the_same_size_but_other_content_misses_the_cache(tmp_path):
    cache = str(tmp_path / "hits.json")
    first = retrieve_candidates(QUESTIONS, CORPUS, BM25Retriever(), 2, cache)
    assert [r["passages"][0]["id"] for r in first] == ["b", "c", "d"]
    again = retrieve_candidates(QUESTIONS, CORPUS[::-1], BM25Retriever(), 2, cache)  # same count, lines reversed
    assert [r["passages"][0]["id"] for r in again] == ["b", "c", "d"]


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda c: {**c, "hits": c["hits"][:1]}, "1 hit lists for 3 questions"),
        (lambda c: {**c, "hits": [[-1, 0]] + c["hits"][1:]}, "index -1"),
        (lambda c: {**c, "hits": [[5000, 0]] + c["hits"][1:]}, "index 5000"),
        (lambda c: {**c, "hits": [[0]] + c["hits"][1:]}, "not 2 distinct"),
        (lambda c: {**c, "hits": [[1, 1]] + c["hits"][1:]}, "not 2 distinct"),
    ],
)
def test_a_malformed_cache_is_recomputed_with_a_warning(tmp_path, tamper, problem):
    cache = tmp_path / "hits.json"
    first = retrieve_candidates(QUESTIONS, CORPUS, BM25Retriever(), 2, str(cache))
    cache.write_text(json.dumps(tamper(json.loads(cache.read_text()))))
    with pytest.warns(UserWarning, match=rf"{cache} .*{problem}.*recomputing"):
        again = retrieve_candidates(QUESTIONS, CORPUS, BM25Retriever(), 2, str(cache))
    assert again == first  # every row, each with its own hits
    assert json.loads(cache.read_text())["hits"] == [["abcd".index(p["id"]) for p in r["passages"]] for r in first]


def test_a_truncated_cache_file_is_recomputed_with_a_warning_naming_it(tmp_path):
    cache = tmp_path / "hits.json"
    first = retrieve_candidates(QUESTIONS, CORPUS, BM25Retriever(), 2, str(cache))
    cache.write_text(cache.read_text()[:20])
    with pytest.warns(UserWarning, match=rf"retrieval cache {cache} is unreadable"):
        assert retrieve_candidates(QUESTIONS, CORPUS, BM25Retriever(), 2, str(cache)) == first
    assert [p.name for p in tmp_path.iterdir()] == ["hits.json"]  # written in place, no temporary file left


def test_retrieve_script_writes_every_kept_row_even_from_a_shortened_cache(tmp_path, capsys):
    from retrieve import RetrieveArguments
    from retrieve import main as retrieve_main

    questions, corpus = tmp_path / "q.jsonl", tmp_path / "corpus.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    corpus.write_text("".join(json.dumps(p) + "\n" for p in CORPUS))
    out = tmp_path / "out.jsonl"
    args = RetrieveArguments(questions=str(questions), output=str(out), corpus=str(corpus), top_n=2, retriever="bm25")
    retrieve_main(args)
    written = out.read_text()
    with pytest.raises(FileExistsError, match="out.jsonl already exists: pass --overwrite"):
        retrieve_main(args)  # refused before retrieving, the first output untouched
    assert out.read_text() == written
    cache = tmp_path / "out.jsonl.cache.json"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "hits": [[1, 0]]}))
    args.overwrite = True
    with pytest.warns(UserWarning, match="recomputing"):
        retrieve_main(args)
    assert "3 rows kept" in capsys.readouterr().out and len(out.read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------------------------
# Rows with and without candidates, the order that is scored, and progress on long stages
# ---------------------------------------------------------------------------------------------------------------

OWN = {"id": "own", "question": "capital of France", "answers": ["Paris"],
       "passages": [{"id": "x1", "text": "Rome is the capital of Italy."}, {"id": "x2", "text": "Pasta is food."},
                    {"id": "x3", "text": "Paris is the capital of France."}]}


def write_rows(tmp_path, rows):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_mix_of_rows_with_and_without_candidates_retrieves_for_those_without(tmp_path, capsys):
    from dro_rl.pipeline import load_ranked

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in CORPUS))
    path = write_rows(tmp_path, [OWN, QUESTIONS[0]])
    _, rows, _ = load_ranked(path, BM25Retriever(), str(corpus), top_n=2, cache_dir=str(tmp_path))
    assert [p["id"] for p in rows[0]["passages"]][0] == "x3"  # its own candidates, re-ranked
    assert [p["id"] for p in rows[1]["passages"]][0] == "b" and len(rows[1]["passages"]) == 2  # from the corpus
    assert "for 1 rows without candidates" in capsys.readouterr().out


@pytest.mark.parametrize("retriever", [BM25Retriever(), None])
def test_a_mix_without_a_corpus_is_an_error_naming_the_rows(tmp_path, retriever):
    from dro_rl.data import DataError
    from dro_rl.pipeline import load_ranked, retrieval_order

    path = write_rows(tmp_path, [OWN, QUESTIONS[0]])
    with pytest.raises(DataError, match=rf"{path}: 1 of 2 rows have no candidate passages .*'q0'.*corpus"):
        load_ranked(path, retriever)
    with pytest.raises(DataError, match=r"1 of 2 rows have no candidate passages .*question 2, id 'q0'"):
        retrieval_order(load(path)[0], retriever)
    # on_bad_row / --on_error skip: such a row has nothing to be read from, so it is skipped and counted (it stopped)
    _, kept, stats = load_ranked(path, retriever, on_error="skip")
    assert [r["id"] for r in kept] == [OWN["id"]] and stats.kept == 1
    assert stats.skipped == [f"{path}: id 'q0': no candidate passages and no corpus to retrieve them from"]


def test_the_log_says_which_candidate_order_is_scored(tmp_path, capsys):
    from dro_rl.pipeline import load_ranked

    path = write_rows(tmp_path, [OWN])
    _, kept, _ = load_ranked(path, None)
    assert [p["id"] for p in kept[0]["passages"]] == ["x1", "x2", "x3"]
    assert "1 rows' own candidates scored in the file's own order (retriever: none)" in capsys.readouterr().out
    _, ranked, _ = load_ranked(path, BM25Retriever(), retriever_name="bm25")
    assert [p["id"] for p in ranked[0]["passages"]][0] == "x3"
    assert "in the order of the first-stage retriever bm25" in capsys.readouterr().out


def test_dense_ranking_shows_progress_for_a_handful_of_questions(dense, monkeypatch, capsys):
    monkeypatch.setattr(dense, "progress", True, raising=False)
    rank_candidates(dense, ["capital of Germany", "pasta"], [[p["text"] for p in CORPUS]] * 2)
    assert "Batches" in capsys.readouterr().err  # one bar for the questions, one for the passages


def test_bm25_shows_progress_by_default_on_a_terminal_and_not_in_logs(monkeypatch, capsys):
    questions, candidates = ["capital of Germany"] * 3, [[p["text"] for p in CORPUS]] * 3
    rank_candidates(BM25Retriever(), questions, candidates)
    assert "bm25" not in capsys.readouterr().err  # stderr captured: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rank_candidates(BM25Retriever(), questions, candidates)
    retrieval.search_corpus(BM25Retriever(), questions, CORPUS, 2)
    err = capsys.readouterr().err
    assert "bm25: 100%" in err and "Split strings" in err  # per-row ranking, and bm25s over the corpus


def test_an_empty_corpus_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"{path}: the corpus has no passages"):
        load_corpus(str(path))


def test_corpus_lines_one_line_contents_a_byte_order_mark_and_non_objects(tmp_path):
    """A one-line FlashRAG `contents` became a title with empty text (the prompt read "title: "); a file saved with
    a byte-order mark failed on its first line; a JSON list as a line raised AttributeError."""
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "contents": "p38 lives in c16"}\n{"id": "b", "contents": "\\"Title\\"\\nbody"}\n',
                    encoding="utf-8-sig")
    assert load_corpus(str(path)) == [{"id": "a", "title": "", "text": "p38 lives in c16"},
                                      {"id": "b", "title": "Title", "text": "body"}]
    path.write_text('{"id": "a", "text": "x"}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: each line must be an object with 'contents' \(or 'text'\)"):
        load_corpus(str(path))


@pytest.mark.parametrize("lines, message", [
    (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r":2: field 'id' repeats the id 'a' of line 1"),
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n', r":2: invalid UTF-8 \(invalid continuation"),
    (b'{"id": "a", "contents": ""}\n', r":1: the passage has no text"),
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": null}\n', r":2: field 'text' must be a string, got NoneType"),
    (b'{"id": "a", "text": "x"}\n{"id": [1], "text": "y"}\n', r":2: field 'id' must be a non-empty string or an "),
    (b'{"id": "2", "text": "x"}\n{"text": "y"}\n', r":2: a line without an id takes its line number, '2', as its id, "
                                                     r"and so did line 1"),  # named as what it is, not "repeats"
])
def test_a_corpus_line_that_would_retrieve_wrongly_is_named(tmp_path, lines, message):
    """Duplicate ids gave a question the same passage twice (a file the loaders then refused, naming the output);
    invalid UTF-8 raised UnicodeDecodeError without file or line; an all-empty corpus failed inside bm25s (and dense
    retrieval returned empty passages); `"text": null` was "missing"."""
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(lines)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        load_corpus(str(path))


def test_a_corpus_id_of_null_is_no_id_and_numbers_are_ids(tmp_path):
    """`"id": null` became the id "None" (two such lines then "repeated" it); 3 and "3" name one passage."""
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": null, "text": "x"}\n{"id": 7, "text": "y"}\n{"id": null, "text": "z"}\n')
    assert [p["id"] for p in load_corpus(str(path))] == ["1", "7", "3"]


def test_evaluate_and_train_score_the_files_own_order_with_retriever_none(tmp_path, capsys):
    from evaluate import EvaluateArguments
    from evaluate import main as evaluate_main
    from train_rl import make_parser as train_parser

    from dro_rl.pipeline_config import PipelineConfig
    from dro_rl.recipe import data_stage

    # the file puts the gold passage first; BM25 would put it last (it shares no word with the question)
    row = {"question": "capital of France", "answers": ["Paris"],
           "passages": [{"text": "The Eiffel tower city.", "gold": True}, {"text": "capital of France? Rome."},
                        {"text": "France capital of wine."}]}
    path = write_rows(tmp_path, [{**row, "id": f"r{i}"} for i in range(3)])
    results = evaluate_main(
        EvaluateArguments(datasets=[path], selector="tiny:minilm", generator="tiny:minilm",
                          output_dir=str(tmp_path / "eval")),
        PipelineConfig(retriever="none", num_docs_selected=1, max_passage_tokens=16, generator_max_passage_tokens=16,
                       max_answer_tokens=2, use_chat_template=False),
    )
    assert results["mixed"]["retrieval"]["support_recall_at_k"] == 1.0
    assert isinstance(results["mixed"]["selector"]["empty_predictions"], int)  # reported in metrics.json
    assert "scored in the file's own order (retriever: none)" in capsys.readouterr().out
    script_args, dro, _ = train_parser().parse_args_and_config(
        args=["--config", str(ROOT / "configs" / "demo.yaml"), "--dataset", path, "--eval_dataset", path,
              "--retriever", "none", "--output_dir", str(tmp_path / "t")]
    )
    train, evals = data_stage(script_args, dro)
    assert all(r["gold"] == [True, False, False] for r in train + evals)
    assert capsys.readouterr().out.count("file's own order") == 2


def test_a_retriever_model_path_that_does_not_exist_is_refused_by_name(tmp_path):
    from dro_rl.retrieval import DenseRetriever

    with pytest.raises(FileNotFoundError, match="retriever_model path does not exist: .*nowhere"):
        DenseRetriever(str(tmp_path / "nowhere"))
