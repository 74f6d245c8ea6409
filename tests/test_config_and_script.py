import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from train_rl import main, make_parser  # noqa: E402

from dro_rl import DROConfig  # noqa: E402
from dro_rl.cli import refusals_in_one_line  # noqa: E402


def recipe_files():
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def test_every_recipe_parses_with_the_real_parser():
    files = recipe_files()
    assert len(files) > 0
    for path in files:
        # GPU recipes ask for bf16, which TrainingArguments refuses on a GPU-less machine unless told it is CPU
        script_args, training_args, model_args = make_parser().parse_args_and_config(
            args=["--config", str(path), "--use_cpu", "true"]
        )
        assert isinstance(training_args, DROConfig), path


def write_yaml(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_estimator_in_yaml_is_rejected(tmp_path):
    path = write_yaml(tmp_path, "estimator: ppo\noutput_dir: x\nuse_cpu: true\nbf16: false\n")
    with pytest.raises(ValueError, match="estimator"):
        make_parser().parse_args_and_config(args=["--config", path])


def test_misspelled_yaml_key_is_an_error(tmp_path, capsys):
    path = write_yaml(tmp_path, "estimatr: dro\noutput_dir: x\nuse_cpu: true\nbf16: false\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\): estimatr \(did you mean estimator\?\)"):
        make_parser().parse_args_and_config(args=["--config", path])
    with pytest.raises(SystemExit) as exit_info:  # a parser's refusal, like an unknown flag's: status 2
        with refusals_in_one_line("train_rl.py"):
            make_parser().parse_args_and_config(args=["--config", path])
    assert exit_info.value.code == 2
    assert "train_rl.py: error: the --config file holds 1 unknown" in capsys.readouterr().err


def test_a_misspelled_flag_names_the_nearest_setting_in_every_script(capsys):
    """An unknown flag was refused with the whole remainder and no hint (a YAML key already had one); the other
    scripts parse with the same parser."""
    with pytest.raises(SystemExit) as exit_info:
        with refusals_in_one_line("train_rl.py"):
            make_parser().parse_args_and_config(args=["--num_docs_selcted", "2", "--max_steps", "1", "--zzz"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("train_rl.py: error: unknown arguments: --num_docs_selcted 2 --zzz; did you "
                                       "mean --num_docs_selected for --num_docs_selcted? (see --help)\n")
    from evaluate import make_parser as evaluate_parser

    with pytest.raises(ValueError, match=r"did you mean --generator for --generatr\?"):
        evaluate_parser().parse_args_and_config(args=["--datasets", "x", "--generatr", "y"])
    assert "--config FILE.yaml: settings from a YAML file" in make_parser().format_help()  # TRL reads it unlisted


def test_a_config_file_that_is_not_yaml_is_refused_with_its_line(tmp_path, capsys):
    path = write_yaml(tmp_path, "output_dir: x\nestimator: dro: baseline\n")
    with pytest.raises(SystemExit) as exit_info:  # was PyYAML's ScannerError with a traceback
        with refusals_in_one_line("train_rl.py"):
            make_parser().parse_args_and_config(args=["--config", path])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("train_rl.py: error: the --config file is not valid YAML: mapping values are not allowed ")
    assert f'in "{path}", line 2, column 15' in err


def test_a_setting_given_twice_in_yaml_is_refused_and_a_bare_no_strategy_is_read_as_no(tmp_path):
    """PyYAML keeps a repeated key's last value in silence (m = 8 ran where the reader saw 4 first); YAML 1.1 reads a
    bare `no` as false, which ended in transformers' "False is not a valid SaveStrategy" traceback."""
    path = write_yaml(tmp_path, "num_generations: 4\noutput_dir: x\nuse_cpu: true\nbf16: false\nnum_generations: 8\n")
    with pytest.raises(ValueError, match=r"gives a setting more than once: num_generations \(lines 1, 5\)"):
        make_parser().parse_args_and_config(args=["--config", path])
    path = write_yaml(tmp_path, "output_dir: x\nuse_cpu: true\nbf16: false\nlr_scheduler_kwargs:\n  foo: 1\n  foo: 2\n")
    with pytest.raises(ValueError, match=r"more than once: lr_scheduler_kwargs.foo \(lines 5, 6\)"):  # nested too
        make_parser().parse_args_and_config(args=["--config", path])
    path = write_yaml(tmp_path, "save_strategy: no\neval_strategy: no\nlogging_strategy: no\noutput_dir: x\n"
                                "use_cpu: true\nbf16: false\nreport_to: no\n")
    config = make_parser().parse_args_and_config(args=["--config", path])[1]
    assert (config.save_strategy, config.eval_strategy, config.logging_strategy) == ("no", "no", "no")
    assert config.report_to == []  # `report_to: no` is "none" (was refused as "[False]")


def test_an_integer_written_as_a_string_in_yaml_is_refused_and_a_float_in_e_notation_is_read(tmp_path):
    path = write_yaml(tmp_path, "learning_rate: 1e-5\noutput_dir: x\nuse_cpu: true\nbf16: false\n")
    assert make_parser().parse_args_and_config(args=["--config", path])[1].learning_rate == 1e-5  # '1e-5' to PyYAML
    path = write_yaml(tmp_path, "num_generations: '4'\nnum_docs_selected: '2'\noutput_dir: x\nuse_cpu: true\n"
                                "bf16: false\n")
    with pytest.raises(ValueError, match="integers as strings: num_generations: '4', num_docs_selected: '2'"):
        make_parser().parse_args_and_config(args=["--config", path])


def test_question_groups_must_stay_on_one_process():
    # refused by DROConfig before TRL's own check, whose message would come with a library traceback
    with pytest.raises(ValueError, match="num_generations .4. so each process holds whole question groups"):
        DROConfig(output_dir="x", per_device_train_batch_size=6, num_generations=4, use_cpu=True, bf16=False)


def test_help_exits_cleanly():
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args_and_config(args=["--help"])
    assert exit_info.value.code == 0


def test_main_runs_the_demo_end_to_end(tmp_path, capsys):
    """The real script path on a shrunken demo: retrieval, warm-up, DRO, evaluation, report."""
    args = make_parser().parse_args_and_config(
        args=[
            "--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(tmp_path),
            "--max_steps", "3", "--demo_num_train", "48", "--demo_num_eval", "16",
            "--generator_warmup_steps", "4", "--selector_warmup_steps", "2", "--per_device_train_batch_size", "16",
            "--logging_steps", "1", "--disable_tqdm", "true",
        ]
    )
    report = main(*args)
    saved = json.loads((tmp_path / "report.json").read_text())
    for label, row in saved["rows"].items():
        low, high = row["support_recall_at_k"]["ci95"]
        assert 0.0 <= low <= row["support_recall_at_k"]["mean"] <= high <= 1.0, label
    for label in ("retrieval top-K, warm-up generator", "selector after DRO", "oracle (gold passages), DRO generator"):
        assert 0.0 <= saved["rows"][label]["answer_em"]["mean"] <= 1.0
    gain = saved["differences"]["selector_after_minus_retrieval"]["support_recall_at_k"]
    after, retrieval = (saved["rows"][k]["support_recall_at_k"]["mean"] for k in
                        ("selector after DRO", "retrieval top-K, DRO generator"))
    assert abs(gain["mean"] - (after - retrieval)) < 1e-9  # paired over the same questions
    assert saved["wall_seconds"] > 0 and saved["config"]["training"]["max_steps"] == 3
    assert report["rows"] == saved["rows"]
    assert os.path.getsize(tmp_path / "curves.png") > 10_000
    assert (tmp_path / "selector" / "model.safetensors").exists()
    assert (tmp_path / "generator" / "model.safetensors").exists()
    assert "| selector after DRO |" in capsys.readouterr().out
    assert "| selector after DRO |" in (tmp_path / "README.md").read_text()  # the card shows the run's figures


def test_two_runs_with_the_same_seed_report_the_same_figures(tmp_path):
    def run(out):
        args = make_parser().parse_args_and_config(
            args=["--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(out), "--max_steps", "2",
                  "--demo_num_train", "32", "--demo_num_eval", "12", "--generator_warmup_steps", "3",
                  "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--retriever", "bm25"]
        )
        report = main(*args)
        return report["rows"]

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) >= 3
    kinds = {ClusterConfig.from_yaml_file(str(f)).distributed_type.value for f in files}
    assert kinds == {"NO", "MULTI_GPU", "FSDP"}  # DeepSpeed is refused at start-up: no config ships for it


def test_defaults_that_depend_on_the_machine_fit_a_cpu_and_evaluation_picks_a_metric_it_reports():
    """GRPO's bf16 default (True) was refused by transformers on a CPU-only machine, so `DROConfig(output_dir=...)`
    failed as the README wrote it; with load_best_model_at_end the parent's metric, `loss`, was no metric evaluate()
    gives, and the run failed at its first save after an evaluation."""
    assert not torch.cuda.is_available()  # this suite runs on CPU
    config = DROConfig(output_dir="x")
    assert config.bf16 is False and config.dataloader_pin_memory is False  # pinned memory needs an accelerator
    assert DROConfig(output_dir="x", use_cpu=True, bf16=True).bf16 is True  # asked for: honoured (CPU autocast)
    best = DROConfig(output_dir="x", load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    assert (best.metric_for_best_model, best.greater_is_better) == ("answer_em", True)


def test_reward_funcs_that_the_weight_estimators_only_log_are_said_to_be_logged():
    """`estimator: dro` with `reward_funcs: [answer_em]` ran as if the reward steered the selector; it is logged
    only (the weights come from the generator's likelihood), and answer rewards decode an answer every step."""
    with pytest.warns(UserWarning, match=r"reward_funcs \['answer_em'\] are logged, not trained on: estimator 'dro'"):
        DROConfig(output_dir="x", use_cpu=True, bf16=False, reward_funcs=["answer_em"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default, and a reward estimator's rewards, say nothing
        DROConfig(output_dir="x", use_cpu=True, bf16=False)
        DROConfig(output_dir="x", use_cpu=True, bf16=False, estimator="rloo", reward_funcs=["answer_em"])


def test_save_strategy_best_takes_the_answer_em_metric_as_load_best_model_at_end_does():
    """Without a metric, transformers refused `save_strategy: best` when the Trainer started (after the warm-up);
    DRO's evaluation gives answer_em, the same default load_best_model_at_end takes."""
    config = DROConfig(output_dir="x", use_cpu=True, bf16=False, save_strategy="best", eval_strategy="steps",
                       eval_steps=1)
    assert config.metric_for_best_model == "answer_em"


@pytest.mark.parametrize("line, message", [
    ("retriever_model: yes", r"retriever_model must be a string, got True \(bool\); in YAML, quote it"),
    ("dataset: 1", r"dataset must be a string, got 1 \(int\)"),
    ("reward_funcs: [1]", r"reward_funcs must be a list of strings, got \[1\]"),
    ("model_name_or_path: 123", r"model_name_or_path must be a string, got 123"),  # TRL's ModelConfig
])
def test_a_yaml_value_that_is_no_string_where_a_string_belongs_is_refused_by_name(tmp_path, line, message):
    """YAML reads `yes` as true and digits as numbers: each ended in an AttributeError (`'bool' object has no
    attribute 'startswith'`) inside the start-up checks."""
    path = write_yaml(tmp_path, f"output_dir: {tmp_path / 'run'}\nuse_cpu: true\nbf16: false\n{line}\n")
    with pytest.raises(ValueError, match=message):
        main(*make_parser().parse_args_and_config(args=["--config", path]))
    assert not (tmp_path / "run" / "data").exists()  # before any stage
