import json
import re
import sys
from pathlib import Path

import pytest

from dro_rl.data import DataError, load, parse_mapping, read_jsonl, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"shared data not found at {SHARED}")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


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
    path.write_text(json.dumps([{"q": {"text": "what?"}, "golds": ["ok"], "ctxs": [{"body": "p", "label": 1}]}]))
    (r,), _ = load(str(path), "json", mapping={"question": "q.text", "answers": "golds", "passages": "ctxs",
                                              "text": "body", "gold": "label"})
    assert r["question"] == "what?" and r["passages"][0]["text"] == "p" and r["gold"] == [True]


@pytest.mark.parametrize("text, message", [
    ("{bad", "--mapping is not valid JSON"),
    ("[1]", "must be a JSON object of field names"),
    ('{"question": 3}', "must be a JSON object of field names"),
    ('{"questoin": "q"}', "unknown canonical field\\(s\\) \\['questoin'\\]"),
])
def test_a_bad_field_mapping_is_named_before_reading(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mapping(text)


def test_json_format_names_the_missing_source_field_and_other_formats_refuse_a_mapping(tmp_path):
    path = write(tmp_path, "m.jsonl", [{"q": "who?", "a": ["x"]}])
    with pytest.raises(DataError, match="m.jsonl:1: field 'question' is missing \\(format json reads 'question' unless"):
        load(path, "json")  # no mapping: the canonical names, and the error says where they come from
    with pytest.raises(DataError, match="m.jsonl:1: field 'golds' is missing$"):
        load(path, "json", mapping=parse_mapping('{"question": "q", "answers": "golds"}'))
    (row,), _ = load(path, "json", mapping=parse_mapping('{"question": "q", "answers": "a"}'))
    assert (row["question"], row["answers"]) == ("who?", ["x"])
    with pytest.raises(ValueError, match="applies to format 'json' only"):  # else silently ignored
        load(path, "canonical", mapping={"question": "q"})
    with_passages = write(tmp_path, "p.jsonl", [{"q": "who?", "a": ["x"], "ctxs": [{"body": "t", "label": 1}]}])
    mapping = {"question": "q", "answers": "a", "passages": "ctxs", "text": "body"}
    with pytest.raises(DataError, match="p.jsonl:1: field 'ctxs\\[0\\].is_gold' is missing \\(the mapping's 'gold'\\)"):
        load(with_passages, "json", mapping={**mapping, "gold": "is_gold"})  # else every label would read False
    (row,), _ = load(with_passages, "json", mapping={**mapping, "gold": "label"})
    assert row["gold"] == [True] and row["passages"][0]["text"] == "t"


def test_canonical_round_trip(tmp_path, demo_rows):
    rows = demo_rows[:5]
    path = str(tmp_path / "c.jsonl")
    write_jsonl(rows, path)
    back = read_jsonl(path)
    assert [b["question"] for b in back] == [r["question"] for r in rows]
    assert [b["gold"] for b in back] == [r["gold"] for r in rows]
    assert [b["metadata"] for b in back] == [r["metadata"] for r in rows] and back[0]["metadata"]["hops"] in (1, 2)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"question": "", "answers": ["ok"], "passages": []}, "field 'question'"),
        ({"answers": ["ok"]}, "field 'question'"),
        ({"question": "q", "answers": []}, "field 'answers'"),
        ({"question": "q", "answers": [""]}, "field 'answers'"),
        ({"question": "q", "answers": "ok", "passages": [{"id": 1, "text": "x"}, {"id": 1, "text": "y"}]},
         "passages[1].id"),
        ({"question": "q", "answers": "ok", "passages": [{"title": "no text"}]}, "passages[0].text"),
        (b'{"question": "q", "answers": [', "not valid JSON"),
        (b'{"question": "a\tb", "answers": ["ok"]}', "not valid JSON (Invalid control character at column 16)"),
        (b'{"question": "caf\xe9", "answers": ["ok"]}', "invalid UTF-8"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    good = {"question": "fine", "answers": ["ok"]}
    path = write(tmp_path, "bad.jsonl", [good, line])
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("text", ['{"question": "a", "answers": ["x"]}\n{"question": "b", "answers": ["y"]}\n',
                                  '[{"question": "a", "answers": ["x"]}, {"question": "b", "answers": ["y"]}]',
                                  '{"question": {"0": "a", "1": "b"}, "answers": {"0": ["x"], "1": ["y"]}}'])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, text):
    """Windows editors save UTF-8 with a BOM: the first row was refused ('Unexpected UTF-8 BOM'), or lost with skip."""
    path = tmp_path / "bom.jsonl"
    path.write_text(text, encoding="utf-8-sig")
    rows, stats = load(str(path))
    assert [r["question"] for r in rows] == ["a", "b"] and not stats.skipped


