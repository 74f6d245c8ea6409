"""predict.py answers a file of new questions from a run folder alone, and the `dro-rl` command runs every script."""

import json
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
from saved_runs import train_and_save

from dro_rl import DROPipeline, cli
from dro_rl.data import DataError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from predict import PredictArguments  # noqa: E402
from predict import main as predict_main  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_rows, word_tok):
    out = tmp_path_factory.mktemp("predict") / "run"
    train_and_save(out, demo_rows[:16], word_tok)
    return out


@pytest.fixture
def inputs(tmp_path, demo_rows):
    """New questions: with candidates and answers, with candidates only, and bare (retrieved from the corpus)."""
    a, b, c = demo_rows[16:19]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "a", "question": a["question"], "passages": a["passages"], "answers": a["answers"]},
        {"id": "b", "question": b["question"], "passages": b["passages"]},
        {"id": "c", "question": c["question"]},
    )))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d-{i}", "text": text}) + "\n" for i, text in
                              enumerate(dict.fromkeys(p["text"] for r in demo_rows for p in r["passages"]))))
    return questions, corpus


def test_predict_answers_new_questions_with_only_the_run_folder_and_the_input(run, inputs, tmp_path, capsys,
                                                                              monkeypatch, demo_rows):
    questions, corpus = inputs
    monkeypatch.chdir(tmp_path)
    result = predict_main(PredictArguments(run_dir=str(run), input=str(questions), corpus=str(corpus)))
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "questions.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"] and result["n"] == 3
    pipe = DROPipeline.from_pretrained(str(run))
    expected = pipe(demo_rows[17]["question"], passages=demo_rows[17]["passages"])
    assert (records[1]["prediction"], records[1]["ranking"]) == (expected.answer, expected.ranking)
    assert records[1]["selected"] == [p["id"] for p in expected.passages]
    # the ranking reads off the file alone: its [i] is the i-th of the candidates, in first-stage order
    picked = [int(t.strip("[]")) - 1 for t in records[1]["ranking"].split(" > ")]
    assert [records[1]["candidates"][i] for i in picked] == records[1]["selected"]
    assert len(records[2]["selected"]) == 2 and all(i.startswith("d-") for i in records[2]["selected"])  # corpus ids
    # metrics only over the one question that has answers
    assert "em" in records[0] and "em" not in records[1] and result["n_with_answers"] == 1
    assert f"on the 1 questions with answers: EM {records[0]['em']:.3f}" in out


def test_predict_without_any_answers_prints_no_metrics(run, inputs, tmp_path, capsys):
    questions, _ = inputs
    only_b = tmp_path / "b.jsonl"
    only_b.write_text(questions.read_text().splitlines()[1] + "\n")
    output = tmp_path / "o.jsonl"
    result = predict_main(PredictArguments(run_dir=str(run), input=str(only_b), output=str(output)))
    assert result["metrics"] is None and "EM" not in capsys.readouterr().out
    written = output.read_text()
    with pytest.raises(FileExistsError, match="o.jsonl already exists: pass --overwrite"):  # before the run is read
        predict_main(PredictArguments(run_dir=str(tmp_path / "no_run"), input=str(only_b), output=str(output)))
    assert output.read_text() == written
    predict_main(PredictArguments(run_dir=str(run), input=str(only_b), output=str(output), overwrite=True))
    assert output.read_text() == written and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_predict_disable_tqdm_leaves_no_progress_bar_in_the_log(run, inputs, tmp_path, capsys):
    """From 64 questions the selection and answer bars show; a log file wants none, as train_rl.py's flag does."""
    questions, _ = inputs
    b = json.loads(questions.read_text().splitlines()[1])
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({**b, "id": f"b{i}"}) + "\n" for i in range(64)))
    predict_main(PredictArguments(run_dir=str(run), input=str(many), output=str(tmp_path / "with.jsonl")))
    assert "answer: 100%" in capsys.readouterr().err
    try:
        predict_main(PredictArguments(run_dir=str(run), input=str(many), output=str(tmp_path / "without.jsonl"),
                                      disable_tqdm=True))
        assert "%|" not in capsys.readouterr().err
    finally:  # the flag turns transformers' bars off process-wide, as the script's process wants
        import transformers
        transformers.utils.logging.enable_progress_bar()
    assert (tmp_path / "with.jsonl").read_text() == (tmp_path / "without.jsonl").read_text()


