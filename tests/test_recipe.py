"""The training command: resume, run folders, evaluation during training, every shipped recipe, settings refused
before any work starts."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from train_rl import main, make_parser  # noqa: E402

from dro_rl import DROConfig, DROTrainer  # noqa: E402
from dro_rl.data import DataError  # noqa: E402
from dro_rl.recipe import prepare, with_default_config  # noqa: E402
from dro_rl.report import build_report, format_table  # noqa: E402
from dro_rl.warmup import warmup_config  # noqa: E402
from tiny_run import tiny_config, tiny_task  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
HOTPOT = SHARED / "hotpotqa_dev300" / "hotpotqa_distractor_dev300.jsonl"
needs_shared = pytest.mark.skipif(not HOTPOT.exists(), reason="needs ../shared/data")

# The demo recipe shrunk to seconds: 32 training and 8 evaluation questions, a 2-step warm-up.
TINY_DEMO = ["--config", str(ROOT / "configs" / "demo.yaml"), "--demo_num_train", "32", "--demo_num_eval", "8",
             "--generator_warmup_steps", "2", "--per_device_train_batch_size", "16", "--logging_steps", "1",
             "--disable_tqdm", "true", "--retriever", "bm25"]


def parse(*argv):
    return make_parser().parse_args_and_config(args=list(argv))


def run(*argv):
    return main(*parse(*argv))


def trainer(args, dataset=None) -> DROTrainer:
    """A DROTrainer on the tiny task (fresh models each time)."""
    rows, tok, selector, generator = tiny_task()
    return DROTrainer(model=selector, generator=generator, args=args, train_dataset=rows if dataset is None else dataset,
                      processing_class=tok, generator_processing_class=tok)


def tree_digest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_continues_at_the_next_step_and_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    first, bars = capsys.readouterr()
    assert "warm-up: generator SFT" in first and "retrieval: ranking" in first
    # --disable_tqdm true (a log file) silences every stage's bars: warm-up, evaluations, loading and writing weights
    assert "it/s]" not in bars and "%|" not in bars, bars[:300]
    assert json.loads((out / "report.json").read_text())["resumed"] is False and "resumed the run" not in first
    assert json.loads((out / "run_config.json").read_text())["resolved"] == {"generator_scoring": "in_loss"}
    saved = {name: tree_digest(out / name) for name in ("checkpoint-2", "checkpoint-4", "data", "warmup")}

    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
        "--resume_from_checkpoint", str(out / "checkpoint-4"))
    second = capsys.readouterr().out
    assert "warm-up: generator SFT" not in second and "retrieval: ranking" not in second
    assert "data: reusing" in second and "evaluation (before DRO): reusing" in second
    assert "warm-up: reusing the generator in" in second  # the user is told which stages and checkpoint are reused
    assert any(line.startswith("resume: DRO continues from") and line.split()[4].rstrip(";").endswith("checkpoint-4")
               for line in second.splitlines())
    # the final models are step 6's now: the "after" figures of step 4's models are not reused for them
    assert "models of step 4, these are step 6: evaluating again" in second
    assert json.loads((out / "eval_after.json").read_text())["dro_step"] == 6
    # the report's wall time is this process's, and says so: the first process's minutes are not in it
    assert json.loads((out / "report.json").read_text())["resumed"] is True
    assert "(this process, which resumed the run: the earlier processes' time is not in it)" in second
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "selector/loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-4 restored from checkpoint-4, then 5 and 6: not a restart at step 1
    for name, files in saved.items():  # the first run's checkpoints and stages are untouched
        assert tree_digest(out / name) == files, name


def test_a_run_of_tiny_named_models_with_a_warm_up_resumes(tmp_path):
    """The checkpoint recorded the generator built from `tiny:minilm` without a name, the resume its warm-up read back
    under the name 'tiny:minilm': every such run was refused as 'different settings'."""
    out = tmp_path / "run"
    common = [*TINY_DEMO, "--model_name_or_path", "tiny:minilm", "--output_dir", str(out), "--save_strategy", "steps",
              "--save_steps", "1"]
    run(*common, "--max_steps", "1")
    run(*common, "--max_steps", "2", "--resume_from_checkpoint", "true")
    assert (out / "checkpoint-2").is_dir()


def test_resume_true_picks_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    (out / "checkpoint-2" / "checkpoint_complete").unlink()  # as if killed while saving checkpoint-2
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
        "--resume_from_checkpoint", "true")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "selector/loss" in h] == [1, 2, 3]  # resumed after step 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-step tiny demo run with checkpoint-2, made once; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    return out


def test_resuming_a_run_stopped_after_its_last_save_trains_no_further_step(tmp_path, finished_run):
    """A run stopped during its "after" evaluation (the H200 run of docs/real_model.md) has a checkpoint at max_steps:
    resuming evaluates that checkpoint's models. The Trainer's loop alone would take one more step (checkpoint-3),
    and the "after" figures would describe models the run never meant to train."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for name in ("eval_after.json", "report.json"):
        (out / name).unlink()
    saved = {role: load_file(out / "checkpoint-2" / role / "model.safetensors") for role in ("selector", "generator")}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--resume_from_checkpoint", "true")
    assert not (out / "checkpoint-3").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"] == history  # the closing summary kept, for the curves
    assert json.loads((out / "eval_after.json").read_text())["dro_step"] == 2 and (out / "report.json").exists()
    for role, tensors in saved.items():
        final = load_file(out / role / "model.safetensors")
        assert all(torch.equal(final[key], value) for key, value in tensors.items()), role


