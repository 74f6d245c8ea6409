import json
from pathlib import Path

import pytest

from dro_rl.data import DataError, load, read_jsonl, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"shared data not found at {SHARED}")


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return str(path)


HOTPOT_ROW = {
    "_id": "h1", "question": "Who is older?", "answer": "yes", "type": "comparison", "level": "hard",
    "context": [["A", ["A was born.", " In 1900."]], ["B", ["B too."]], ["C", ["Noise."]]],
    "supporting_facts": [["A", 0], ["B", 0]],
}
HOTPOT_COLUMNS = {
    "id": "h1", "question": "Who is older?", "answer": "yes", "type": "comparison", "level": "hard",
    "context": {"title": ["A", "B", "C"], "sentences": [["A was born.", " In 1900."], ["B too."], ["Noise."]]},
    "supporting_facts": {"title": ["A", "B"], "sent_id": [0, 0]},
}


def test_hotpotqa_row_wise_and_column_wise_layouts_agree(tmp_path):
    (a,), _ = load(write(tmp_path, "rows.jsonl", [HOTPOT_ROW]), "hotpotqa")
    (b,), _ = load(write(tmp_path, "cols.jsonl", [HOTPOT_COLUMNS]), "hotpotqa")
    assert a == b
    assert a["gold"] == [True, True, False]
    assert a["passages"][0] == {"id": "0", "title": "A", "text": "A was born.  In 1900."}
    assert a["answers"] == ["yes"] and a["metadata"] == {"type": "comparison", "level": "hard"}


def test_musique_answers_include_aliases_and_gold_comes_from_is_supporting(tmp_path):
    row = {"id": "m1", "question": "q?", "answer": "Paris", "answer_aliases": ["City of Light"],
           "paragraphs": [{"idx": 0, "title": "T0", "paragraph_text": "x", "is_supporting": False},
                          {"idx": 1, "title": "T1", "paragraph_text": "Paris!", "is_supporting": True}]}
    (r,), _ = load(write(tmp_path, "m.jsonl", [row]), "musique")
    assert r["answers"] == ["Paris", "City of Light"] and r["gold"] == [False, True]


def test_two_wiki_uses_the_underscore_id(tmp_path):
    row = {**HOTPOT_ROW, "_id": "w1"}
    (r,), _ = load(write(tmp_path, "w.jsonl", [row]), "2wikimultihopqa")
    assert r["id"] == "w1" and r["gold"] == [True, True, False]


def test_json_array_files_and_field_mapping(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"q": {"text": "what?"}, "golds": ["a"], "ctxs": [{"body": "p", "label": 1}]}]))
    (r,), _ = load(str(path), "json", mapping={"question": "q.text", "answers": "golds", "passages": "ctxs",
                                              "text": "body", "gold": "label"})
    assert r["question"] == "what?" and r["passages"][0]["text"] == "p" and r["gold"] == [True]


def test_canonical_round_trip(tmp_path, demo_rows):
    rows = [{**r, "metadata": {"hops": r["hops"]}} for r in demo_rows[:5]]
    rows = [{k: v for k, v in r.items() if k != "hops"} for r in rows]
    path = str(tmp_path / "c.jsonl")
    write_jsonl(rows, path)
    back = read_jsonl(path)
    assert [b["question"] for b in back] == [r["question"] for r in rows]
    assert [b["gold"] for b in back] == [r["gold"] for r in rows]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"question": "", "answers": ["a"], "passages": []}, "field 'question'"),
        ({"answers": ["a"]}, "field 'question'"),
        ({"question": "q", "answers": []}, "field 'answers'"),
        ({"question": "q", "answers": [""]}, "field 'answers'"),
        ({"question": "q", "answers": "a", "passages": [{"id": 1, "text": "x"}, {"id": 1, "text": "y"}]},
         "passages[1].id"),
        ({"question": "q", "answers": "a", "passages": [{"title": "no text"}]}, "passages[0].text"),
        (b'{"question": "q", "answers": [', "not valid JSON"),
        (b'{"question": "caf\xe9", "answers": ["a"]}', "invalid UTF-8"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    good = {"question": "fine", "answers": ["a"]}
    path = write(tmp_path, "bad.jsonl", [good, line])
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_skipping_counts_every_dropped_row(tmp_path):
    lines = [{"question": "a", "answers": ["x"]}, {"question": "", "answers": ["x"]}, b"{oops",
             {"question": "b", "answers": ["y"]}]
    rows, stats = load(write(tmp_path, "mixed.jsonl", lines), on_error="skip")
    assert [r["question"] for r in rows] == ["a", "b"]
    assert stats.kept == 2 and len(stats.skipped) == 2 and stats.seen == 4
    assert ":2:" in stats.skipped[0] and ":3:" in stats.skipped[1]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load(str(tmp_path / "nope.jsonl"))


@needs_shared
def test_real_hotpotqa_dev300_loads_every_question():
    rows, stats = load(str(SHARED / "hotpotqa_dev300" / "hotpotqa_distractor_dev300.jsonl"), "hotpotqa")
    assert stats.kept == 300 and not stats.skipped
    assert all(sum(r["gold"]) == 2 for r in rows)
    assert sorted(len(r["passages"]) for r in rows)[:3] == [2, 6, 9]


@needs_shared
def test_real_nq_open_and_flashrag_questions_load():
    nq, _ = load(str(SHARED / "nq_open" / "NQ-open.dev.jsonl"), "nq_open")
    toy, _ = load(str(SHARED / "flashrag_toy" / "test.jsonl"), "flashrag")
    assert len(nq) == 3610 and len(toy) == 17
    assert all(r["answers"] for r in nq + toy)


def test_empty_passage_text_is_kept_and_huge_text_loads(tmp_path):
    huge = "word " * 200_000
    rows, stats = load(write(tmp_path, "odd.jsonl", [
        {"question": "q?", "answers": ["a"], "passages": [{"text": ""}, {"text": huge}, {"text": "Ünïcødé 🙂"}]},
    ]))
    assert stats.kept == 1 and [len(p["text"]) for p in rows[0]["passages"]][:2] == [0, len(huge)]


def test_missing_model_path_is_a_clear_error(tmp_path):
    from dro_rl.models import load_model

    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        load_model(str(tmp_path / "no-such-model"))