def test_predict_names_a_run_folder_changed_since_its_save_as_the_other_readers_do(run, inputs, tmp_path):
    """With pipeline.json deleted, predict.py said "not a dro-rl run or checkpoint folder" where DROPipeline and
    evaluate.py name the missing file."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "pipeline.json").unlink()
    with pytest.raises(ValueError, match=r"damaged was changed since its save finished: pipeline.json is missing"):
        predict_main(PredictArguments(run_dir=str(damaged), input=str(inputs[0]), output=str(tmp_path / "o.jsonl")))


def test_predict_never_writes_over_its_corpus_even_with_overwrite(run, inputs, tmp_path):
    """--output equal to --corpus with --overwrite replaced the corpus with predictions (the input was protected)."""
    questions, corpus = inputs
    before = corpus.read_text()
    with pytest.raises(ValueError, match="corpus.jsonl is also the input"):
        predict_main(PredictArguments(run_dir=str(run), input=str(questions), corpus=str(corpus), output=str(corpus),
                                      overwrite=True))
    assert corpus.read_text() == before


def test_predict_names_the_questions_it_cannot_answer_before_loading_the_models(run, inputs, tmp_path, capsys,
                                                                               monkeypatch):
    questions, _ = inputs
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    rows.insert(1, {**rows[1], "id": "short", "passages": rows[1]["passages"][:1]})  # fewer than the run's K = 2
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": ""}\n')  # the reader's to skip
    loads, original = [], DROPipeline.from_pretrained
    monkeypatch.setattr(DROPipeline, "from_pretrained", lambda *a, **kw: loads.append(a) or original(*a, **kw))
    with pytest.raises(DataError, match=r"questions.jsonl:5: field 'question' must be a non-empty string"):
        predict_main(PredictArguments(run_dir=str(run), input=str(questions), output=str(tmp_path / "o.jsonl")))
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"questions.jsonl: 1 of 4 questions have no `passages` and no --corpus .*: "
                                         r"question 4 \(id 'c'\); 1 of 4 questions have fewer candidate passages .*: "
                                         r"question 2 \(id 'short'\); fix them, or pass --on_error skip"):
        predict_main(PredictArguments(run_dir=str(run), input=str(questions), output=str(tmp_path / "o.jsonl")))
    with pytest.raises(ValueError, match=r"1 of 4 questions have fewer candidate passages than the K = 2 the run's "
                                         r"selector picks: question 2 \(id 'short'\)"):
        predict_main(PredictArguments(run_dir=str(run), input=str(questions), output=str(tmp_path / "o.jsonl"),
                                      corpus=str(inputs[1])))
    assert not (tmp_path / "o.jsonl").exists() and loads == []
    with pytest.raises(FileNotFoundError, match="no_such_run is not a run folder"):  # a path, not a Hub repo id
        predict_main(PredictArguments(run_dir=str(tmp_path / "no_such_run"), input=str(questions),
                                      output=str(tmp_path / "o.jsonl"), corpus=str(inputs[1]), on_error="skip"))
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": ""}\n')
    result = predict_main(PredictArguments(run_dir=str(run), input=str(questions), output=str(tmp_path / "o.jsonl"),
                                           on_error="skip"))  # counted and named, the others answered
    out = capsys.readouterr().out
    assert result["n"] == 2 and "skipped 1 of 4 questions with no `passages` and no --corpus to retrieve them from: " \
        "question 4 (id 'c')" in out and "skipped 1 of 4 questions with fewer candidate passages than the K = 2" in out
    assert "answering 2 questions; 3 skipped in all" in out  # the empty question the reader skipped counts too
    ids = [json.loads(line)["id"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert ids == ["a", "b"]


def test_predict_refuses_a_format_prefix_with_the_conversion_to_run(tmp_path):
    with pytest.raises(ValueError, match=r"reads canonical questions, not the 'hotpotqa' format .* scripts/retrieve.py "
                                         r"--questions dev.json --format hotpotqa"):
        PredictArguments(run_dir="run", input="hotpotqa:dev.json")


def test_the_console_entry_point_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dro-rl": "dro_rl.cli:main"}
    assert set(cli.COMMANDS) == {"train", "retrieve", "warmup", "evaluate", "predict"}
    assert all((cli.SCRIPTS / c.script).exists() for c in cli.COMMANDS.values())


def test_dro_rl_predict_and_evaluate_run_the_scripts(run, inputs, tmp_path, capsys):
    questions, corpus = inputs
    assert cli.main([]) == 0 and "predict" in capsys.readouterr().out
    output = tmp_path / "via_cli.jsonl"
    assert cli.main(["predict", "--run_dir", str(run), "--input", str(questions), "--corpus", str(corpus),
                     "--output", str(output)]) == 0
    direct = tmp_path / "direct.jsonl"
    predict_main(PredictArguments(run_dir=str(run), input=str(questions), corpus=str(corpus), output=str(direct)))
    assert output.read_text() == direct.read_text()
    # flags reach the script's own checks: a prompt flag against the run's settings is refused by name
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--run_dir", str(run), "--datasets", str(questions), "--repeat_ids", "false"])
    refusal = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and refusal[-1].startswith("evaluate.py: error: --repeat_ids False contradicts")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--help"])
    assert exit_info.value.code == 0 and "--run_dir" in capsys.readouterr().out


def test_dro_rl_train_hands_launch_flags_to_accelerate_and_the_rest_to_the_script(monkeypatch):
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the DDP config is for GPUs
    cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--max_steps", "3", "--num_processes", "2",
              "--accelerate_config", "ddp"])
    (args,) = launched
    assert args.num_processes == 2 and args.config_file == str(ROOT / "configs" / "accelerate" / "ddp.yaml")
    assert args.training_script == str(ROOT / "scripts" / "train_rl.py")
    assert args.training_script_args == ["--config", str(ROOT / "configs" / "demo.yaml"), "--max_steps", "3"]


def test_dro_rl_train_names_a_flag_neither_the_script_nor_accelerate_knows(monkeypatch, capsys):
    """It went to accelerate's parser, whose refusal printed its whole usage and no hint."""
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--max_stepz", "3", "--num_processes", "1", "--mixed_precison", "no"])
    assert stop.value.code == 2 and not launched  # a parser's refusal, as the scripts' own (it was 1)
    assert capsys.readouterr().err == (
        "dro-rl train: error: unknown arguments (neither train_rl.py's settings nor accelerate launch's flags): "
        "--max_stepz --mixed_precison; did you mean --max_steps for --max_stepz, --mixed_precision for "
        "--mixed_precison? (see --help)\n")


