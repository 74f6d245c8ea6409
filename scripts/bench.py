"""Time one DRO step, ours against a naive reference doing the same math, on identical models and data.

    python scripts/bench.py --preset cpu-tiny              # N = 20 passages of ~100 words, K = 5, m = 4
    python scripts/bench.py --preset llama3-8b-qlora       # GPU: Llama-3-8B shape, 4-bit base + LoRA, random weights
    python scripts/bench.py --preset llama3-3b-selector    # GPU: Llama-3.2-3B-shape selector, 8B-shape generator
    python scripts/bench.py --preset llama3-8b-qlora --device cpu --num_layers 2 --paths ours-shared --repeats 0
                                                           # peak memory of a 2-layer slice, measured on CPU

Paths, all computing the same loss on the same sampled rankings:
- ``naive``, the way the released DRO scripts run: the N-passage prompt prefilled once per sample (m times per
  question) for sampling, and one forward + backward per sampled row in the selector loss;
- ``ours``: one prefill per question shared by its m samples (``sample_rankings``) and, without gradient
  checkpointing, one prompt forward + backward per question in the loss (``ranking_logprobs_shared``);
- ``ours-shared``: ``ours`` with the selector and the generator as two LoRA adapters on one 4-bit base
  (``share_base_model``).
Generator scoring and loss are the same code everywhere; each timed step ends with an AdamW update.

GPU presets build models of the real shape from a config with random weights (nothing is downloaded) and quantise
their decoder layers in memory with bitsandbytes NF4, as ``load_in_4bit`` does. Passages are ``passage_words``
word-level tokens (130 ≈ the Llama-3 token count of a 100-word passage). Peak memory, over one more step per path:
the CUDA allocator's peak on a GPU; on CPU, the peak of live tensor storages (``LiveTensors``) plus the resident
weights and optimizer state.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM
from trl import ModelConfig, TrlParser, get_quantization_config

from dro_rl import estimators as E
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split
from dro_rl.generator import GeneratorPrompt, batch_answer_logprobs, target_logprobs
from dro_rl.models import (
    GENERATOR,
    SELECTOR,
    as_role,
    cast_adapters_to_bf16,
    enable_adapter_checkpointing,
    shared_base_model,
)
from dro_rl.selector import (
    IdGrammar,
    SelectorPrompt,
    left_pad,
    ranking_logprobs,
    ranking_logprobs_shared,
    right_pad,
    sample_rankings,
)

N, K, M = 20, 5, 4
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)
LLAMA32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True)  # vocabulary: the tokenizer's
LORA = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class Preset:
    selector: dict
    generator: dict
    qlora: bool  # 4-bit NF4 base + LoRA r=16 on every linear layer, bf16; else full fine-tuning in fp32
    checkpointing: bool
    questions: int
    passage_words: int
    paths: tuple[str, ...]


PRESETS = {
    "cpu-tiny": Preset(TINY, TINY, False, False, 4, 100, ("naive", "ours")),
    # the paper's recipe: 8 rows per micro-batch = 2 questions x m (configs/paper/llama3_8b_qlora_nq.yaml)
    "llama3-8b-qlora": Preset(LLAMA3_8B, LLAMA3_8B, True, True, 2, 130, ("naive", "ours", "ours-shared")),
    "llama3-3b-selector": Preset(LLAMA32_3B, LLAMA3_8B, True, True, 2, 130, ("naive", "ours")),
}


@dataclass
class BenchArguments:
    preset: str = field(default="cpu-tiny", metadata={"help": f"One of {sorted(PRESETS)}."})
    questions: int | None = field(default=None, metadata={"help": "Questions per step (Q); default: the preset's."})
    repeats: int = field(default=3, metadata={"help": "Timed steps per path (after one warm-up step); 0: none."})
    passage_words: int | None = field(default=None, metadata={"help": "Tokens per passage; default: the preset's."})
    num_layers: int | None = field(
        default=None, metadata={"help": "Decoder layers of both models (a slice of the real depth); default: all."}
    )
    paths: str | None = field(default=None, metadata={"help": "Comma-separated paths to run; default: the preset's."})
    device: str = field(default="auto", metadata={"help": "`cuda`, `cpu`, or `auto` (CUDA when available)."})
    threads: int = field(default=1, metadata={"help": "CPU threads (the CPU figures in docs/benchmarks.md use one)."})
    output: str | None = field(default=None, metadata={"help": "Append the figures as one JSON line to this file."})


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def make_rows(questions: int, passage_words: int) -> list[dict]:
    """Demo questions with N = 20 candidates, every passage padded to ``passage_words`` words."""
    rng = random.Random(0)
    rows = make_split(WorldConfig(num_candidates=N, seed=0), questions, 1)
    words = sorted({w for r in rows for p in r["passages"] for w in p["text"].split()})
    for r in rows:
        for p in r["passages"]:
            p["text"] += " " + " ".join(rng.choice(words) for _ in range(passage_words - len(p["text"].split())))
    return rows


def quantize_4bit(model: LlamaForCausalLM) -> None:
    """Swap every decoder-layer linear for a bitsandbytes 4-bit one, with the settings ``load_in_4bit`` gives."""
    import bitsandbytes as bnb

    q = get_quantization_config(ModelConfig(load_in_4bit=True, dtype="bfloat16"))
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            settings = dict(compress_statistics=q.bnb_4bit_use_double_quant, quant_type=q.bnb_4bit_quant_type,
                            quant_storage=q.bnb_4bit_quant_storage)
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=q.bnb_4bit_compute_dtype, device="meta", **settings)
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, **settings)
            setattr(parent, name, layer.to(child.weight.device))  # .to() quantises; the bf16 weight is freed
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT then wraps the layers with 4-bit LoRA


def build_base(shape: dict, tok, preset: Preset, num_layers: int | None, seed: int, device: str):
    """A randomly initialised Llama of ``shape`` (vocabulary at least the tokenizer's), 4-bit if QLoRA."""
    values = {**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tok))}
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    cfg = LlamaConfig(**values, max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    dtype, previous = (torch.bfloat16 if preset.qlora else torch.float32), torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    if preset.qlora:
        quantize_4bit(model)
    return model


@dataclass
class Models:
    selector: torch.nn.Module
    generator: torch.nn.Module
    shared: bool  # one base, two adapters: the selector and the generator are the same module

    def role(self, name: str) -> AbstractContextManager:
        return as_role(self.selector, name)

    def modules(self) -> list[torch.nn.Module]:
        """The distinct models: one with a shared base, two otherwise."""
        return list({id(m): m for m in (self.selector, self.generator)}.values())

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def checkpointing(self, on: bool) -> None:
        """Gradient checkpointing on for the loss, off for the E-step (as TRL's unwrap_model_for_generation does)."""
        for model in self.modules():
            base = model.get_base_model()
            if not on:
                base.activation_checkpointing_disable()
            elif self.shared:
                enable_adapter_checkpointing(model, {"use_reentrant": False})
            else:
                base.activation_checkpointing_enable({"use_reentrant": False})


def build_models(preset: Preset, tok, args: BenchArguments, shared: bool, device: str) -> Models:
    """Selector and generator as in training: QLoRA adapters (shared base or not) with checkpointing, or full."""
    layers = args.num_layers
    if shared:
        model = shared_base_model(build_base(preset.selector, tok, preset, layers, 0, device), LORA, LORA)
        models = Models(model, model, True)
    else:  # the same base weights when both shapes agree, as when one checkpoint serves both roles
        gen_seed = 0 if preset.qlora and preset.generator == preset.selector else 1
        selector = build_base(preset.selector, tok, preset, layers, 0, device)
        generator = build_base(preset.generator, tok, preset, layers, gen_seed, device)
        if preset.qlora:
            selector, generator = get_peft_model(selector, LORA), get_peft_model(generator, LORA)
        models = Models(selector, generator, False)
    for model in models.modules():
        if preset.qlora:
            cast_adapters_to_bf16(model)
        if preset.checkpointing:
            model.enable_input_require_grads()
    return models


# ---------------------------------------------------------------------------------------------------------------------
# One DRO step
# ---------------------------------------------------------------------------------------------------------------------


def step(rows, tok, models: Models, path: str, checkpointing: bool, seed: int, optimizer=None) -> float:
    """One DRO step (E-step, both losses, backward, optional optimizer update); returns the loss."""
    device = next(models.selector.parameters()).device
    grammar = IdGrammar(tok, N)
    sprompt, gprompt = SelectorPrompt(K, 1_000, False), GeneratorPrompt(1_000, False)
    prompts = [sprompt(tok, r["question"], r["passages"]) for r in rows]
    sizes = [len(r["passages"]) for r in rows]
    gen = torch.Generator(device).manual_seed(seed)
    # Train mode throughout: on CPU, bitsandbytes turns 4-bit weights into an inference-only layout (no gradient
    # through the base) at their first eval-mode forward.
    if checkpointing:
        models.checkpointing(False)
    with models.role(SELECTOR):
        if path == "naive":  # every sample prefills its own copy of the prompt
            s = sample_rankings(models.selector, grammar, [p for p in prompts for _ in range(M)],
                                [n for n in sizes for _ in range(M)], K, 1, pad_token_id=tok.pad_token_id,
                                generator=gen)
        else:
            s = sample_rankings(models.selector, grammar, prompts, sizes, K, M, pad_token_id=tok.pad_token_id,
                                generator=gen)
    rows_m = [r for r in rows for _ in range(M)]
    g_prompts = [gprompt(tok, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows_m, s.picks)]
    targets = [gprompt.target(tok, r["answers"][0]) for r in rows_m]
    with models.role(GENERATOR):
        answer_logp = batch_answer_logprobs(models.generator, g_prompts, targets, tok.pad_token_id)
    weights = E.importance_weights(answer_logp.view(-1, M))
    adv = E.advantages("dro_baseline", weights, answer_logp.view(-1, M)).reshape(-1)

    if checkpointing:
        models.checkpointing(True)
    p_ids, p_mask = left_pad([p for p in prompts for _ in range(M)], tok.pad_token_id, device)
    completion = (s.completion_ids, s.completion_mask, s.allowed)
    with models.role(SELECTOR):
        if path != "naive" and not checkpointing:  # checkpointing re-runs forwards without a KV cache
            group = torch.arange(len(rows), device=device).repeat_interleave(M)
            logp = ranking_logprobs_shared(models.selector, p_ids, p_mask, group, *completion)
        else:
            logp = ranking_logprobs(models.selector, p_ids, p_mask, *completion)
    g_ids, g_mask = left_pad(g_prompts, tok.pad_token_id, device)
    y_ids, y_mask = right_pad(targets, tok.pad_token_id, device)
    with models.role(GENERATOR):
        gen_logp = target_logprobs(models.generator, g_ids, g_mask, y_ids, y_mask).sum(-1)
    loss = E.selector_loss(adv, logp, M) + E.generator_loss(weights.reshape(-1), gen_logp, M)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    for p in models.trainable():
        p.grad = None
    return loss.item()


class LiveTensors(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive: the CPU stand-in for the CUDA
    allocator's peak (no caching, no fragmentation). Storages in ``known`` (weights, optimizer state) already exist:
    views of them are not new memory. torch's MemTracker would do, but it needs every parameter to require grad,
    which a frozen 4-bit base does not."""

    def __init__(self, known: set[int] = frozenset()):
        super().__init__()
        self.live, self.peak, self.refs, self.known = 0, 0, {}, known

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.refs and key not in self.known:
                    self.refs[key] = weakref.ref(storage, partial(self._free, key, storage.nbytes()))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, nbytes: int, _ref) -> None:
        self.refs.pop(key, None)
        self.live -= nbytes


def peak_memory(run, device: str, models: Models, optimizer) -> tuple[float, float]:
    """(result of ``run``, its peak memory in GiB), weights and optimizer state included."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() / 2**30
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in resident_tensors(models, optimizer)}
    with LiveTensors(set(held)) as tracker:
        result = run()
    return result, (sum(held.values()) + tracker.peak) / 2**30


def resident_tensors(models: Models, optimizer) -> list[torch.Tensor]:
    """Weights, buffers, 4-bit quantisation statistics and optimizer state: what stays between steps."""
    tensors = []
    for m in models.modules():
        tensors += [*m.parameters(), *m.buffers()]
        for p in m.parameters():
            state = getattr(p, "quant_state", None)
            if state is not None:
                tensors += [t for t in tree_leaves(state.as_dict(packed=True)) if isinstance(t, torch.Tensor)]
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return tensors


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def main(args: BenchArguments) -> dict:
    preset = PRESETS[args.preset]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",") if args.paths else list(preset.paths)
    words = args.passage_words or preset.passage_words
    rows = make_rows(args.questions or preset.questions, words)
    tok = demo_tokenizer(rows, N, K)
    tokens = sum(len(SelectorPrompt(K, 1_000, False)(tok, r["question"], r["passages"])) for r in rows)
    out = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "num_layers": args.num_layers, "questions": len(rows), "prompt_tokens_per_question": tokens // len(rows),
        "checkpointing": preset.checkpointing, "qlora": preset.qlora, "paths": {},
    }
    print(f"preset {args.preset} on {out['device']}: Q = {len(rows)} questions, N = {N} x {words} tokens, K = {K}, "
          f"m = {M}; prompt tokens per question {tokens // len(rows)}; layers {args.num_layers or 'all'}; "
          f"checkpointing {preset.checkpointing}", flush=True)
    # Paths on separate bases share one pair of models; the shared-base path gets its own, built after the others
    # are freed, so each peak holds only that path's models.
    for shared in (False, True):
        names = [p for p in paths if (p == "ours-shared") == shared]
        if names:
            out["paths"].update(time_paths(rows, tok, preset, args, shared, names, device, tokens))
    check_losses(out, strict=not preset.qlora)
    if {"naive", "ours"} <= set(out["paths"]) and args.repeats:
        out["ratio_naive_over_ours"] = out["paths"]["naive"]["step_s"] / out["paths"]["ours"]["step_s"]
        print(f"  ratio naive/ours (median step time): {out['ratio_naive_over_ours']:.2f}x")
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


