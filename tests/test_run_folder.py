"""Self-describing run folders: every save writes the pipeline settings beside both models, the final save adds the
log history and the card and is swapped in atomically, and evaluation reads the settings from the folder."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from saved_runs import train_and_save

from dro_rl import DROPipeline
from dro_rl import run_folder as rf
from dro_rl.data import write_jsonl
from dro_rl.pipeline_config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate import EvaluateArguments  # noqa: E402
from evaluate import main as evaluate_main  # noqa: E402


def test_every_save_writes_the_settings_beside_both_models(tmp_path, demo_rows, word_tok):
    out = tmp_path / "run"
    trainer = train_and_save(out, demo_rows[:16], word_tok, max_steps=2, save_strategy="steps", save_steps=1)
    settings = trainer.args.pipeline_dict()
    for folder, step in ((out / "checkpoint-1", 1), (out / "checkpoint-2", 2), (out, 2)):
        assert (folder / "selector" / "model.safetensors").exists() and (folder / "generator").is_dir()
        assert json.loads((folder / "pipeline.json").read_text()) == settings, folder
        marker = json.loads((folder / rf.COMPLETE_MARKER).read_text())
        whole = folder != out  # a checkpoint's marker records all its files (resume reads them all)
        assert marker["global_step"] == step and marker["files"] == rf.saved_files(str(folder), whole), folder
        # the weights readable as the umask allows, like every other file (transformers writes them 0600)
        mask = os.umask(0)
        os.umask(mask)
        modes = [p.stat().st_mode & 0o777 for p in folder.glob("*/model.safetensors")]
        assert modes == [0o666 & ~mask] * 2, folder
    state = json.loads((out / "trainer_state.json").read_text())  # the end-of-training log history
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "selector/loss" in h] == [1, 2]
    assert (out / "README.md").exists()
    assert not (out / rf.STAGING).exists() and not (out / rf.REPLACED).exists()
    assert PipelineConfig.load_pipeline(str(out)).repeat_ids is True  # tiny_config's non-default value


def fingerprint(folder):
    return {name: (folder / name / "model.safetensors").read_bytes() for name in ("selector", "generator")}


def test_a_kill_during_the_final_save_never_leaves_a_mix_that_reads_as_complete(tmp_path, demo_rows, word_tok,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    train_and_save(out, demo_rows[:16], word_tok)
    first = fingerprint(out)
    second = train_and_save(tmp_path / "other", demo_rows[:16], word_tok, save=False, seed=5, learning_rate=5e-2)
    second.args.output_dir = str(out)  # a later save of other weights into the same folder

    # Killed while writing the new models (before the swap): the previous save is untouched and still complete.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("dro_rl.trainer.publish", killed)
    with pytest.raises(KeyboardInterrupt):
        second.save_model()
    monkeypatch.undo()
    assert fingerprint(out) == first and rf.is_complete(str(out))
    DROPipeline.from_pretrained(str(out))

    # Killed half-way through the swap: a new generator/ is in place, the selector/ is still the old one. No reader
    # may take this pair — the bug was a new selector/ beside the previous run's generator/ that evaluate.py used.
    real_replace = os.replace

    def replace(src, dst):
        if src.endswith(os.path.join(rf.STAGING, "selector")):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(rf.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        second.save_model()
    monkeypatch.undo()
    mixed = fingerprint(out) if (out / "selector").exists() else {}
    assert mixed.get("generator") != first["generator"]
    data = tmp_path / "x.jsonl"  # a real file: the data is checked before the models
    data.write_text(json.dumps({"question": "q?", "answers": ["a"], "passages": [{"text": "p"}]}) + "\n")
    for read in (lambda: DROPipeline.from_pretrained(str(out)),
                 lambda: evaluate_main(EvaluateArguments(datasets=[str(data)], run_dir=str(out),
                                                         output_dir=str(tmp_path / "eval")), PipelineConfig()),
                 lambda: evaluate_main(EvaluateArguments(datasets=[str(data)], selector=str(out / "selector"),
                                                         output_dir=str(tmp_path / "eval"),
                                                         generator=str(out / "generator")), PipelineConfig())):
        with pytest.raises(ValueError, match="checkpoint_complete"):
            read()

    # The next save completes the folder again, with nothing left over from the interrupted one.
    second.save_model()
    assert rf.is_complete(str(out)) and fingerprint(out) != first
    assert not (out / rf.STAGING).exists() and not (out / rf.REPLACED).exists()


def test_a_previous_runs_report_and_bases_do_not_survive_a_new_save(tmp_path, demo_rows, word_tok):
    out = tmp_path / "run"
    train_and_save(out, demo_rows[:16], word_tok, "lora")  # LoRA on unnamed bases: selector_base/, generator_base/
    (out / "report.json").write_text(json.dumps({"answer_em": {"dro": 0.7}}))
    past = time.time() - 3600
    os.utime(out / "report.json", (past, past))
    trainer = train_and_save(out, demo_rows[:16], word_tok, "full", overwrite_output_dir=True)
    # they described the models this save replaced
    assert not (out / "report.json").exists() and not (out / "selector_base").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoint_complete", "dro_run.json", "generator",
                                                     "pipeline.json", "selector", "trainer_state.json"]

    (out / "report.json").write_text(json.dumps({"answer_em": {"dro": 0.5}}))  # this run's report
    trainer.save_model()  # e.g. push_to_hub saving again
    assert json.loads((out / "report.json").read_text()) == {"answer_em": {"dro": 0.5}}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, demo_rows, word_tok):
    """A run trained with an eval set, its in-memory evaluation, and the eval rows as a JSONL file."""
    tmp = tmp_path_factory.mktemp("eval")
    trainer = train_and_save(tmp / "run", demo_rows[:16], word_tok, eval_rows=demo_rows[16:])
    path = tmp / "dev.jsonl"
    write_jsonl(demo_rows[16:], str(path))  # in file order: evaluate.py applies the run's retriever itself
    return tmp, trainer.evaluate(), path


def test_evaluate_on_a_run_folder_reproduces_the_runs_figures_with_no_prompt_flags(evaluated_run):
    tmp, in_memory, path = evaluated_run
    results = evaluate_main(EvaluateArguments(datasets=[str(path)], run_dir=str(tmp / "run"),
                                              output_dir=str(tmp / "eval")), PipelineConfig())
    selector = results["dev"]["selector"]
    assert (selector["support_recall_at_k"], selector["answer_em"], selector["answer_f1"]) == (
        in_memory["eval_support_recall_at_k"], in_memory["eval_answer_em"], in_memory["eval_answer_f1"])


def test_a_flag_that_contradicts_the_runs_prompts_is_refused_by_name(evaluated_run):
    tmp, _, path = evaluated_run
    argv = ["--datasets", str(path), "--run_dir", str(tmp / "run"), "--repeat_ids", "false",
            "--no_use_chat_template"]
    given = rf.given_settings(argv)
    assert given == {"repeat_ids", "use_chat_template"}
    with pytest.raises(ValueError, match=r"--repeat_ids False contradicts .*pipeline.json \(repeat_ids: True\)"):
        evaluate_main(EvaluateArguments(datasets=[str(path)], run_dir=str(tmp / "run")),
                      PipelineConfig(repeat_ids=False, use_chat_template=False), given)
    # the same value as the run's is no contradiction
    assert rf.run_settings(str(tmp / "run"), PipelineConfig(repeat_ids=True), {"repeat_ids"}).repeat_ids is True


def test_the_commands_own_flags_are_not_read_as_abbreviated_pipeline_settings():
    """evaluate.py --generator is its own flag: read against PipelineConfig alone it was an ambiguous abbreviation of
    --generator_max_passage_tokens / --generator_max_prompt_length, and the command could not run."""
    argv = ["--datasets", "d.jsonl", "--selector", "s", "--generator", "g", "--generator_max_passage_tokens", "8"]
    assert rf.given_settings(argv, [EvaluateArguments]) == {"generator_max_passage_tokens"}
    assert rf.given_settings(["--generator", "g", "--max_passage", "8"], [EvaluateArguments]) == {"max_passage_tokens"}


def test_a_flag_that_changes_the_retrieval_is_honoured_with_a_warning(evaluated_run, tmp_path):
    tmp, _, _ = evaluated_run
    config = tmp_path / "eval.yaml"
    config.write_text("top_n: 3\n")
    given = rf.given_settings(["--config", str(config), "--max_answer_tokens", "2"])
    assert given == {"top_n", "max_answer_tokens"}
    with pytest.warns(UserWarning, match="--top_n 3 departs from the run's top_n: 4"):
        settings = rf.run_settings(str(tmp / "run"), PipelineConfig(top_n=3, max_answer_tokens=2), given)
    assert (settings.top_n, settings.max_answer_tokens, settings.num_docs_selected) == (3, 2, 2)


def test_a_complete_run_folder_missing_a_model_is_refused_by_name(evaluated_run, tmp_path):
    """A generator/ deleted after the save read as a Hub id ('couldn't connect to huggingface.co')."""
    import shutil

    from dro_rl import DROPipeline

    tmp, _, path = evaluated_run
    damaged = tmp_path / "run"
    shutil.copytree(tmp / "run", damaged)
    shutil.rmtree(damaged / "generator")
    for read in (lambda: DROPipeline.from_pretrained(str(damaged)),
                 lambda: evaluate_main(EvaluateArguments(datasets=[str(path)], run_dir=str(damaged),
                                                         output_dir=str(tmp_path / "eval")), PipelineConfig())):
        with pytest.raises(FileNotFoundError, match=r"run folder .*run has no generator/ although its save finished"):
            read()


def test_a_file_deleted_or_cut_after_the_save_is_named_and_an_old_marker_still_reads(evaluated_run, tmp_path):
    """Each was read anyway: a deleted tokenizer.json failed as 'install sentencepiece or tiktoken', a deleted
    config.json as 'Unrecognized model', a deleted weights file in transformers' traceback; any text passed as a
    marker."""
    import shutil

    tmp, _, _ = evaluated_run
    recorded = json.loads((tmp / "run" / rf.COMPLETE_MARKER).read_text())
    assert "generator/tokenizer.json" in recorded["files"] and "pipeline.json" in recorded["files"]
    for damage, message in ((lambda run: (run / "generator" / "tokenizer.json").unlink(),
                             "generator/tokenizer.json is missing"),
                            (lambda run: (run / "selector" / "config.json").write_text("{}"),
                             r"selector/config.json has 2 bytes where the save wrote \d+"),
                            (lambda run: (run / rf.COMPLETE_MARKER).write_text("garbage"),
                             "its checkpoint_complete marker is not one a save writes"),
                            # K 2 -> 3 by hand: the same size, read as the run's setting by predict and evaluate
                            (lambda run: (run / "pipeline.json").write_text((run / "pipeline.json").read_text().replace(
                                '"num_docs_selected": 2', '"num_docs_selected": 3')),
                             r"pipeline.json is not the file the save wrote \(edited since\?\)")):
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(tmp / "run", damaged)
        damage(damaged)
        with pytest.raises(ValueError, match=rf"run folder .*damaged was changed since its save finished: {message}"):
            DROPipeline.from_pretrained(str(damaged))
    shutil.rmtree(damaged)
    shutil.copytree(tmp / "run", damaged)
    (damaged / rf.COMPLETE_MARKER).write_text("7\n")  # an earlier dro-rl's marker: the step alone, still read
    assert DROPipeline.from_pretrained(str(damaged)).config.num_docs_selected == 2


def test_a_departing_value_that_is_out_of_range_is_refused_without_the_departure_warning(evaluated_run):
    """--max_answer_tokens 0 first warned that it departs from the run's 4, then was refused."""
    import warnings

    tmp, _, _ = evaluated_run
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="max_answer_tokens must be"):
        warnings.simplefilter("always")
        rf.run_settings(str(tmp / "run"), PipelineConfig(max_answer_tokens=0), {"max_answer_tokens"})
    assert not caught


def test_resume_with_another_process_count_is_refused_by_name(tmp_path):
    """Resumed on one process, a two-process checkpoint trained on at half the questions per step, without a word
    (and the other way round, from one process's RNG state); a checkpoint from before the count was recorded still
    resumes."""
    import json

    import pytest

    from dro_rl.resume import RUN_FILE, check_same_run

    record = {"settings": {"seed": 0}, "world_size": 2, "selector": {}, "generator": {}, "train_dataset": "x"}
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    check_same_run(str(tmp_path), record)
    with pytest.raises(ValueError, match=r"world_size: checkpoint 2, now 1 \(launch it with --num_processes 2\)"):
        check_same_run(str(tmp_path), {**record, "world_size": 1})
    (tmp_path / RUN_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "world_size"}))
    check_same_run(str(tmp_path), {**record, "world_size": 1})
