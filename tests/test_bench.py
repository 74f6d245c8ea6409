"""scripts/bench.py: the memory tracker, and the QLoRA presets' code path (4-bit base, LoRA, shared base, gradient
checkpointing) at a tiny width on CPU."""

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402


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

    preset = bench.Preset(bench.TINY, bench.TINY, qlora=True, checkpointing=True, questions=1, passage_words=6,
                          paths=("naive", "ours", "ours-shared"))
    rows = bench.make_rows(preset.questions, preset.passage_words)
    tok = bench.demo_tokenizer(rows, bench.N, bench.K)
    args = bench.BenchArguments(repeats=1)
    separate = bench.time_paths(rows, tok, preset, args, False, ["naive", "ours"], "cpu", 100)
    shared = bench.time_paths(rows, tok, preset, args, True, ["ours-shared"], "cpu", 100)
    losses = [separate["naive"]["loss"], separate["ours"]["loss"], shared["ours-shared"]["loss"]]
    assert losses == pytest.approx([losses[0]] * 3, rel=2e-2)  # bf16: same math, other batch shapes
    assert shared["ours-shared"]["weights_gib"] < separate["ours"]["weights_gib"]
    assert shared["ours-shared"]["peak_gib"] < separate["ours"]["peak_gib"]
    assert all(f["step_s"] > 0 for f in (*separate.values(), *shared.values()))

    models = bench.build_models(preset, tok, args, True, "cpu")
    layers = [m for m in models.selector.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * bench.TINY["num_hidden_layers"]
    lora = {n.split(".")[-2] for n, p in models.selector.named_parameters() if p.requires_grad}
    assert lora == {"selector", "generator"}


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
    for preset in ("llama3-8b-qlora", "llama3-3b-selector"):
        assert preset in text and preset in bench.PRESETS