def time_paths(rows, tok, preset: Preset, args: BenchArguments, shared: bool, names: list[str], device: str,
               tokens: int) -> dict[str, dict]:
    """Loss check, interleaved timed steps and one peak-memory step per path, on one set of models."""
    models = build_models(preset, tok, args, shared, device)
    weights = sum(p.numel() * p.element_size() for m in models.modules() for p in m.parameters()) / 2**30
    optimizer = torch.optim.AdamW(models.trainable(), lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    # Same weights and seed before any update: every path must give the same loss. The step doubles as warm-up; with
    # one path and no timed steps it is skipped, and the memory step (same seed) gives the loss.
    figures = {n: {"weights_gib": weights} for n in names}
    if len(names) > 1 or args.repeats:
        for n in names:
            figures[n]["loss"] = step(rows, tok, models, n, preset.checkpointing, 1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:  # interleaved, so drift in machine load hits every path alike
            sync()
            start = time.perf_counter()
            step(rows, tok, models, name, preset.checkpointing, 2 + r, optimizer)
            sync()
            times[name].append(time.perf_counter() - start)
    for name, f in figures.items():
        run = partial(step, rows, tok, models, name, preset.checkpointing, 1, optimizer)
        loss, f["peak_gib"] = peak_memory(run, device, models, optimizer)
        f.setdefault("loss", loss)
        line = ""
        if times[name]:
            t = statistics.median(times[name])
            f.update(step_s=t, questions_per_s=len(rows) / t, prompt_tokens_per_s=tokens * M / t)
            line = f"step {t:7.2f} s  {len(rows) / t:6.2f} questions/s  {tokens * M / t:9.0f} prompt tokens/s  "
        print(f"  {name:11s} {line}peak {f['peak_gib']:7.3f} GiB (weights {weights:.3f} GiB)  loss {f['loss']:.6f}",
              flush=True)
    del models, optimizer, run
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return figures


def check_losses(out: dict, strict: bool) -> None:
    """Every path computes the same loss; in fp32 a disagreement stops the run, in bf16 it is reported."""
    losses = {name: figures["loss"] for name, figures in out["paths"].items()}
    ref = next(iter(losses.values()))
    spread = max(abs(v - ref) for v in losses.values()) / max(1.0, abs(ref))
    out["loss_relative_spread"] = spread
    if spread > 1e-4:
        if strict:
            raise SystemExit(f"the paths disagree: {losses}")
        print(f"  note: losses differ by {spread:.2e} relative (bf16 kernels differ between batch shapes)")


if __name__ == "__main__":
    main(*TrlParser((BenchArguments,)).parse_args_and_config())
