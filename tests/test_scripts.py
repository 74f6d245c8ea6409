"""The warm-up and evaluation entry points, run in-process on real HotpotQA rows with tiny models."""

import json
import sys
from pathlib import Path

import pytest

from test_data import SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate import EvaluateArguments  # noqa: E402
from evaluate import main as evaluate_main  # noqa: E402
from warmup_sft import WarmupArguments  # noqa: E402
from warmup_sft import main as warmup_main  # noqa: E402
from warmup_sft import make_parser as warmup_parser  # noqa: E402

from dro_rl.data import load, write_jsonl  # noqa: E402
from dro_rl.pipeline import make_retriever, retrieval_order  # noqa: E402
from dro_rl.pipeline_config import PipelineConfig  # noqa: E402

HOTPOT = SHARED / "hotpotqa_dev300" / "hotpotqa_distractor_dev300.jsonl"


@needs_shared
def test_warmup_then_evaluate_on_hotpotqa(tmp_path):
    rows, _ = load(str(HOTPOT), "hotpotqa", limit=12)
    data = tmp_path / "hotpot.jsonl"
    write_jsonl(retrieval_order(rows, make_retriever("bm25", "")), str(data))
    common = ["--data", str(data), "--model", "tiny:minilm", "--num_docs_selected", "2", "--max_passage_tokens", "24",
              "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--bf16", "false",
              "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    for role in ("generator", "selector"):
        args = warmup_parser().parse_args_and_config(
            args=[*common, "--role", role, "--output_dir", str(tmp_path / role)]
        )
        assert isinstance(args[0], WarmupArguments)
        trainer = warmup_main(*args)
        assert trainer.state.global_step == 2
        assert (tmp_path / role / "model.safetensors").exists()

        assert PipelineConfig.load_pipeline(str(tmp_path / role)).max_passage_tokens == 24
    again = warmup_parser().parse_args_and_config(args=[*common, "--role", "generator", "--output_dir",
                                                        str(tmp_path / "generator")])
    with pytest.raises(FileExistsError, match="generator is not empty .*--overwrite true"):  # before training
        warmup_main(*again)

    results = evaluate_main(EvaluateArguments(
        datasets=[f"hotpotqa:{HOTPOT}"], selector=str(tmp_path / "selector"), generator=str(tmp_path / "generator"),
        output_dir=str(tmp_path / "eval"), limit=6,
    ), PipelineConfig(retriever="bm25", num_docs_selected=2, max_passage_tokens=24, generator_max_passage_tokens=24,
                      max_answer_tokens=3, use_chat_template=False))
    table = results["hotpotqa_distractor_dev300"]
    assert set(table) == {"retrieval", "selector", "oracle", "n"} and table["n"] == 6
    assert table["oracle"]["support_recall_at_k"] == 1.0
    assert 0.0 <= table["selector"]["answer_f1"] <= 1.0
    predictions = (tmp_path / "eval" / "hotpotqa_distractor_dev300.selector.predictions.jsonl").read_text()
    assert len(predictions.splitlines()) == 6 and "prediction" in json.loads(predictions.splitlines()[0])
    assert "| hotpotqa_distractor_dev300 (n=6) | selector |" in (tmp_path / "eval" / "metrics.md").read_text()


@needs_shared
def test_train_rl_runs_on_real_hotpotqa_with_tiny_models(tmp_path):
    from train_rl import main as train_main
    from train_rl import make_parser as train_parser

    report = train_main(*train_parser().parse_args_and_config(args=[
        "--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(tmp_path),
        "--dataset", f"hotpotqa:{HOTPOT}", "--eval_dataset", f"hotpotqa:{HOTPOT}", "--max_eval_questions", "3",
        "--max_train_questions", "8",
        "--retriever", "bm25", "--model_name_or_path", "tiny:minilm", "--max_steps", "1", "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--generator_warmup_steps", "1", "--max_prompt_length", "300",
        "--generator_max_prompt_length", "150", "--repeat_ids", "false", "--disable_tqdm", "true",
    ]))
    assert report["num_eval_questions"] == 3
    assert 0.0 <= report["rows"]["selector after DRO"]["support_recall_at_k"]["mean"] <= 1.0
    assert (tmp_path / "generator" / "model.safetensors").exists()


@needs_shared
def test_train_rl_retrieves_question_only_data_from_a_corpus(tmp_path):
    from train_rl import main as train_main
    from train_rl import make_parser as train_parser

    toy = SHARED / "flashrag_toy"
    report = train_main(*train_parser().parse_args_and_config(args=[
        "--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(tmp_path),
        "--dataset", f"flashrag:{toy / 'test.jsonl'}", "--eval_dataset", f"flashrag:{toy / 'test.jsonl'}",
        "--corpus", str(toy / "sample_data.jsonl"), "--top_n", "4", "--max_eval_questions", "4", "--retriever", "bm25",
        "--model_name_or_path", "tiny:minilm", "--max_steps", "1", "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--generator_warmup_steps", "1", "--max_passage_tokens", "24",
        "--generator_max_passage_tokens", "24", "--repeat_ids", "false", "--disable_tqdm", "true",
    ]))
    after = report["rows"]["selector after DRO"]
    assert report["num_eval_questions"] == 4 and after["support_recall_at_k"]["mean"] is None  # no gold labels
    assert 0.0 <= after["answer_em"]["mean"] <= 1.0
    # no oracle row: without labels its "gold first" pick was the retrieval order, reported as the oracle's EM
    assert not any(label.startswith("oracle") for label in report["rows"])
    assert report["num_labelled_eval_questions"] == 0
    assert "no evaluation question has gold passage labels, so there is no oracle row" in (
        (tmp_path / "README.md").read_text())
    assert (tmp_path / "test.retrieval-cache.json").exists()  # cached beside the outputs, not the read-only data


def test_bench_paths_compute_the_same_step_loss():
    """Every timed path computes the same DRO loss from the same weights (bench.main stops the run otherwise)."""
    from bench import BenchArguments, main as bench_main

    out = bench_main(BenchArguments(preset="cpu-tiny", questions=2, repeats=0, paths="naive,ours,ours-kv",
                                    memory=False, num_layers=1))
    assert set(out["rows"]) == {"naive/no-ckpt", "ours/no-ckpt", "ours-kv/no-ckpt"}
    assert out["loss_relative_spread"] < 1e-5
    assert out["ratios"]["naive/ours/no-ckpt"]["predicted"] > 1.0  # the naive path does more work


def test_bench_names_the_presets_it_knows():
    from bench import BenchArguments

    with pytest.raises(ValueError, match="known: .*cpu-smollm2.*cpu-tiny"):  # at start-up, as the other refusals
        BenchArguments(preset="cpu-tiyn")


def test_a_teacher_ranking_file_is_checked_line_by_line_before_the_model_loads(tmp_path):
    """The file was read with a bare json.loads (a traceback without file or line), and passage ids not among a
    question's candidates were dropped in silence: a teacher file of other ids taught the retrieval order."""
    rows = [{"id": f"q{r}", "question": f"question {r}?", "answers": [f"a{r}"],
             "passages": [{"id": f"p{r}{i}", "text": f"passage {r} {i}"} for i in range(3)]} for r in range(2)]
    data = tmp_path / "data.jsonl"
    write_jsonl(rows, str(data))
    cases = [
        ('{"id": "q0", "ranking": ["p02"]}\nnot json\n', r"teacher\.jsonl:2: "),
        ('{"id": "q0", "ranking": "p02"}\n', r"teacher\.jsonl:1: field 'ranking' must be a non-empty list"),
        ('{"id": "q0", "ranking": ["p02"]}\n{"id": "q0", "ranking": ["p01"]}\n', r"teacher\.jsonl:2: question id 'q0' "
                                                                                 "has a ranking on an earlier line"),
        ('{"id": "q0", "ranking": ["p02", "p02"]}\n', r"teacher\.jsonl:1: field 'ranking' names a passage more than "),
        ('{"id": "q0", "ranking": ["p02"]}\n', "no teacher ranking for question id 'q1'"),
        ('{"id": "q0", "ranking": ["p02"]}\n{"id": "q1", "ranking": [2, 0]}\n',
         r"the teacher ranking of question 'q1' names passages that are not among its candidates: \['2', '0'\]"),
    ]
    for text, message in cases:
        (tmp_path / "teacher.jsonl").write_text(text)
        args = warmup_parser().parse_args_and_config(args=[
            "--data", str(data), "--role", "selector", "--target", "teacher", "--teacher_rankings",
            str(tmp_path / "teacher.jsonl"), "--model", str(tmp_path / "no-model-here"), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])
        with pytest.raises(ValueError, match=message):  # not the missing model's error: checked before it loads
            warmup_main(*args)
    with pytest.raises(ValueError, match="--target teacher needs --teacher_rankings"):
        WarmupArguments(data=str(data), role="selector", target="teacher")
    with pytest.raises(ValueError, match="--teacher_rankings is a selector target"):  # was ignored
        WarmupArguments(data=str(data), role="generator", target="teacher", teacher_rankings="t.jsonl")
    with pytest.raises(ValueError, match="warmup_sft.py reads canonical JSONL .* --format hotpotqa"):
        WarmupArguments(data="hotpotqa:dev.json", role="generator")  # was "data file not found: hotpotqa:dev.json"
    # gold_first on rows without gold labels trained the retrieval order in silence
    args = warmup_parser().parse_args_and_config(args=[
        "--data", str(data), "--role", "selector", "--target", "gold_first", "--model", str(tmp_path / "no-model"),
        "--output_dir", str(tmp_path / "out2"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])
    with pytest.raises(ValueError, match="--target gold_first: no row of .* has gold passage labels"):
        warmup_main(*args)



def test_teacher_rankings_of_questions_not_in_the_data_are_counted(tmp_path, capsys):
    """A teacher file may cover more questions than the data (train and dev); those it does not use were ignored
    without a word, so a file for another dataset with a few shared ids looked fully used."""
    rows = [{"id": "q0", "question": "question?", "answers": ["Paris"],
             "passages": [{"id": f"p{i}", "text": f"passage {i}"} for i in range(3)]}]
    data = tmp_path / "data.jsonl"
    write_jsonl(rows, str(data))
    (tmp_path / "teacher.jsonl").write_text('{"id": "q0", "ranking": ["p2"]}\n{"id": "dev7", "ranking": ["x"]}\n'
                                            '{"id": "dev8", "ranking": ["y"]}\n')
    args = warmup_parser().parse_args_and_config(args=[
        "--data", str(data), "--role", "selector", "--target", "teacher", "--teacher_rankings",
        str(tmp_path / "teacher.jsonl"), "--model", str(tmp_path / "no-model-here"), "--output_dir",
        str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])
    with pytest.raises(Exception, match="no-model-here"):  # the targets pass; the (missing) model is what stops it
        warmup_main(*args)
    assert f"teacher rankings: 1 used, 2 for questions not in {data} (ignored)" in capsys.readouterr().out


def test_every_named_mutation_still_applies_to_the_code():
    """scripts/mutation_test.py --mode named breaks the code at lines it finds by their text; five of its twelve had
    gone stale as the code moved on (the run would stop at the first), unnoticed until the next mutation run."""
    import mutation_test

    mutants = list(mutation_test.named_mutants())  # raises, naming the mutation, where a line is not found once
    assert len(mutants) == len(mutation_test.NAMED) >= 17
    assert all(m.source != (ROOT / m.path).read_text() for m, _ in mutants)