@pytest.mark.parametrize("flag,value,name", [
    ("--num_docs_selected", "3", "num_docs_selected"),
    ("--num_generations", "2", "num_generations"),
    ("--estimator", "dro", "estimator"),
    ("--entropy_coef", "0.5", "entropy_coef"),         # TRL's field, DRO's loss: run-defining too
    ("--shuffle_candidates", "true", "shuffle_candidates"),
    ("--demo_num_train", "48", "demo_num_train"),      # another dataset
    ("--demo_hidden_size", "32", "demo_hidden_size"),  # another model
])
def test_resume_with_a_changed_setting_is_refused_by_name(tmp_path, finished_run, flag, value, name):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = tree_digest(out)
    with pytest.raises(ValueError, match=name):
        run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "4", flag, value,
            "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert tree_digest(out) == before  # refused before touching anything


def test_resume_refuses_a_data_file_edited_in_place(tmp_path):
    """A resumed run reuses its own copy of the data (data/): a file changed under the same path must be refused,
    not trained on in its old form without a word."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answers": ["a"], "passages": [{"text": "p"}]}) + "\n")
    argv = ("--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--model_name_or_path", "tiny:minilm",
            "--use_cpu", "true", "--bf16", "false")
    prepare(*parse(*argv))
    prepare(*parse(*argv, "--resume_from_checkpoint", "true"))  # the same file: resumes
    data.write_text(data.read_text().replace('"a"', '"b"'))
    with pytest.raises(ValueError, match="dataset: the file changed since the run read it"):
        prepare(*parse(*argv, "--resume_from_checkpoint", "true"))


def test_python_api_resume_with_another_k_or_dataset_is_refused(tmp_path):
    trainer(tiny_config(str(tmp_path), save_strategy="steps", save_steps=2)).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="num_docs_selected: checkpoint 2, now 1"):
        trainer(tiny_config(str(tmp_path), max_steps=4, num_docs_selected=1)).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ValueError, match="train_dataset"):
        trainer(tiny_config(str(tmp_path), max_steps=4), tiny_task()[0].select(range(16))).train(
            resume_from_checkpoint=checkpoint)


def test_resume_may_change_where_the_generator_is_scored(tmp_path):
    """``generator_scoring`` changes where log p(y | x, d_z) is computed, not what a step computes: a checkpoint written
    scoring in the loss resumes with a separate scoring pass and continues as the uninterrupted run."""
    whole = trainer(tiny_config(str(tmp_path / "whole"), max_steps=4))
    whole.train()
    trainer(tiny_config(str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=2)).train()
    resumed = trainer(tiny_config(str(tmp_path / "run"), max_steps=4, generator_scoring="separate"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert whole.args.scores_in_loss and not resumed.args.scores_in_loss
    logs = [[h for h in t.state.log_history if "selector/loss" in h] for t in (whole, resumed)]
    assert [h["step"] for h in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs):
        for key in ("selector/loss", "generator/loss", "selector/ranking_logprob", "weights/ess"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_resume_skips_a_checkpoint_with_a_truncated_weights_file(tmp_path, caplog):
    trainer(tiny_config(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2)).train()
    weights = tmp_path / "checkpoint-4" / "generator" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # marker present, file cut short

    resumed = trainer(tiny_config(str(tmp_path), max_steps=4))
    with pytest.raises(ValueError, match=str(weights)):  # an explicit path: named, not resumed
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed.train(resume_from_checkpoint=True)  # the newest *usable* checkpoint, checkpoint-2, with a warning
    assert resumed.state.global_step == 4
    assert "passing over" in caplog.text and "checkpoint-4" in caplog.text


@pytest.mark.parametrize("damage", ["optimizer.pt", "rng_state.pth", "trainer_state.json", "dro_run.json"])
def test_resume_passes_over_a_checkpoint_whose_trainer_files_were_cut_or_removed(tmp_path, caplog, damage):
    """The marker checked the models only: resume took the newest checkpoint and crashed in torch's reader
    ('PytorchStreamReader failed'), a FileNotFoundError, or 'not written by this version of dro-rl'."""
    trainer(tiny_config(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2)).train()
    path = tmp_path / "checkpoint-4" / damage
    if damage.endswith(".json"):
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:10])
    resumed = trainer(tiny_config(str(tmp_path), max_steps=4))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert f"passing over {tmp_path / 'checkpoint-4'}" in caplog.text and damage in caplog.text


def test_resuming_an_older_checkpoint_says_the_newer_ones_will_be_replaced(tmp_path, caplog):
    trainer(tiny_config(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2)).train()
    trainer(tiny_config(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2)).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "the newer checkpoint-4" in caplog.text and "will be replaced" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Output folders holding another run
# ---------------------------------------------------------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = tree_digest(out)
    with pytest.raises(ValueError, match="already holds a run"):
        run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--seed", "1")
    assert tree_digest(out) == before


def test_a_users_own_readme_in_the_output_dir_is_neither_a_run_nor_replaced(tmp_path, capsys):
    """It was taken for a run ('already holds a run (README.md)'), and each way out offered — overwrite, resume —
    replaced it with the model card; the resume's report said "resumed" for a fresh run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    for flags in ([], ["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"]):
        with pytest.raises(ValueError, match=r"README.md was not written by a dro-rl run, and the run's model card is "
                                             r"saved as README.md: move the file"):
            run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1", *flags)
    assert (out / "README.md").read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == ["README.md"]

    (out / "README.md").unlink()
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1", "--resume_from_checkpoint", "true")
    assert "holds no run yet: starting a new one" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["resumed"] is False