def test_a_line_cut_off_short_is_named_at_its_own_last_column(tmp_path):
    """It was named at "column 1": the position after its line break, on the next line."""
    path = tmp_path / "cut.jsonl"
    path.write_text('{"id": "x"\n{"question": "q", "answers": ["a"]}\n')
    with pytest.raises(DataError, match=r"cut.jsonl:1: not valid JSON \(Expecting ',' delimiter at column 11\)"):
        load(str(path))


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
    nq, stats = load(str(SHARED / "nq_open" / "NQ-open.dev.jsonl"), "nq_open", on_error="skip")
    toy, _ = load(str(SHARED / "flashrag_toy" / "test.jsonl"), "flashrag")
    # two NQ-open questions have only unscoreable golds ("---", ")"): any empty prediction would score EM 1
    assert len(nq) == 3608 and [s.split(": field")[0].rsplit(":", 1)[1] for s in stats.skipped] == ["291", "364"]
    assert len(toy) == 17
    assert all(r["answers"] for r in nq + toy)


def test_empty_passage_text_is_kept_and_huge_text_loads(tmp_path):
    huge = "word " * 200_000
    rows, stats = load(write(tmp_path, "odd.jsonl", [
        {"question": "q?", "answers": ["ok"], "passages": [{"text": ""}, {"text": huge}, {"text": "Ünïcødé 🙂"}]},
    ]))
    assert stats.kept == 1 and [len(p["text"]) for p in rows[0]["passages"]][:2] == [0, len(huge)]


