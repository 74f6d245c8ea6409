"""Result files are replaced whole or not at all, and the commands print their own refusals as one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dro_rl.cli import refusals_in_one_line
from dro_rl.files import atomic_write, refuse_existing, write_lines

ROOT = Path(__file__).resolve().parents[1]


def test_an_interrupted_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.jsonl"
    write_lines([{"a": 1}, {"b": "é"}], str(path))
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(path)) as f:
            f.write("half a line")
            raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8").startswith('{"a": 1}') and sorted(os.listdir(tmp_path)) == ["results.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_overwrite_false_refuses_before_writing(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("mine\n")
    with pytest.raises(FileExistsError, match="out.jsonl already exists: pass --force"):
        write_lines([{"x": 1}], str(path), overwrite=False, flag="--force")
    assert path.read_text() == "mine\n"
    (tmp_path / "other").write_text("")
    with pytest.raises(FileExistsError, match=r"out.jsonl, \S*other already exist: "):  # every one named, only those
        refuse_existing([str(path), str(tmp_path / "missing"), str(tmp_path / "other")])


def test_a_refusal_of_ours_is_one_line_and_a_library_error_keeps_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit, match=r"^tool.py: error: .*x already exists: pass --overwrite true"):
        with refusals_in_one_line("tool.py"):
            refuse_existing([str(tmp_path / "x")])  # raised in dro_rl/
    with pytest.raises(json.JSONDecodeError):
        with refusals_in_one_line("tool.py"):
            json.loads("{")  # raised inside the standard library: the frames are the information
    monkeypatch.setenv("DRO_RL_TRACEBACK", "1")
    with pytest.raises(FileExistsError):
        with refusals_in_one_line("tool.py"):
            refuse_existing([str(tmp_path / "x")])


def test_a_command_prints_its_refusal_without_a_traceback(tmp_path):
    questions, output = tmp_path / "q.jsonl", tmp_path / "q.predictions.jsonl"
    questions.write_text(json.dumps({"question": "q?"}) + "\n")
    output.write_text("earlier\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--run_dir", str(tmp_path),
                           "--input", str(questions), "--output", str(output)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"predict.py: error: {output} already exists: pass --overwrite "
                                                     "to replace, or write elsewhere")
    assert output.read_text() == "earlier\n"