def test_files_named_as_a_runs_that_no_run_wrote_are_neither_replaced_nor_removed(tmp_path):
    """A user's report.json, curves.png and data/train.jsonl read as 'already holds a run', and the way out offered,
    --overwrite_output_dir, deleted them."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    for name in ("report.json", "curves.png", "data/train.jsonl"):
        (out / name).write_text("mine")
    for flags in ([], ["--overwrite_output_dir", "true"]):
        with pytest.raises(ValueError, match="holds report.json, curves.png, data, names a run writes, but no run's "
                                             "record"):
            run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1", *flags)
    assert all((out / name).read_text() == "mine" for name in ("report.json", "curves.png", "data/train.jsonl"))


def test_a_start_that_stopped_before_its_data_stage_does_not_block_the_next(tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?"}\n')  # no answers: the data stage refuses it after run_config.json is written
    with pytest.raises(DataError, match="bad.jsonl:1"):
        run(*TINY_DEMO, "--output_dir", str(out), "--dataset", str(bad))
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1")  # the corrected command needs no overwrite flag
    assert "starting over" in capsys.readouterr().out and (out / "selector").is_dir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a run"):  # a run that did work is still protected
        run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1")


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / "mine.txt").write_text("mine")  # named like a checkpoint, but no run wrote it
    (out / "data" / "mydata.jsonl").write_text("mine")  # a user's file beside the run's rows
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1", "--overwrite_output_dir", "true")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-99"]  # the earlier run's are gone
    assert (out / "notes.txt").read_text() == (out / "checkpoint-99" / "mine.txt").read_text() == "mine"
    assert (out / "data" / "mydata.jsonl").read_text() == "mine"
    # the run's data/skipped.json went with its rows: only the user's file is named as kept
    assert "kept mydata.jsonl in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no complete checkpoint"):
        run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--resume_from_checkpoint", "true")


def test_python_api_refuses_an_output_dir_with_checkpoints(tmp_path):
    args = tiny_config(str(tmp_path), save_strategy="steps", save_steps=2)
    trainer(args).train()
    with pytest.raises(ValueError, match="already holds a run"):
        trainer(args).train()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation during training, and every shipped recipe
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluation_during_training_logs_eval_metrics(tmp_path):
    out = tmp_path / "run"
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_support_recall_at_k" in h]
    assert [h["step"] for h in evals] == [1, 2] and all(0 <= h["eval_answer_em"] <= 1 for h in evals)


def recipe_files():
    files = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
    assert files
    return files


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipe_files(), ids=lambda p: p.stem)
def test_every_recipe_starts_with_tiny_overrides(tmp_path, recipe):
    """Each shipped recipe, as written, with only the model, data and length shrunk: a recipe that cannot start
    fails here."""
    overrides = ["--config", str(recipe), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                 "--disable_tqdm", "true", "--use_cpu", "true", "--bf16", "false", "--logging_steps", "1",
                 "--gradient_accumulation_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                 "--eval_steps", "1", "--max_passage_tokens", "16", "--generator_max_passage_tokens", "16"]
    script_args, dro, model_args = parse(*overrides, "--use_cpu", "true")
    overrides += ["--per_device_train_batch_size", str(dro.num_generations)]  # one question per step
    if script_args.dataset != "demo":
        overrides += ["--dataset", f"hotpotqa:{HOTPOT}", "--eval_dataset", f"hotpotqa:{HOTPOT}",
                      "--max_train_questions", "4", "--max_eval_questions", "2", "--model_name_or_path", "tiny:minilm",
                      "--load_in_4bit", "false", "--dtype", "float32", "--retriever", "bm25"]
        if dro.generator_model_name_or_path:
            overrides += ["--generator_model_name_or_path", "tiny:minilm"]
        if script_args.generator_warmup_steps:
            overrides += ["--generator_warmup_steps", "1"]
    else:
        overrides += ["--demo_num_train", "16", "--demo_num_eval", "4", "--generator_warmup_steps", "1"]
    report = run(*overrides)
    assert 0.0 <= report["rows"]["selector after DRO"]["support_recall_at_k"]["mean"] <= 1.0
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# Which settings apply: the demo's only to the demo
# ---------------------------------------------------------------------------------------------------------------------


def test_user_data_without_config_gets_the_documented_defaults_not_the_demos():
    assert with_default_config(["--dataset", "x.jsonl"]) == ["--dataset", "x.jsonl"]
    assert with_default_config([])[:2] == ["--config", str(ROOT / "configs" / "demo.yaml")]
    assert with_default_config(["--dataset=demo"])[0] == "--config"
    _, dro, _ = parse("--dataset", str(HOTPOT), "--use_cpu", "true", "--bf16", "false")
    assert (dro.learning_rate, dro.num_docs_selected, dro.use_chat_template, dro.repeat_ids) == (1e-5, 5, True, False)
    assert (dro.num_generations, dro.per_device_train_batch_size) == (8, 8)  # README: one question per step
    assert dro.lr_scheduler_type == DROConfig(output_dir="x", use_cpu=True, bf16=False).lr_scheduler_type


@needs_shared
def test_own_data_without_a_model_name_says_it_trains_the_demos_tiny_models(tmp_path, capsys):
    """It did so in silence: a user took the run for a trained model."""
    run("--dataset", f"hotpotqa:{HOTPOT}", "--max_train_questions", "4", "--output_dir", str(tmp_path),
        "--max_steps", "1", "--num_docs_selected", "2", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--max_passage_tokens", "16", "--generator_max_passage_tokens", "16", "--use_cpu", "true", "--bf16", "false",
        "--disable_tqdm", "true", "--retriever", "bm25")
    assert re.search(r"models: no --model_name_or_path, so both are the demo's tiny random models \(2 layers, 64 "
                     r"wide\) over a \d+-word tokenizer of this data: a smoke run", capsys.readouterr().out)


@needs_shared
def test_a_run_without_an_eval_set_says_so(tmp_path, capsys):
    run("--dataset", f"hotpotqa:{HOTPOT}", "--max_train_questions", "4", "--model_name_or_path", "tiny:minilm",
        "--output_dir", str(tmp_path), "--max_steps", "1", "--use_cpu", "true", "--bf16", "false",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--num_docs_selected", "2",
        "--max_passage_tokens", "8", "--generator_max_passage_tokens", "8", "--retriever", "bm25",
        "--disable_tqdm", "true")
    out = capsys.readouterr().out
    assert "no evaluation set" in out and "| selection |" not in out


# ---------------------------------------------------------------------------------------------------------------------
# Settings checked before any work starts
# ---------------------------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["--num_generations", "0"], "num_generations"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "-0.7"], "temperature"),
    (["--max_passage_tokens", "0"], "max_passage_tokens"),
    (["--generator_max_passage_tokens", "-3"], "generator_max_passage_tokens"),
    (["--top_n", "0"], "top_n"),
    (["--report_to", "wandb"], "wandb"),
    (["--report_to", "foo"], r"report_to=\['foo'\]: no integration of that name"),  # offered `pip install dro-rl[foo]`
    (["--top_p", "0.9"], "top_p"),
    (["--top_k", "5"], "top_k"),
    (["--min_p", "0.1"], "min_p"),
    (["--repetition_penalty", "1.2"], "repetition_penalty"),
    (["--num_iterations", "2"], "num_iterations"),
    (["--loss_type", "grpo"], "loss_type"),
    (["--epsilon", "0.3"], "epsilon"),
    (["--use_adaptive_entropy", "true"], "use_adaptive_entropy"),
    (["--entropy_coef", "-0.1"], "entropy_coef must be a finite number >= 0"),
    (["--beta", "0.04"], "beta"),
    (["--use_vllm", "true"], "use_vllm"),
    (["--model_name_or_path", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
    (["--output_dir", "/proc/forbidden"], "cannot write in /proc/forbidden"),
    (["--dataset", "hotpotqa:/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--num_docs_selected", "9"], "demo training question 1 .* 8 candidates, fewer than the 9 needed"),
    (["--max_steps", "-5"], "max_steps must be >= 1, or -1"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1, got 0"),
    *([(["--bf16", "true", "--use_cpu", "false"], "bf16: true needs a GPU with bf16, and this machine has none")]
      if not torch.cuda.is_available() else []),
    (["--fp16", "true", "--use_cpu", "true"], "fp16: true has no effect on a CPU"),  # recorded fp16, trained float32  # a GPU recipe on a CPU: transformers' "setup doesn't support bf16"
    # tracebacks before: after the data stage (batch size 0, seed -1, a tiny: model over a tokenizer that is not
    # there), inside TRL (a ZeroDivisionError), or never (save_steps 0 saved nothing)
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
    (["--seed", "-1"], "seed must be between 0 and 2..32 - 1"),
    (["--save_strategy", "steps", "--save_steps", "0"], "save_steps must be > 0 with save_strategy: steps"),
    (["--model_name_or_path", "tiny:bogus"], "model 'tiny:bogus' is a tiny model over the tokenizer of 'bogus'"),
    (["--generator_model_name_or_path", "smollm2-135m"], "without model_name_or_path"),  # was silently unused
    # refused only after retrieval and the models had loaded, or (the metric) at the first save after an evaluation
    (["--reward_funcs", "nosuch"], "unknown reward 'nosuch'"),
    (["--metric_for_best_model", "nosuch"], "metric_for_best_model='nosuch' is not a metric"),
    (["--share_base_model", "true", "--generator_warmup_steps", "0"], "share_base_model needs LoRA adapters"),
    (["--load_in_4bit", "true", "--use_peft", "true"], "load_in_4bit: quantised .QLoRA. training needs a CUDA GPU"),
    # an outside try of every setting: accepted with no effect (or a wrong one), or refused only after the warm-up
    (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0 when max_steps is -1"),
    (["--weight_decay", "-0.1"], "weight_decay must be a finite number >= 0"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be a finite number >= 0"),
    (["--adam_beta1", "2"], r"adam_beta1 must be in \[0, 1\)"),
    (["--data_seed", "5"], "data_seed=5: DRO does not use this setting"),
    (["--label_smoothing_factor", "0.5"], "label_smoothing_factor=0.5: DRO does not use"),
    (["--train_sampling_strategy", "sequential"], "train_sampling_strategy='sequential': DRO does not use"),
    (["--use_liger_kernel", "true"], "use_liger_kernel=True: DRO does not use"),
    (["--deepspeed", "ds.json"], "DeepSpeed is not supported by DROTrainer"),
    (["--push_to_hub", "true"], "push_to_hub: true needs the Hugging Face Hub, and HF_HUB_OFFLINE=1 is set"),
    (["--dtype", "bfloat16"], "dtype=bfloat16: the demo's and `tiny:` models are built from a config in float32"),
    (["--use_peft", "true", "--lora_r", "0"], "lora_r must be >= 1, got 0"),
    (["--use_peft", "true", "--lora_dropout", "1.5"], r"lora_dropout must be in \[0, 1\), got 1.5"),
    (["--retriever", "dense", "--retriever_model", "nonexistent/model"], "retriever_model 'nonexistent/model' "
                                                                         "cannot be resolved"),
    (["--demo_two_hop_fraction", "1.5"], r"demo_two_hop_fraction is a share, in \[0, 1\]"),
    (["--demo_num_people", "3"], r"demo_num_people must be >= demo_num_candidates \(8\)"),  # looped for ever
    (["--demo_hidden_size", "0"], "demo_hidden_size must be a positive multiple of 8"),
    (["--warmup_learning_rate", "-1"], "warmup_learning_rate must be a finite number > 0, got -1"),
]


@pytest.mark.parametrize("flags,name", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_a_wrong_setting_stops_the_run_before_any_stage(tmp_path, flags, name):
    out = tmp_path / "run"
    with pytest.raises((ValueError, OSError), match=name):
        run(*TINY_DEMO, "--output_dir", str(out), *flags)
    assert not (out / "data").exists()  # nothing ran: no retrieval, no warm-up


def test_the_warm_up_runs_in_the_runs_precision():
    """The warm-up's SFTConfig did not carry fp16, so its Trainer set up Accelerate without it and DRO's Trainer then
    stopped with "AcceleratorState has already been initialized ... pass mixed_precision='fp16'" (seen on a CPU with
    use_cpu, where fp16 is now refused as having no effect: an fp16 run needs a GPU)."""
    from dro_rl.warmup import warmup_config

    dro = DROConfig(output_dir="x", use_cpu=True, bf16=False, fp16=True, report_to="none")
    assert warmup_config("w", 4, 2, 1e-4, dro).fp16 is True
    assert warmup_config("w", 4, 2, 1e-4, DROConfig(output_dir="x", use_cpu=True, bf16=False)).fp16 is False


def test_fewer_training_questions_than_one_step_samples_are_refused_before_the_warm_up(tmp_path):
    """8 questions and 16 per step: TRL's sampler dropped the incomplete batch, and the run 'finished' after 0 steps
    with a report of the untrained models."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"the training set has 3 questions, fewer than the 4 that one step samples "
                                         r"\(per_device_train_batch_size 16 x steps_per_generation 1 x 1 process"):
        run(*TINY_DEMO, "--output_dir", str(out), "--demo_num_train", "3")
    assert not (out / "warmup").exists()