def test_missing_model_path_is_a_clear_error(tmp_path):
    from dro_rl.models import load_model

    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_truncated_model_weights_are_refused_by_file_name(tmp_path):
    """A copy cut short fails inside safetensors with an error that names no file; load_model names it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dro_rl.models import load_model

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    with pytest.raises(ValueError, match=f"{weights} is truncated"):
        load_model(str(tmp_path / "model"))


# ---------------------------------------------------------------------------------------------------------------
# Labels, answers and empty inputs (docs/reliability.md, round two)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, row, field",
    [
        ("canonical", {"question": "q", "answers": ["ok"], "passages": [{"text": "x", "gold": "false"}]},
         "passages[0].gold"),
        ("canonical", {"question": "q", "answers": ["ok"], "passages": [{"text": "x", "gold": 2}]}, "passages[0].gold"),
        ("musique", {"id": "m", "question": "q", "answer": "ok",
                     "paragraphs": [{"idx": 0, "title": "t", "paragraph_text": "x", "is_supporting": "False"}]},
         "paragraphs[0].is_supporting"),
    ],
)
def test_a_label_that_is_not_a_boolean_is_an_error_naming_the_row(tmp_path, fmt, row, field):
    path = write(tmp_path, "labels.jsonl", [row])
    with pytest.raises(DataError, match=rf"{path}:1: field '{re.escape(field)}' must be true or false"):
        load(path, fmt)


def test_numeric_labels_zero_and_one_still_load(tmp_path):
    row = {"question": "q", "answers": ["ok"], "passages": [{"text": "x", "gold": 1}, {"text": "y", "gold": 0}]}
    (r,), _ = load(write(tmp_path, "ok.jsonl", [row]))
    assert r["gold"] == [True, False]


@pytest.mark.parametrize("answer", [".", "the", "An", "?!"])
def test_answers_that_normalise_to_nothing_are_refused_or_skipped_and_counted(tmp_path, answer):
    lines = [{"question": "q", "answers": ["Paris"]}, {"question": "q2", "answers": [answer, "---"]}]
    path = write(tmp_path, "answers.jsonl", lines)
    with pytest.raises(DataError, match=rf"{path}:2: field 'answers' holds only .*empty after answer normalisation"):
        load(path)
    rows, stats = load(path, on_error="skip")
    assert [r["answers"] for r in rows] == [["Paris"]] and len(stats.skipped) == 1


def test_an_unscoreable_alias_beside_real_answers_loads_and_never_matches(tmp_path):
    from dro_rl.evaluation import exact_match, f1_score, sub_exact_match

    (r,), _ = load(write(tmp_path, "blood.jsonl", [{"question": "blood type?", "answers": ["A+", "AB+"]}]))
    assert r["answers"] == ["A+", "AB+"]  # "A+" normalises to nothing (the article "a" goes)
    assert exact_match("", r["answers"]) == 0.0 and f1_score("", r["answers"]) == 0.0
    assert sub_exact_match("", r["answers"]) == 0.0 and exact_match("AB+", r["answers"]) == 1.0


def test_hotpot_supporting_titles_missing_from_context_are_an_error_or_a_counted_skip(tmp_path):
    bad = {**HOTPOT_ROW, "_id": "h2", "supporting_facts": [["A", 0], ["Nowhere", 1]]}
    path = write(tmp_path, "hp.jsonl", [HOTPOT_ROW, bad])
    with pytest.raises(DataError, match=rf"{path}:2: field 'supporting_facts' names 'Nowhere'"):
        load(path, "hotpotqa")
    rows, stats = load(path, "hotpotqa", on_error="skip")
    assert [r["id"] for r in rows] == ["h1"] and stats.seen == 2 and "Nowhere" in stats.skipped[0]
    cols = {**HOTPOT_COLUMNS, "supporting_facts": {"title": ["A", "Gone"], "sent_id": [0, 0]}}
    with pytest.raises(DataError, match="names 'Gone'"):
        load(write(tmp_path, "cols.jsonl", [cols]), "hotpotqa")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]"])
def test_an_empty_data_file_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}: no rows: the input is empty"):
        load(str(path))


def test_a_file_whose_every_row_is_skipped_is_an_error_not_an_empty_result(tmp_path):
    path = write(tmp_path, "bad.jsonl", [{"question": ""}, b"{oops"])
    with pytest.raises(DataError, match=rf"{path}: no rows left: all 2 rows were skipped") as err:
        load(path, on_error="skip")
    assert f"{path}:1: field 'question'" in str(err.value)  # the reasons come with it


def test_retrieve_script_refuses_empty_and_all_skipped_inputs_without_writing(tmp_path):
    from retrieve import RetrieveArguments
    from retrieve import main as retrieve_main

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bad = write(tmp_path, "bad.jsonl", [{"question": "q", "answers": []}])
    for questions in (str(empty), bad):
        out = tmp_path / "out.jsonl"
        with pytest.raises(DataError, match="no rows"):
            retrieve_main(RetrieveArguments(questions=questions, output=str(out), retriever="bm25", on_error="skip"))
        assert not out.exists()
    corpus = tmp_path / "corpus.jsonl"  # --output equal to --corpus, with --overwrite, replaced the corpus
    corpus.write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(ValueError, match="corpus.jsonl is also the input"):
        retrieve_main(RetrieveArguments(questions=bad, corpus=str(corpus), output=str(corpus), retriever="bm25",
                                        overwrite=True))
    assert corpus.read_text() == '{"id": "a", "text": "x"}\n'


def test_on_bad_row_skip_with_every_row_bad_says_no_rows_are_left(tmp_path, word_tok):
    from conftest import make_model
    from datasets import Dataset
    from tiny_run import tiny_config

    from dro_rl import DROTrainer

    rows = [{"question": "q", "answers": ["ok"], "passages": [{"text": "only one"}], "gold": []}] * 3
    with pytest.raises(DataError, match="train_dataset: no rows left: all 3 rows were skipped"):
        DROTrainer(model=make_model(word_tok), generator=make_model(word_tok, seed=1),
                   args=tiny_config(str(tmp_path), on_bad_row="skip"), train_dataset=Dataset.from_list(rows),
                   processing_class=word_tok, generator_processing_class=word_tok)


# ---------------------------------------------------------------------------------------------------------------
# Files users bring, and the loader's public names
# ---------------------------------------------------------------------------------------------------------------


def test_pandas_column_wise_json_loads_row_by_row(tmp_path):
    import pandas as pd

    rows = [{**HOTPOT_ROW, "_id": f"w{i}", "question": f"Who is older {i}?"} for i in range(3)]
    path = tmp_path / "two_wiki.json"
    pd.DataFrame(rows).to_json(path)  # {"_id": {"0": ..., "1": ...}, "question": {...}, ...}
    assert json.loads(path.read_text())["question"] == {"0": "Who is older 0?", "1": "Who is older 1?",
                                                      "2": "Who is older 2?"}
    loaded, stats = load(str(path), "2wikimultihopqa")
    assert stats.kept == 3 and [r["id"] for r in loaded] == ["w0", "w1", "w2"]
    assert all(r["gold"] == [True, True, False] for r in loaded)
    pd.DataFrame(rows).to_json(path, indent=2)  # pretty-printed, the same layout over many lines
    assert [r["id"] for r in load(str(path), "2wikimultihopqa")[0]] == ["w0", "w1", "w2"]


def test_pandas_column_wise_json_with_a_bad_cell_names_the_row(tmp_path):
    import pandas as pd

    rows = [{**HOTPOT_ROW, "_id": "w0"}, {**HOTPOT_ROW, "_id": "w1", "question": ""}]
    path = tmp_path / "two_wiki.json"
    pd.DataFrame(rows).to_json(path)
    with pytest.raises(DataError, match=rf"{path}:row 1: field 'question'"):
        load(str(path), "2wikimultihopqa")


def test_a_json_array_names_a_bad_record_from_one_as_lines_are(tmp_path):
    """The second record of an array is "record 2" (with its Python index), as the second JSONL line is line 2."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{**HOTPOT_ROW, "_id": "w0"}, {**HOTPOT_ROW, "_id": "w1", "question": ""}], indent=1))
    with pytest.raises(DataError, match=rf"{path}:record 2 \(index 1\): field 'question'"):
        load(str(path), "hotpotqa")