def test_dro_rl_train_with_num_processes_on_a_cpu_starts_that_many_processes(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    """Without a GPU and a launch mode, accelerate ran `--num_processes 2` as one process, without a word."""
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--num_processes", "2"])
    # accelerate's multi-process launcher, telling the processes they run on the CPU (without it, and without
    # use_cpu, transformers trained each process on its own: two unsynchronised runs in one folder)
    assert launched[0].num_processes == 2 and launched[0].multi_gpu and os.environ["ACCELERATE_USE_CPU"] == "true"
    cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml")])
    assert not launched[1].multi_gpu  # one process: nothing to add


def test_dro_rl_train_returns_the_scripts_status_without_the_launchers_traceback(monkeypatch):
    """The launched script has printed its one-line refusal; accelerate's CalledProcessError would add a traceback."""
    import subprocess

    def failed(args):
        raise subprocess.CalledProcessError(1, ["python", args.training_script])

    monkeypatch.setattr("accelerate.commands.launch.launch_command", failed)
    assert cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml")]) == 1


def test_dro_rl_train_with_no_flags_launches_the_demo_like_the_script(monkeypatch):
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    cli.main(["train"])  # the script itself adds configs/demo.yaml; nothing here may refuse its defaults
    assert launched[0].training_script_args == [] and launched[0].num_processes is None


def test_dro_rl_warmup_launches_its_script(monkeypatch):
    """It failed every time, --help included: the script's dataclass, loaded under another module name, had
    annotations nothing could resolve."""
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    cli.main(["warmup", "--data", "d.jsonl", "--role", "generator", "--output_dir", "w", "--num_processes", "2"])
    assert launched[0].training_script == str(ROOT / "scripts" / "warmup_sft.py") and launched[0].num_processes == 2
    assert launched[0].training_script_args == ["--data", "d.jsonl", "--role", "generator", "--output_dir", "w"]


@pytest.mark.parametrize("name, message", [
    ("fsdp", r"fsdp.yaml is an accelerate config for GPUs \(FSDP, 8 processes, bf16\), and this machine has no CUDA "),
    ("single_gpu", r"single_gpu.yaml is an accelerate config for GPUs \(one process, bf16\)"),  # was "(NO, 1 processes)"
    ("deepspeed", r"--accelerate_config deepspeed: neither a file nor a config name \(ours: ddp, fsdp, single_gpu"),
])
def test_an_accelerate_config_that_cannot_run_here_is_refused_in_one_line(monkeypatch, capsys, name, message):
    """On a CPU the FSDP config started 8 plain DDP processes (its sharding and bf16 dropped without a word); an
    unknown name ended in TRL's traceback."""
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--accelerate_config", name])
    assert stop.value.code == 1 and not launched
    assert re.search(r"^dro-rl train: error: .*" + message, capsys.readouterr().err)


def test_a_cpu_accelerate_config_starts_its_processes_and_num_processes_below_one_is_refused(monkeypatch, tmp_path,
                                                                                               capsys):
    """A MULTI_CPU config of 2 processes, and --num_processes 0, each ran ONE process without a word."""
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    config = tmp_path / "cpu2.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\nuse_cpu: true\n")
    cli.main(["train", "--accelerate_config", str(config)])
    assert launched[0].multi_gpu and launched[0].num_processes == 2  # accelerate's gloo launcher, as for the flag
    with pytest.raises(SystemExit):
        cli.main(["train", "--num_processes", "0"])
    assert "dro-rl train: error: --num_processes must be >= 1, got 0" in capsys.readouterr().err and len(launched) == 1


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_dro_rl_train_interrupted_on_several_processes_says_so_in_one_line(monkeypatch, capsys, signal_name, status):
    """torch elastic's launcher turns Ctrl-C (and SIGTERM) into a SignalException: it ended in its traceback, with
    status 1 and no word of how to resume."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    def interrupted(args):
        raise SignalException("Process 1 got signal: 2", sigval=signal.Signals[signal_name])

    monkeypatch.setattr("accelerate.commands.launch.launch_command", interrupted)
    assert cli.main(["train", "--num_processes", "2"]) == status
    assert capsys.readouterr().err == ("\ndro-rl train: interrupted; the same command with --resume_from_checkpoint "
                                       "true reuses the finished stages and continues DRO from its newest complete "
                                       "checkpoint\n")


def test_dro_rl_train_interrupted_on_one_process_says_how_to_resume(monkeypatch, capsys):
    """accelerate's one-process launcher lets Ctrl-C through as KeyboardInterrupt: the line had no resume hint."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("accelerate.commands.launch.launch_command", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train"])
    assert stop.value.code == 130 and capsys.readouterr().err.endswith("dro-rl train: interrupted; the same command "
                                                                       "with --resume_from_checkpoint true reuses the "
                                                                       "finished stages and continues DRO from its "
                                                                       "newest complete checkpoint\n")