def test_a_prompt_length_too_small_for_the_prompts_is_refused_before_the_warm_up(tmp_path):
    """It needs the tokenizers, so it cannot be refused with the other settings; it was refused at DRO's first step,
    after the warm-up and the "before" evaluation had run."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="the selector prompt needs .* tokens before any passage text, leaving no room "
                                         "for 8 passages in max length 10"):
        run(*TINY_DEMO, "--output_dir", str(out), "--max_prompt_length", "10")
    assert (out / "data").exists() and not (out / "warmup").exists() and not (out / "eval_before.json").exists()
    # the corrected command starts over there (it was told to resume, which refused the changed setting)
    run(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "1")
    assert (out / "report.json").exists()


def test_a_missing_data_file_is_refused_with_the_setting_that_names_it(tmp_path):
    """A recipe names three files; "data file not found: x" left the user to find which setting (or YAML key) it was."""
    with pytest.raises(FileNotFoundError, match=r"^eval_dataset: data file not found: .*nosuch.jsonl$"):
        run(*TINY_DEMO, "--output_dir", str(tmp_path / "run"), "--eval_dataset", f"hotpotqa:{tmp_path}/nosuch.jsonl")
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused_as_a_file(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a folder"):  # was: "not writable (File exists)"
        run(*TINY_DEMO, "--output_dir", str(taken))
    assert taken.read_text() == "mine\n"


@pytest.mark.parametrize("yaml_text,name", [
    ("num_docs_selected: 2.0\n", "num_docs_selected must be an integer"),
    ("max_steps: 3.5\n", "max_steps must be an integer"),
    ("reward_funcs: log_likelihood\n", "reward_funcs must be a list"),
    ("repeat_ids: 3\n", "repeat_ids must be true or false"),
    ("max_train_questions: 2.5\n", "max_train_questions must be an integer"),
    ("entropy_coef: true\n", "entropy_coef must be a number, got True"),
    ("entropy_coef: [0.1]\n", "entropy_coef must be a number, got \\[0.1\\]"),
    ("sample_without_replacement: 0\n", "sample_without_replacement must be true or false, got 0 \\(int\\)"),
    ("sample_without_replacement: null\n", "sample_without_replacement cannot be null"),  # resume then failed
    # a choice the command line's parser would refuse; from YAML it failed after retrieval and the generator warm-up,
    # and its folder could then not be resumed with the value mended
    ("selector_warmup_target: bogus\n", "selector_warmup_target must be one of retrieval, gold_first, best_reward"),
    ("selector_warmup_target: null\n", "selector_warmup_target cannot be null"),
    ("estimator: DRO\n", "estimator must be one of dro, dro_baseline"),
])
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, yaml_text, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\n{yaml_text}")
    with pytest.raises(ValueError, match=name):
        parse("--config", str(path))


def test_malformed_file_rows_are_named_or_skipped_by_on_bad_row(tmp_path):
    """Rows the loader rejects and rows with fewer than K candidates: an error naming the file and row before any
    stage runs, or with on_bad_row skip, counted and left out."""
    from dro_rl.recipe import RecipeArguments, data_stage

    good = [{"question": f"q{i}?", "answers": ["Paris"], "passages": [{"text": f"p{j}"} for j in range(3)]}
            for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), "{not json", json.dumps(good[1]),
                                json.dumps({**good[2], "passages": [{"text": "only one"}]}), json.dumps(good[2])]))
    args = RecipeArguments(dataset=str(path))
    with pytest.raises(ValueError, match="train.jsonl:2: not valid JSON"):
        data_stage(args, tiny_config(str(tmp_path / "a"), retriever="none"))
    rows, _ = data_stage(args, tiny_config(str(tmp_path / "b"), retriever="none", on_bad_row="skip"))
    assert [r["question"] for r in rows] == ["q0?", "q1?", "q2?"]
    # the run keeps what it skipped, for the report, the model card and whoever reads the folder later
    skipped = json.loads((tmp_path / "b" / "data" / "skipped.json").read_text())
    assert (skipped["train"]["kept"], skipped["train"]["skipped"], skipped["eval"]["skipped"]) == (3, 2, 0)
    assert "train.jsonl:2: not valid JSON" in skipped["train"]["reasons"][0]
    assert "1 candidate, fewer than the 2 needed" in skipped["train"]["reasons"][1]
    report = build_report({}, {}, 1.0, {}, skipped)
    assert report["data"] == {"train": {"kept": 3, "skipped": 2}, "eval": {"kept": 0, "skipped": 0}}
    assert "rows skipped as malformed (on_bad_row: skip; which and why: data/skipped.json): train 2 of 5 read, " \
        "eval 0 of 0 read" in format_table(report)
    args.max_train_questions = 4  # "of 4" is then a read limit, not the file's size: the table says so
    data_stage(args, tiny_config(str(tmp_path / "b4"), retriever="none", on_bad_row="skip"))
    report = build_report({}, {}, 1.0, {}, json.loads((tmp_path / "b4" / "data" / "skipped.json").read_text()))
    assert report["data"]["train"] == {"kept": 2, "skipped": 2, "read_limit": 4}
    assert "train 2 of 4 read (at most 4: --max_train_questions), eval 0 of 0 read" in format_table(report)
    args.max_train_questions = None
    path.write_text("\n".join(json.dumps(r) for r in [good[0], {**good[2], "passages": [{"text": "only one"}]}]))
    with pytest.raises(ValueError, match=r"train.jsonl question 2 .* 1 candidate, fewer than the 2 needed"):
        data_stage(args, tiny_config(str(tmp_path / "c"), retriever="none"))


def test_help_shows_the_documented_defaults_not_the_demos():
    assert with_default_config(["--help"]) == ["--help"] and with_default_config(["-h"]) == ["-h"]


def test_help_lists_dro_settings_first_and_marks_unused_grpo_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.index("DRO settings") < text.index("Inherited from GRPOConfig")
    entry = lambda flag: text[text.index(f"  --{flag} "):].split("\n  --")[0]  # noqa: E731  (not the usage line)
    assert text.index("  --num_docs_selected ") < text.index("  --learning_rate ")
    assert "not used by DRO" in entry("top_p") and "not used by DRO" in entry("beta")
    assert "not used by DRO" not in entry("temperature") and "not used by DRO" not in entry("num_generations")


def test_log_completions_shows_questions_rankings_and_weights(tmp_path, capsys):
    trainer(tiny_config(str(tmp_path), max_steps=1, log_completions=True)).train()
    table = capsys.readouterr().out
    assert "which city" in table and "] > [" in table  # the question and a sampled ranking
    assert "Advantage" in table and "weight" in table


def test_report_pairs_answer_recall_of_the_selector_with_the_retrieval_order():
    """At K = 1 with two gold passages support recall is capped at 0.5: the report must carry answer recall, row by
    row and as the paired selector − retrieval difference over the same questions."""
    from dro_rl.report import build_report, format_table

    def scores(support, answer, em):
        return {"support_recall_at_k": sum(support) / len(support), "answer_recall_at_k": sum(answer) / len(answer),
                "answer_em": sum(em) / len(em), "answer_f1": sum(em) / len(em),
                "per_question": {"support_recall_at_k": support, "answer_recall_at_k": answer, "answer_em": em,
                                 "answer_f1": em}}

    retrieval = scores([0.5, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0])
    selector = scores([0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0])
    report = build_report({"retrieval": retrieval, "selector": retrieval},
                          {"retrieval": retrieval, "selector": {**selector, "n": 4}, "oracle": {**selector, "n": 2}},
                          1.0, {})
    assert report["rows"]["selector after DRO"]["answer_recall_at_k"]["mean"] == 0.75
    assert report["rows"]["retrieval top-K, warm-up generator"]["answer_recall_at_k"]["mean"] == 0.25
    difference = report["differences"]["selector_after_minus_retrieval"]
    assert difference["answer_recall_at_k"]["mean"] == 0.5 and difference["support_recall_at_k"]["mean"] == 0.125
    table = format_table(report)
    assert table.splitlines()[0] == "| selection | support recall@K | answer recall@K | answer EM | answer F1 |"
    assert "| selector after DRO | 0.500 [0.500, 0.500] | 0.750 [" in table
    assert "answer_recall_at_k 0.500 [" in table
    assert "oracle: scored on the 2 of 4 evaluation questions with gold passage labels" in table
    report["config"] = {"training": {"num_docs_selected": 1}}  # a run's report names its K
    assert format_table(report).splitlines()[0].startswith("| selection | support recall@1 | answer recall@1 |")
    # a run without a generator warm-up does not call its starting generator "warm-up generator"
    unwarmed = build_report({"retrieval": retrieval, "selector": retrieval}, {"retrieval": retrieval,
                            "selector": {**selector, "n": 4}}, 1.0, {"script": {"generator_warmup_steps": 0}})
    assert "retrieval top-K, generator before DRO (no warm-up)" in unwarmed["rows"]
    assert not any("warm-up generator" in label for label in unwarmed["rows"])
    table = format_table(unwarmed)  # nor does the paired line (report.json keeps its key)
    assert "dro pair minus generator before DRO (no warm-up) on retrieval: answer_em" in table
    assert "warmup generator" not in table and "dro_pair_minus_warmup_generator_on_retrieval" in unwarmed["differences"]


def test_a_short_warm_up_still_reaches_its_learning_rate(tmp_path):
    """The warm-up's linear ramp is 20 steps, but never more than two thirds of the warm-up (a 9-step warm-up with a
    20-step ramp would end at 45 % of its learning rate); the measured recipes' warm-ups (30, 60, 300 steps) keep 20."""
    dro = DROConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    ramps = {steps: warmup_config(str(tmp_path), steps, 4, 1e-3, dro).warmup_steps for steps in (300, 60, 30, 9, 1)}
    assert ramps == {300: 20, 60: 20, 30: 20, 9: 6, 1: 0}


