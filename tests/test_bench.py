"""scripts/bench.py: the memory tracker, the QLoRA presets' code path (4-bit base, LoRA, shared base, gradient
checkpointing) at a tiny width on CPU, and its refusals at start-up."""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402
from test_ablation import refusal  # noqa: E402


def test_live_tensor_peak_counts_what_is_alive():
    with bench.LiveTensors() as tracker:
        kept = torch.zeros(1 << 18)  # 1 MiB, kept
        freed = torch.zeros(1 << 19)  # 2 MiB, freed
        del freed
        gc.collect()
        view = kept.view(-1)[:4]  # a view allocates nothing
        assert tracker.live == pytest.approx(2**20, rel=1e-3)
    assert tracker.peak == pytest.approx(3 * 2**20, rel=1e-3)
    assert view.data_ptr() == kept.data_ptr()

    weight = torch.zeros(1 << 18)
    with bench.LiveTensors({weight.untyped_storage().data_ptr()}) as tracker:
        transposed = weight.view(512, 512).t()  # a view of a tensor that already existed: no new memory
    assert tracker.peak == 0 and transposed.shape == (512, 512)


def test_qlora_paths_run_and_the_shared_base_needs_less_memory():
    import bitsandbytes as bnb

    preset = bench.Preset(bench.TINY, bench.TINY, "qlora", (True,), 1, 6, paths=("naive", "ours", "ours-shared"))
    rows = bench.make_rows(preset, preset.questions, preset.passage_tokens)
    tok = bench.demo_tokenizer(rows, preset.n, preset.k)
    batch = bench.Batch.build(rows, tok, preset, preset.passage_tokens)
    args = bench.BenchArguments(repeats=1)
    separate = bench.time_paths(batch, preset, args, False, ["naive", "ours"], "cpu", (True,))
    shared = bench.time_paths(batch, preset, args, True, ["ours-shared"], "cpu", (True,))
    losses = [separate["naive/ckpt"]["loss"], separate["ours/ckpt"]["loss"], shared["ours-shared/ckpt"]["loss"]]
    assert losses == pytest.approx([losses[0]] * 3, rel=2e-2)  # bf16: same math, other batch shapes
    assert shared["ours-shared/ckpt"]["weights_gib"] < separate["ours/ckpt"]["weights_gib"]
    assert shared["ours-shared/ckpt"]["peak_gib"] < separate["ours/ckpt"]["peak_gib"]
    assert all(f["step_s"] > 0 for f in (*separate.values(), *shared.values()))

    models = bench.build_models(preset, tok, args, True, "cpu")
    layers = [m for m in models.selector.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * bench.TINY["num_hidden_layers"]
    lora = {n.split(".")[-2] for n, p in models.selector.named_parameters() if p.requires_grad}
    assert lora == {"selector", "generator"}


def test_every_row_computes_the_same_loss_and_the_predictions_order_the_rows(monkeypatch, tmp_path):
    """fp32 rows of both checkpointing settings: the run stops unless every path but the lower bound gives the same
    loss; the FLOP predictions order naive > ours with a separate scoring pass > ours > lower bound. The JSON line
    records what the timings depend on: threads and torch's version."""
    preset = bench.Preset(bench.TINY, bench.TINY, "full", (False, True), 2, 8, n=6, k=2, m=3, paths=bench.PATHS)
    monkeypatch.setitem(bench.PRESETS, "test", preset)
    output = tmp_path / "figures" / "bench.jsonl"
    out = bench.main(bench.BenchArguments(preset="test", repeats=1, memory=False, output=str(output), paths=",".join(
        p for p in bench.PATHS if p != "ours-shared")))
    assert json.loads(output.read_text()) == out
    assert (out["threads"], out["torch"]) == (1, torch.__version__)
    rows = out["rows"]
    assert "ours-kv/ckpt" not in rows and "ours-kv/no-ckpt" in rows  # the KV-cache loss cannot be checkpointed
    assert out["loss_relative_spread"] < 1e-6
    for setting in ("ckpt", "no-ckpt"):
        flops = [rows[f"{p}/{setting}"]["predicted_flops"]
                 for p in ("naive", "ours-scored-apart", "ours", "lower-bound")]
        assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
        assert set(out["ratios"][f"naive/ours/{setting}"]) == {"predicted", "measured", "measured_over_predicted"}
    assert rows["ours/ckpt"]["predicted_flops"] > rows["ours/no-ckpt"]["predicted_flops"]  # recomputation


def test_predicted_flops_count_each_prompt_once_in_the_packed_forward():
    """One question, prompt of 10 tokens, m = 2 completions of 3 tokens; only token FLOPs (1 each), no backward."""
    flops = bench.Flops(token=1, pair=0, logit=0, backward=0, checkpointing=False)
    tok = type("Tok", (), {"__len__": lambda self: 50})()
    batch = bench.Batch([{}], tok, 3, 2, 2, [list(range(10))], None, None)
    samples = bench.Samples(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long), None, None, [[0, 1], [1, 0]])
    estep = bench.EStep(samples, [[1] * 20, [1] * 20], [[2] * 4, [2] * 4])
    predicted = bench.predict_flops(flops, flops, batch, estep)
    score = generator_loss = 2 * 24
    decode = 2 * 2  # each completion's tokens after the first are decoded one by one
    assert predicted["lower-bound"] == (10 + 2 * 2) + generator_loss  # the prompt once, each completion but its EOS
    assert predicted["ours"] == 10 + decode + predicted["lower-bound"]  # scored in the loss
    assert predicted["ours-scored-apart"] == predicted["ours"] + score
    assert predicted["naive"] == 2 * 10 + decode + score + 2 * (10 + 3) + generator_loss
    assert bench.pairs(3) == 6 and bench.pairs(2, 10) == 2 * 10 + 3


