"""scripts/hotpotqa_subset.py: the N = 4 files of the CPU recipe keep every gold paragraph and the layout."""

import json
import sys
from pathlib import Path

import pytest

from test_data import SHARED, needs_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from hotpotqa_subset import SubsetArguments, main  # noqa: E402

from dro_rl.data import DataError, load  # noqa: E402

TRAIN = SHARED / "hotpotqa_train300" / "hotpotqa_distractor_train300.jsonl"


@needs_shared
def test_subset_keeps_both_gold_paragraphs_first_distractors_and_order(tmp_path):
    out = tmp_path / "n4.jsonl"
    assert main(SubsetArguments(str(TRAIN), str(out), distractors=2, rows="250:300")) == 50
    full, _ = load(str(TRAIN), "hotpotqa")
    small, stats = load(str(out), "hotpotqa")
    assert stats.kept == 50 and [r["id"] for r in small] == [r["id"] for r in full[250:300]]
    for big, row in zip(full[250:300], small):
        titles = [p["title"] for p in big["passages"]]
        expected = [t for j, t in enumerate(titles)
                    if big["gold"][j] or sum(not g for g in big["gold"][: j + 1]) <= 2]
        assert [p["title"] for p in row["passages"]] == expected  # file order, the first two distractors
        assert sum(row["gold"]) == 2 == sum(big["gold"])
        assert row["answers"] == big["answers"] and row["question"] == big["question"]


def test_subset_of_the_row_wise_layout_and_its_refusals(tmp_path):
    row = {"_id": "a", "question": "Q?", "answer": "x",
           "supporting_facts": [["G", 0]],
           "context": [["D1", ["one."]], ["G", ["x is here."]], ["D2", ["two."]], ["D3", ["three."]]]}
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(row) + "\n")
    out = tmp_path / "out.jsonl"
    main(SubsetArguments(str(src), str(out), distractors=1))
    (kept,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c[0] for c in kept["context"]] == ["D1", "G"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(SubsetArguments(str(src), str(out), distractors=1))
    main(SubsetArguments(str(src), str(out), distractors=0, overwrite=True))
    assert [c[0] for c in json.loads(out.read_text())["context"]] == ["G"]
    with pytest.raises(ValueError, match="0 <= a < b <= 1"):
        main(SubsetArguments(str(src), str(tmp_path / "o2.jsonl"), rows="5:9"))
    with pytest.raises(ValueError, match="a:b"):
        main(SubsetArguments(str(src), str(tmp_path / "o2.jsonl"), rows="first"))
    src.write_text(json.dumps(row) + "\n" + json.dumps({**row, "supporting_facts": [["Gone", 0]]}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2.*supporting_facts"):
        main(SubsetArguments(str(src), str(tmp_path / "o3.jsonl")))
    assert not (tmp_path / "o3.jsonl").exists()


def test_short_and_unlabelled_rows_are_named_and_bad_ranges_refused(tmp_path, capsys):
    row = {"_id": "a", "question": "Q?", "answer": "x", "supporting_facts": [["G", 0]],
           "context": [["G", ["x is here."]], ["D1", ["one."]]]}
    bare = {**row, "_id": "b", "supporting_facts": []}
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (row, bare)) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(SubsetArguments(str(src), str(out), distractors=2)) == 2
    printed = capsys.readouterr().out
    assert "1 row has fewer than 2 distractors" in printed and "row 0 (2 paragraphs)" in printed
    assert "1 row has no supporting paragraph" in printed and "rows 1" in printed
    for spec in ("0:3", "-1:2", "1:1"):
        with pytest.raises(ValueError, match="0 <= a < b <= 2"):
            main(SubsetArguments(str(src), str(tmp_path / "o.jsonl"), rows=spec))
    with pytest.raises(IsADirectoryError, match="folder"):
        main(SubsetArguments(str(src), str(tmp_path), overwrite=True))
    leftover = tmp_path / "out.jsonl.tmp"
    leftover.write_text("mine")  # a user's file named like a temporary is never touched
    main(SubsetArguments(str(src), str(out), rows=":1", overwrite=True))
    assert leftover.read_text() == "mine" and len(out.read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.tmp", "rows.jsonl"]
