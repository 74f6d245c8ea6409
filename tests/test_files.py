"""Result files are replaced whole or not at all, and the commands print their own refusals as one line."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from trl import TrlParser

from dro_rl.config import DROConfig
from dro_rl.cli import refusals_in_one_line
from dro_rl.files import atomic_write, claim_output, write_lines

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


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("mine\n")
    with pytest.raises(FileExistsError, match="out.jsonl already exists: pass --force to replace it"):
        claim_output(str(path), flag="--force")
    assert path.read_text() == "mine\n"
    claim_output(str(path), overwrite=True)  # allowed; nothing written yet
    assert path.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_an_output_that_cannot_be_written_is_refused_by_its_own_name_before_any_work(tmp_path):
    afile, questions = tmp_path / "afile", tmp_path / "q.jsonl"
    afile.write_text("")
    questions.write_text("{}\n")
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder: give a file path"):
        claim_output(str(tmp_path))
    with pytest.raises(NotADirectoryError, match=f"{afile} is a file, not a folder"):
        claim_output(str(afile / "p.jsonl"))
    with pytest.raises(ValueError, match="is also the input: write the output elsewhere"):
        claim_output(str(questions), overwrite=True, inputs=[str(tmp_path / "." / "q.jsonl")])
    with pytest.raises(PermissionError, match="cannot write in /proc/dro_rl_nowhere"):
        claim_output("/proc/dro_rl_nowhere/p.jsonl")
    claim_output(str(tmp_path / "new" / "p.jsonl"))  # a missing folder is made; nothing is left in it
    assert os.listdir(tmp_path / "new") == []


def test_a_refusal_of_ours_is_one_line_and_a_library_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        with refusals_in_one_line("tool.py"):
            claim_output(str(tmp_path / "x"))  # raised in dro_rl/
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"tool.py: error: {tmp_path / 'x'} already exists: pass --overwrite true to " \
                                      "replace it, or write elsewhere\n"
    with pytest.raises(SystemExit) as exit_info:  # a flag the command does not have: the parser's refusal, status 2
        with refusals_in_one_line("tool.py"):
            TrlParser((Flags,)).parse_args_and_config(args=["--ouput", "a.jsonl"])
    assert exit_info.value.code == 2 and "tool.py: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a setting TRL's GRPOConfig refuses: a refusal, not a failure
        with refusals_in_one_line("tool.py"):
            DROConfig(output_dir="x", use_cpu=True, bf16=False, generation_batch_size=7)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "tool.py: error: generation_batch_size (7) must be divisible by the global " \
                                      "batch size (8).\n"
    with pytest.raises(SystemExit) as exit_info:
        with refusals_in_one_line("tool.py"):
            raise KeyboardInterrupt
    assert exit_info.value.code == 130 and capsys.readouterr().err == "\ntool.py: interrupted\n"
    with pytest.raises(SystemExit):
        with refusals_in_one_line("tool.py", "resume it with --resume true"):
            raise KeyboardInterrupt
    assert capsys.readouterr().err == "\ntool.py: interrupted; resume it with --resume true\n"
    with pytest.raises(json.JSONDecodeError):
        with refusals_in_one_line("tool.py"):
            json.loads("{")  # raised inside the standard library: the frames are the information
    monkeypatch.setenv("DRO_RL_TRACEBACK", "1")
    with pytest.raises(FileExistsError):
        with refusals_in_one_line("tool.py"):
            claim_output(str(tmp_path / "x"))


@dataclass
class Flags:
    output: str = "out.jsonl"


def test_a_command_prints_its_refusal_without_a_traceback(tmp_path):
    questions, output = tmp_path / "q.jsonl", tmp_path / "q.predictions.jsonl"
    questions.write_text(json.dumps({"question": "q?"}) + "\n")
    output.write_text("earlier\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--run_dir", str(tmp_path),
                           "--input", str(questions), "--output", str(output)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"predict.py: error: {output} already exists: pass --overwrite "
                                                     "to replace it, or write elsewhere")
    assert output.read_text() == "earlier\n"


def test_counts_below_one_are_refused_by_their_flag():
    """--batch_size -1 wrote an empty predictions file, --top_n 0 rows without candidates, --limit 0 'the input is
    empty'; each is now refused when the flags are read."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from evaluate import EvaluateArguments
    from predict import PredictArguments
    from retrieve import RetrieveArguments

    for make, flag, value in ((lambda v: PredictArguments("run", "q.jsonl", batch_size=v), "--batch_size", -1),
                              (lambda v: PredictArguments("run", "q.jsonl", limit=v), "--limit", 0),
                              (lambda v: RetrieveArguments("q.jsonl", "o.jsonl", top_n=v), "--top_n", 0),
                              (lambda v: RetrieveArguments("q.jsonl", "o.jsonl", limit=v), "--limit", -1),
                              (lambda v: EvaluateArguments(["d.jsonl"], limit=v), "--limit", 0),
                              (lambda v: EvaluateArguments(["d.jsonl"], batch_size=v), "--batch_size", 0)):
        with pytest.raises(ValueError, match=f"^{flag} must be >= 1, got {value}$"):
            make(value)