def test_hotpotqa_rows_take_the_next_questions_paragraphs_beyond_ten():
    rows = bench.hotpotqa_rows(2, 20)
    assert [len(r["passages"]) for r in rows] == [20, 20]
    assert rows[0]["passages"][10:] == rows[1]["passages"][:10]
    assert rows[0]["answers"] and rows[0]["question"] != rows[1]["question"]


def test_trainer_refuses_4bit_training_on_cpu(tmp_path, demo_rows, word_tok):
    from conftest import make_model
    from peft import LoraConfig
    from tiny_run import as_dataset, tiny_config

    from dro_rl import DROTrainer

    base = make_model(word_tok, hidden=64).to(torch.bfloat16)
    bench.quantize_4bit(base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="needs a GPU"):
        DROTrainer(model=base, args=tiny_config(str(tmp_path), share_base_model=True), peft_config=lora,
                   train_dataset=as_dataset(demo_rows), processing_class=word_tok)


def test_gpu_check_script_parses_and_names_the_presets():
    import subprocess

    script = Path(bench.__file__).with_name("gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for preset in ("llama3-8b-qlora", "llama3-3b-selector", "gpu-smollm2", "gpu-paper-shape"):
        assert preset in text and preset in bench.PRESETS


def test_count_step_ops_attributes_each_phase_and_does_not_depend_on_passage_length(tmp_path):
    """scripts/count_step_ops.py: the recipe's own step (here the CPU recipe, LoRA included, on tiny models), each
    phase counted once, and the same count for 2- and 16-token passages — the premise of counting at a small size."""
    import count_step_ops
    from test_data import SHARED, needs_shared

    if not SHARED.exists():
        pytest.skip(needs_shared.kwargs["reason"])
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "hotpotqa_smollm2_cpu.yaml"),
            "--dataset", f"hotpotqa:{SHARED}/hotpotqa_train300/hotpotqa_distractor_train300.jsonl",
            "--model_name_or_path", "tiny:minilm", "--generator_model_name_or_path", "tiny:minilm",
            "--per_device_train_batch_size", "8"]
    counts = [count_step_ops.main(*count_step_ops.parse([*argv, "--passage_tokens", tokens], str(tmp_path / tokens)))
              for tokens in ("2", "16")]
    short, long = (c["steps"][-1] for c in counts)
    phases = [*count_step_ops.PHASES, "backward"]
    assert all(short[p] > 0 for p in phases) and sum(short[p] for p in phases) < short["total"]
    assert {p: short[p] for p in [*phases, "total"]} == {p: long[p] for p in [*phases, "total"]}
    assert counts[0]["shape"]["lora"] is True and counts[0]["shape"]["questions_per_step"] == 2
    assert all(fn.__module__ != "count_step_ops" for fn in  # the trainer's functions are its own again
               (count_step_ops.trainer_module.sample_rankings, count_step_ops.trainer_module.target_logprobs))