def test_one_json_object_that_is_not_rows_says_how_to_re_save_it(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1", "data": [{"question": "q"}]}, indent=2))
    with pytest.raises(DataError, match=r"one JSON object .*orient='records', lines=True"):
        load(str(path))


def test_two_wiki_reads_id_as_well_as_underscore_id(tmp_path):
    row = {k: v for k, v in HOTPOT_ROW.items() if k != "_id"}
    (r,), _ = load(write(tmp_path, "w.jsonl", [{**row, "id": "w7"}]), "2wikimultihopqa")
    assert r["id"] == "w7"


def test_load_takes_format_as_the_readme_documents_and_refuses_fmt(tmp_path):
    path = write(tmp_path, "hp.jsonl", [HOTPOT_ROW])
    (r,), _ = load(path, format="hotpotqa")
    assert r["gold"] == [True, True, False]
    with pytest.raises(TypeError, match="format="):
        load(path, fmt="hotpotqa")


def test_load_hf_with_an_unknown_format_lists_the_formats(tmp_path):
    from dro_rl.data import load_hf

    path = tmp_path / "hp.jsonl"
    path.write_text(json.dumps(HOTPOT_COLUMNS) + "\n")
    with pytest.raises(ValueError, match=r"unknown format 'hotpot'.*'hotpotqa'"):
        load_hf("json", "train", format="hotpot", data_files=str(path))
    with pytest.raises(TypeError, match="format="):
        load_hf("json", "train", fmt="hotpotqa", data_files=str(path))


@pytest.mark.parametrize(
    "row, hint",
    [
        ({"id": "m", "question": "q", "answer": "ok", "paragraphs": []}, "format 'musique'.* musique:<path> "),
        ({**HOTPOT_ROW}, "format 'hotpotqa'"),
        ({"id": "f", "question": "q", "golden_answers": ["ok"]}, "format 'flashrag'"),
    ],
)
def test_a_raw_source_file_read_as_canonical_suggests_its_format(tmp_path, row, hint):
    with pytest.raises(DataError, match=hint):
        load(write(tmp_path, "raw.jsonl", [row]))


def test_retrieve_help_lists_every_format():
    from retrieve import make_parser

    from dro_rl.data import FORMATS

    text = make_parser().format_help()
    assert all(name in text for name in [*FORMATS, "json"])


def test_a_raw_source_row_is_not_taken_as_a_bare_new_question(tmp_path):
    """predict.py reads questions whose answers and passages are optional: a raw HotpotQA or NQ-open row passed as a
    bare question, its own paragraphs and answer silently ignored. It is refused with the format it looks like."""
    from dro_rl.data import load_questions

    hotpot = write(tmp_path, "raw.jsonl", [{"question": "q?", "answer": "a", "context": [["T", ["s."]]],
                                            "supporting_facts": [["T", 0]]}])
    with pytest.raises(DataError, match=r"raw.jsonl:1: this row looks like format 'hotpotqa'.*--format hotpotqa"):
        load_questions(hotpot)
    nq = write(tmp_path, "nq.jsonl", [{"question": "q?", "answer": ["a"]}])
    with pytest.raises(DataError, match="looks like format 'nq_open'"):
        load_questions(nq)
    rows, _ = load_questions(write(tmp_path, "ok.jsonl", [{"question": "q?"}, {"question": "r?", "answers": []}]))
    assert rows[0]["passages"] == [] and rows[0]["answers"] == [] == rows[1]["answers"]  # "answers": [] was refused


def test_a_repeated_question_id_is_named_with_the_row_it_repeats_or_skipped(tmp_path):
    """Predictions, paired before/after comparisons and retrieval caches are keyed by id: a second row with the same
    id would overwrite the first's results."""
    path = tmp_path / "dup.jsonl"
    rows = [{"id": i, "question": f"q{n}?", "answers": ["paris"], "passages": [{"text": "paris"}]}
            for n, i in enumerate(["x", "y", "x"])]
    write_jsonl(rows, str(path))
    with pytest.raises(DataError, match=r"dup.jsonl:3: field 'id' repeats the id 'x' of .*dup.jsonl:1"):
        load(str(path))
    kept, stats = load(str(path), on_error="skip")
    assert [r["question"] for r in kept] == ["q0?", "q1?"] and len(stats.skipped) == 1


def test_a_limited_read_says_so_in_its_counts(tmp_path):
    """``--max_eval_questions 4`` on a 6-row file: "4 rows kept" alone reads as the file's size."""
    path = tmp_path / "six.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "answers": ["Paris"], "passages": [{"text": "p"}]}) + "\n"
                            for i in range(6)))
    rows, stats = load(str(path), limit=4)
    assert len(rows) == 4
    assert stats.summary() == f"{path}: 4 rows kept, 0 skipped (a limit: at most its first 4 rows read)"
    assert load(str(path))[1].summary() == f"{path}: 6 rows kept, 0 skipped"