def test_dro_rl_train_on_several_processes_returns_the_first_failures_status_in_one_line(monkeypatch, capsys,
                                                                                         tmp_path):
    """Each process has printed its refusal; torch elastic's ChildFailedError added its traceback and a 35-line
    table."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(exitcodes: dict[int, int]):
        def launch_command(args):
            failures = {rank: ProcessFailure(rank, 100 + rank, code, str(tmp_path / "none")) for rank, code in
                        exitcodes.items()}
            for order, failure in enumerate(failures.values()):  # in the order given
                failure.timestamp = order
            raise ChildFailedError(args.training_script, failures)
        return launch_command

    monkeypatch.setattr("accelerate.commands.launch.launch_command", failed({0: 1, 1: 1}))
    assert cli.main(["train", "--num_processes", "2"]) == 1
    assert capsys.readouterr().err == "dro-rl train: ranks 0, 1 failed (exit status 1)\n"
    # a two-process refusal on rank 1, as torch elastic reported it: rank 0's SIGTERM stamped first. It was named
    # "rank 0 failed (signal SIGTERM); rank 1 ended (exit status 1)", the wrong way round.
    monkeypatch.setattr("accelerate.commands.launch.launch_command", failed({0: -15, 1: 1}))
    assert cli.main(["warmup", "--data", "d.jsonl", "--role", "generator", "--num_processes", "2"]) == 1
    assert capsys.readouterr().err == "dro-rl warmup: rank 1 failed (exit status 1); rank 0 ended (signal SIGTERM)\n"
    monkeypatch.setattr("accelerate.commands.launch.launch_command", failed({0: -9, 1: -15}))  # killed from outside
    assert cli.main(["train", "--num_processes", "2"]) == 137
    assert capsys.readouterr().err == ("dro-rl train: rank 0 failed (signal SIGKILL); rank 1 failed (signal "
                                       "SIGTERM)\n")


@pytest.mark.parametrize("command, setting", [("train", "--max_steps"), ("warmup", "--role")])
def test_dro_rl_training_help_names_the_launch_flags_it_takes_too(capsys, command, setting):
    """--help listed the script's settings only, not --num_processes and the other flags it hands to accelerate."""
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert stop.value.code == 0 and first.startswith(f"dro-rl {command} also takes accelerate launch's flags: "
                                                     "--num_processes N, --accelerate_config <file, or ddp, fsdp")
    assert "--mixed_precision" in first and f"  {setting} " in rest