@pytest.mark.parametrize("flags, message", [
    (["--num_layers", "0"], "--num_layers must be >= 1, got 0"),  # was a model without decoder layers
    (["--questions", "0"], "--questions must be >= 1, got 0"),  # was replaced by the preset's
    (["--questions", "-3"], "--questions must be >= 1, got -3"),  # was a ZeroDivisionError
    (["--passage_tokens", "0"], "--passage_tokens must be >= 1, got 0"),  # was replaced by the preset's
    (["--passage_tokens", "-5"], "--passage_tokens must be >= 1, got -5"),  # ran
    (["--repeats", "-1"], "--repeats must be >= 0 (0: no timed steps), got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),  # was torch's RuntimeError
    (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),  # was an AssertionError
    (["--preset", "cpu-huge"], "--preset 'cpu-huge' is unknown; known: cpu-paper-shape, cpu-smollm2"),
    (["--paths", "naive,fast"], "--paths: unknown ['fast']"),
])
def test_a_setting_that_would_measure_something_else_is_refused_in_one_line_when_parsed(
        capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine of the report
    err = refusal(capsys, lambda: bench.DROParser((bench.BenchArguments,)).parse_args_and_config(args=flags), "bench.py")
    assert err.startswith(f"bench.py: error: {message}")


def test_an_output_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    def make_rows(*args):
        raise AssertionError("measuring started before the refusal")

    monkeypatch.setattr(bench, "make_rows", make_rows)
    err = refusal(capsys, lambda: bench.main(bench.BenchArguments(output=str(tmp_path))), "bench.py")
    assert err == f"bench.py: error: {tmp_path} is a folder: give a file path\n"


def test_num_layers_above_a_loaded_models_depth_is_refused():
    """The slice kept every layer, and the figures were reported under the larger --num_layers."""
    preset = bench.Preset(selector="tiny:minilm", generator="tiny:minilm", adapters="full", checkpointing=(False,),
                          questions=1, passage_tokens=8)
    with pytest.raises(ValueError, match="--num_layers 3: tiny:minilm has 2 decoder layers"):
        bench.build_base("tiny:minilm", None, preset, 3, 0, "cpu")
    assert len(bench.build_base("tiny:minilm", None, preset, 1, 0, "cpu").model.layers) == 1


def test_one_timed_step_prints_no_spread(capsys):
    figures = {"phases_s": {"sample": 0.1}, "questions_per_s": 1.0, "prompt_tokens_per_s": 9.0, "predicted_flops": 1e12}
    bench.print_row("ours/no-ckpt", {**figures, "step_s": 2.0, "step_s_all": [2.0]})
    bench.print_row("ours/no-ckpt", {**figures, "step_s": 2.0, "step_s_all": [1.8, 2.0, 2.2]})
    one, three = capsys.readouterr().out.splitlines()
    assert "(n = 1)" in one and "±" not in one
    assert "(± 10 %)" in three