def test_a_row_level_gold_list_is_read_not_dropped(tmp_path):
    """The trainer's rows hold ``gold`` as one list beside the passages; a file written that way lost its labels."""
    path = tmp_path / "g.jsonl"
    row = {"question": "q?", "answers": ["Paris"], "passages": [{"text": "a"}, {"text": "b"}], "gold": [False, True]}
    path.write_text(json.dumps(row) + "\n")
    assert load(str(path))[0][0]["gold"] == [False, True]
    path.write_text(json.dumps({**row, "gold": [True]}) + "\n")
    with pytest.raises(DataError, match="g.jsonl:1: field 'gold' must be a list of one true/false per passage"):
        load(str(path))
    path.write_text(json.dumps({**row, "passages": [{"text": "a", "gold": True}, {"text": "b"}]}) + "\n")
    with pytest.raises(DataError, match="both as a row-level list and inside the passages"):
        load(str(path))


def test_trainer_rows_are_read_as_the_file_reader_reads_them():
    """From Python, `"answers": "Paris"` trained on the target "P" and was scored per character; gold flags inside
    the passages (the file schema) were ignored without a word; a DataFrame or IterableDataset ended in an
    AttributeError / TypeError; a row with `ctxs` instead of `passages` was said to have 0 candidates."""
    from datasets import Dataset, DatasetInfo

    from dro_rl.data import check_dataset

    texts = [{"title": "", "text": t} for t in ("Berlin is big.", "Paris is the capital.", "Rome is old.")]
    rows = [{"question": "capital of France?", "answers": "Paris", "passages": texts},
            {"question": "capital of Italy?", "answers": "Rome",
             "passages": [{**p, "gold": j == 2} for j, p in enumerate(texts)]}]
    data, stats = check_dataset(Dataset.from_list(rows, info=DatasetInfo(dataset_name="mine")), 2)
    assert stats.kept == 2 and data.info.dataset_name == "mine"  # the name the model card cites
    assert [r["answers"] for r in data] == [["Paris"], ["Rome"]]
    assert [r["gold"] for r in data] == [[], [False, False, True]]
    assert all("gold" not in p for r in data for p in r["passages"])
    both = [{**rows[1], "gold": [False, False, True]}]
    with pytest.raises(DataError, match="question 1: field 'gold' is given both as a row-level list and inside"):
        check_dataset(both, 2)
    with pytest.raises(DataError, match=r"question 1: field 'passages' is missing \(the row's fields: \['answers', "
                                        r"'ctxs', 'question'\]\)"):
        check_dataset([{"question": "q?", "answers": ["x"], "ctxs": []}], 2)
    with pytest.raises(DataError, match=r"question 1: field 'answers' is missing \(the row's fields: \['answer', "):
        check_dataset([{"question": "q?", "answer": "x", "passages": texts}], 2)
    import pandas

    for data, hint in ((pandas.DataFrame(rows), r"not DataFrame: datasets.Dataset.from_pandas\(df\)"),
                       (Dataset.from_list(rows).to_iterable_dataset(), "not IterableDataset .*from_list")):
        with pytest.raises(TypeError, match="train_dataset must be a datasets.Dataset or a list of row dicts, " + hint):
            check_dataset(data, 2)