def test_a_flag_value_that_does_not_parse_is_refused_in_two_lines_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        parse("--entropy_coef", "abc")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 2 and err[0].startswith("usage: ")
    assert "--entropy_coef" in err[1] and "invalid float value: 'abc'" in err[1]


def test_adapters_on_a_warmed_up_named_model_name_the_warm_up_as_their_base(tmp_path):
    """The recipe's warm-up fine-tunes the named model in place; DRO's LoRA adapters on it must name warmup/<role>
    (found from the run folder and from its checkpoints), or a loaded run puts them on the weights from before the
    warm-up — a different generator, silently. Both models share one LoraConfig, which PEFT writes the base's name
    into: the selector's adapter must still name its own base."""
    import torch

    from dro_rl.models import adapter_base, load_model
    from dro_rl.run_models import load_pair

    _, tok, model, other = tiny_task()
    base, generator_base = tmp_path / "base", tmp_path / "generator-base"
    for folder, weights in ((base, model), (generator_base, other)):
        weights.save_pretrained(folder)
        tok.save_pretrained(folder)
    out = tmp_path / "run"
    flags = [*TINY_DEMO, "--demo_num_candidates", "4", "--top_n", "4", "--model_name_or_path", str(base),
             "--generator_model_name_or_path", str(generator_base), "--use_peft", "true", "--lora_target_modules",
             "q_proj", "v_proj", "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    run(*flags, "--max_steps", "1")
    run(*flags, "--max_steps", "2", "--resume_from_checkpoint", "true")  # the warm-up read back from warmup/
    warm = str(out / "warmup" / "generator")
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert adapter_base(str(folder / "generator")) == warm
        assert adapter_base(str(folder / "selector")) == str(base)
    selector, _, generator, _ = load_pair(str(out / "selector"), str(out / "generator"))
    key = "model.layers.0.mlp.up_proj.weight"
    warmed, original = (load_model(str(path))[0].state_dict()[key] for path in (warm, generator_base))
    assert not torch.equal(warmed, original)  # the warm-up changed the weights: the test can fail
    assert torch.equal(generator.get_base_model().state_dict()[key], warmed)
    assert torch.equal(selector.get_base_model().state_dict()[key], load_model(str(base))[0].state_dict()[key])
    card = (out / "README.md").read_text()
    assert f"`warmup/generator/` in the run folder: `{generator_base}` after this run's warm-up" in card
    config = json.loads((out / "generator" / "adapter_config.json").read_text())  # as saved by an older dro-rl:
    config["base_model_name_or_path"] = str(generator_base)
    (out / "generator" / "adapter_config.json").write_text(json.dumps(config))
    (out / "checkpoint_complete").write_text("2\n")  # whose marker held the step alone
    with pytest.raises(ValueError, match="its run warmed that model up first .* \"warmup/generator\" in that file"):
        load_pair(str(out / "selector"), str(out / "generator"))


# ---------------------------------------------------------------------------------------------------------------------
# Selector warm-up targets
# ---------------------------------------------------------------------------------------------------------------------


def test_selector_warmup_targets_rank_the_intended_passages_first_whatever_the_presentation():
    """Each target's ranking, read back through the shuffled presentation, names the intended passages: the first
    stage's order, the labelled ones first, the reward's pick first, or a teacher's order."""
    from dro_rl.warmup import selector_targets

    rows = [{"id": f"q{r}", "passages": [{"id": f"p{r}{i}", "text": f"passage {r} {i}"} for i in range(5)],
             "gold": [i in golds for i in range(5)]} for r, golds in enumerate([(3,), (1, 4), (0, 2)])]
    picks = [[4, 2], [0, 3], [1, 0]]
    teacher = {"q0": ["p02", "p00"], "q1": ["p14"], "q2": ["p23", "p21"]}
    expected = {
        "retrieval": [[0, 1, 2, 3, 4]] * 3,
        "gold_first": [[3, 0, 1, 2, 4], [1, 4, 0, 2, 3], [0, 2, 1, 3, 4]],
        "best_reward": [[4, 2, 0, 1, 3], [0, 3, 1, 2, 4], [1, 0, 2, 3, 4]],
        "teacher": [[2, 0, 1, 3, 4], [4, 0, 1, 2, 3], [3, 1, 0, 2, 4]],
    }
    for target, orders in expected.items():
        presented, rankings = selector_targets(rows, target, seed=3, teacher=teacher, picks=picks)
        assert any(p["passages"] != r["passages"] for p, r in zip(presented, rows))  # shuffled: not a copying task
        for row, shown, ranking, order in zip(rows, presented, rankings, orders):
            assert [shown["passages"][i]["id"] for i in ranking] == [row["passages"][i]["id"] for i in order], target
    with pytest.raises(ValueError, match="one pick per row"):
        selector_targets(rows, "best_reward", picks=picks[:2])


def test_best_reward_warmup_teaches_the_selector_the_warmed_up_generators_best_picks(tmp_path, monkeypatch):
    """`selector_warmup_target: best_reward` scores every training question with the generator *after* its warm-up,
    trains the selector towards those picks, and on resume reuses the saved selector without scoring again."""
    import dro_rl.recipe as recipe

    calls, targets = [], []
    real_picks, real_targets = recipe.reward_picks, recipe.selector_targets

    def picks(rows, k, generator, *args, **kwargs):
        calls.append({"k": k, "warmed_up": (tmp_path / "run" / "warmup" / "generator").is_dir()})
        out = real_picks(rows, k, generator, *args, **kwargs)
        calls[-1]["picks"] = out
        return out

    def selector_targets(rows, target, seed, **kwargs):
        targets.append((target, kwargs.get("picks")))
        return real_targets(rows, target, seed, **kwargs)

    monkeypatch.setattr(recipe, "reward_picks", picks)
    monkeypatch.setattr(recipe, "selector_targets", selector_targets)
    flags = [*TINY_DEMO, "--output_dir", str(tmp_path / "run"), "--selector_warmup_steps", "2",
             "--selector_warmup_target", "best_reward", "--save_strategy", "steps", "--save_steps", "1"]
    run(*flags, "--max_steps", "1")
    assert len(calls) == 1 and calls[0]["warmed_up"] and calls[0]["k"] == 2
    assert targets == [("best_reward", calls[0]["picks"])] and len(calls[0]["picks"]) == 32
    assert all(len(p) == 2 and len(set(p)) == 2 for p in calls[0]["picks"])
    assert (tmp_path / "run" / "warmup" / "selector").is_dir()
    taught = [json.loads(line) for line in (tmp_path / "run" / "warmup" / "selector_targets.jsonl").open()]
    train = [json.loads(line) for line in (tmp_path / "run" / "data" / "train.jsonl").open()]
    assert [t["id"] for t in taught] == [r["id"] for r in train]  # what the selector was taught, beside it
    assert [t["target"] for t in taught] == [f"[{p[0] + 1}] > [{p[1] + 1}]" for p in calls[0]["picks"]]
    assert taught[0]["passages"][0] == train[0]["passages"][calls[0]["picks"][0][0]]["text"]
    run(*flags, "--max_steps", "2", "--resume_from_checkpoint", "true")
    assert len(calls) == 1  # the saved selector is reused: no second scoring pass


def test_only_the_main_process_says_what_the_stages_reuse(tmp_path, finished_run, capsys, monkeypatch):
    """Under accelerate launch every process runs the recipe: rank 1 repeated the main process's lines, and on a fresh
    run said "data: reusing" and "evaluation (before DRO): reusing" of the files rank 0 had just written."""
    from dro_rl import recipe

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    args, dro, model_args = parse(*TINY_DEMO, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps",
                                  "--save_steps", "2", "--resume_from_checkpoint", "true")

    def stages() -> None:
        recipe.prepare(args, dro, model_args)
        train_rows, eval_rows = recipe.data_stage(args, dro)
        recipe.warmup_stage(args, dro, None, None, "generator", None, train_rows, None)  # reused: no model is read
        recipe.evaluation_stage("before", dro, eval_rows, None, None, None, None, None)

    stages()
    said = capsys.readouterr().out
    for line in ("resume: DRO continues from", "data: reusing", "warm-up: reusing the generator",
                 "evaluation (before DRO): reusing"):
        assert line in said, line  # one process: as before
    monkeypatch.setattr(recipe, "PartialState", type("Rank1", (), {"is_main_process": False}))
    stages()
    assert capsys.readouterr().out == ""


def test_only_the_main_process_shows_the_warm_ups_labelling_bar(tmp_path, capsys, monkeypatch):
    """Every process of a two-process warm-up showed TRL's "Building labels" bar."""
    import datasets

    from dro_rl import warmup
    from tiny_run import tiny_task

    _, tok, _, generator = tiny_task()
    rows = [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}] * 4
    dro = DROConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    datasets.enable_progress_bars()  # a recipe run of this process with disable_tqdm turned them off
    try:
        warmup.run_sft(generator, tok, rows, warmup_config(str(tmp_path / "a"), 1, 2, 1e-3, dro))
        assert "Building labels" in capsys.readouterr().err
        monkeypatch.setattr(warmup, "PartialState", type("Rank1", (), {"is_main_process": False}), raising=False)
        warmup.run_sft(generator, tok, rows, warmup_config(str(tmp_path / "b"), 1, 2, 1e-3, dro))
        assert "Building labels" not in capsys.readouterr().err
    finally:
        datasets.enable_progress_bars()


def test_the_recipe_trains_on_rows_it_ranked_without_the_candidate_order_warning(tmp_path):
    """The warning is for rows a user brings in their own order; the recipe ranked its rows with the retriever that
    pipeline.json records, so it would only be noise there."""
    import warnings

    from dro_rl.trainer import CandidateOrderWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(*TINY_DEMO, "--output_dir", str(tmp_path / "run"), "--max_steps", "1")
    assert (tmp_path / "run" / "report.json").exists()
    assert not [w for w in seen if issubclass(w.category, CandidateOrderWarning)]
