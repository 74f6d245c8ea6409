"""``DROConfig``: GRPOConfig plus the knobs of DRO. Defaults follow the paper (arXiv 2505.03075); extras are opt-in."""

from __future__ import annotations

import math
import types
import typing
import warnings
from collections.abc import Collection
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import huggingface_hub
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from transformers.utils import is_torch_bf16_gpu_available
from trl import GRPOConfig

from rewards import get_reward

from .estimators import ESTIMATORS, GENERATOR_UPDATES, WEIGHT_ESTIMATORS
from .pipeline_config import PipelineConfig
from .selector import LOSS_FORWARDS


# What DROTrainer.evaluate() reports (as eval_<name>): greedy selection, then greedy answers.
EVAL_METRICS = ("support_recall_at_k", "answer_em", "answer_f1")


@dataclass
class DROConfig(GRPOConfig, PipelineConfig):
    """Training arguments of :class:`~dro_rl.DROTrainer`.

    The pipeline's settings (K, passage budgets, prompt caps, retriever; :class:`PipelineConfig`) come first and are
    saved with every checkpoint as ``pipeline.json``. ``num_generations`` is m, the number of rankings sampled per
    question, and ``per_device_train_batch_size`` counts sampled rankings (rows), not questions, as in GRPO. ``temperature`` is the selector's sampling temperature; the
    same temperature scales the logits of the selector's log-probability in the loss, so the loss scores the
    distribution that sampled.
    """

    # Parent defaults changed, with the reason.
    learning_rate: float = field(default=1e-5, metadata={"help": "Selector learning rate (paper: 1e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (paper: 0.01)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (autocast; weights and optimizer states stay float32). Default: on "
                  "where the accelerator supports bf16, off on a CPU (float32), so that the same config or "
                  "`DROConfig(...)` runs on a laptop and a GPU; `true` on a CPU needs `use_cpu: true`."},
    )
    per_device_eval_batch_size: int = field(
        default=32,
        metadata={"help": "Questions per forward in DRO's greedy evaluation (`eval_strategy`, the recipe's before/after "
                  "tables) and in the best_reward warm-up's scoring: the selector's constrained ranking, then the "
                  "generator's answers. Lower it when a large model runs out of memory there."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout probability of both models (LoRA dropout included) to 0, so that the loss "
                  "scores each sampled ranking with the log-probability it was sampled with. The E-step (sampling, "
                  "scoring) runs in eval mode either way; `false` keeps dropout in the M-step's forwards only."},
    )

    selector_loss_forward: Literal["packed", "per_row", "kv_cache"] = field(
        default="packed",
        metadata={"help": "How the selector loss scores the m rankings of a question: `packed` = one sequence per "
                  "question (the prompt once, then the m completions under a block attention mask; needs sdpa or "
                  "eager attention), `per_row` = the prompt once per ranking (the reference), `kv_cache` = the "
                  "prompt once with its KV cache kept for backward (not with gradient checkpointing). All three give "
                  "the same values and gradients."},
    )

    # ---- Exploration: what keeps the selector from settling on one pick ---------------------------------------
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "TRL's entropy bonus, for the selector: the loss subtracts entropy_coef times the mean over "
                  "sampled rankings of the constrained distribution's entropy at each choice, summed along the "
                  "ranking (for K = 1, the entropy of the pick; forced tokens have none). DRO's selector gradient "
                  "is zero for a question whose m samples agree, so a policy that becomes deterministic stays so; "
                  "the bonus keeps a gradient there. 0 (default, the paper): off."},
    )
    shuffle_candidates: bool = field(
        default=False,
        metadata={"help": "Show each training question's candidates to the selector in a random order, drawn anew at "
                  "every step (from seed, the step and the question's id), instead of in retrieval order, so that "
                  "no position is rewarded and only the passages' text can predict the reward (an instruct "
                  "selector's zero-shot pick is the first position). It does not by itself stop a policy from "
                  "settling on one pick (docs/real_model.md). Evaluation, the 'before'/'after' tables and "
                  "prediction keep the retrieval order."},
    )

    sample_without_replacement: bool = field(
        default=False,
        metadata={"help": "Draw a question's m rankings with m different first ids (Gumbel-top-m over the first pick, "
                  "whose exact probabilities the sampler computes; later ids are sampled as usual) and correct the "
                  "importance weights for it (priority sampling: w̃_i ∝ p(z_i,1) / q(z_i,1) · p(y | x, d_{z_i})). "
                  "Sampled with replacement, a selector that becomes near-deterministic draws m equal rankings "
                  "and gets no gradient again; distinct samples always compare m candidates. With K = 1 and m >= N "
                  "the E-step is exact (the posterior over all N picks): a question with m candidates or fewer gets "
                  "each once, and spare samples of weight 0. Generator updates: `weighted` uses the corrected "
                  "weights, `uniform` each distinct sample equally, `best` the highest weight. Needs estimator `dro` "
                  "or `dro_baseline` (docs/estimator.md)."},
    )

    # ---- Weights and advantages ---------------------------------------------------------------------------------
    estimator: Literal["dro", "dro_baseline", "reinforce", "rloo", "grpo"] = field(
        default="dro",
        metadata={
            "help": "Selector advantage (README, 'How DRO is implemented'; docs/estimator.md): `dro` = "
            "self-normalised weights (the paper), `dro_baseline` = weights − 1/m (− ρ̃ without replacement), "
            "`reinforce` = reward, `rloo` = leave-one-out baseline, `grpo` = group-normalised reward (divided by the "
            "group std unless scale_rewards='none')."
        },
    )
    importance_logits: Literal["sum", "mean"] = field(
        default="sum",
        metadata={
            "help": "Log-weights of the E-step: `sum` = log p(y | x, d_z) (the paper), `mean` = per-token mean "
            "(the released scripts; a tempered version)."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["log_likelihood"],
        metadata={
            "help": "Rewards for `reinforce`/`rloo`/`grpo` (names in rewards.REWARDS or dotted paths), summed with "
            "`reward_weights`. With `dro`/`dro_baseline` they are only logged."
        },
    )

    # ---- The generator and its update ---------------------------------------------------------------------------
    generator_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Generator model name or path (when not passed to the trainer as a model)."}
    )
    share_base_model: bool = field(
        default=False,
        metadata={"help": "Selector and generator are two LoRA adapters (`selector`, `generator`) on one frozen base "
                  "model (the selector's), which halves base-model memory (QLoRA on one GPU). Needs use_peft / a "
                  "peft_config; gradient checkpointing stays correct (non-reentrant). Not with FSDP (DeepSpeed is refused "
                  "for every DRO run)."},
    )
    generator_update: Literal["weighted", "uniform", "best", "none"] = field(
        default="weighted",
        metadata={
            "help": "Generator loss: `weighted` = w̃-weighted NLL (the paper), `uniform` = SFT on every sample, "
            "`best` = the highest-weight sample only, `none` = frozen generator."
        },
    )
    generator_learning_rate: float | None = field(
        default=None, metadata={"help": "Generator learning rate; defaults to `learning_rate`."}
    )
    generator_loss_coef: float = field(default=1.0, metadata={"help": "Multiplier of L_generate in the total loss."})
    generator_batch_size: int = field(
        default=64, metadata={"help": "Rows per chunk when the E-step scores answers without gradients "
                              "(generator_scoring `separate`) or decodes greedy answers (answer_em/answer_f1 rewards)."}
    )
    generator_scoring: Literal["auto", "in_loss", "separate"] = field(
        default="auto",
        metadata={"help": "Where the E-step's log p(y | x, d_z) come from: `in_loss` = the generator loss's own "
                  "forward (one generator forward per sample instead of two; the same values, since the E-step is "
                  "dropout-free), `separate` = a no-grad scoring pass before the loss (the reference), `auto` = "
                  "`in_loss` where possible: generator_update not `none`, disable_dropout, and "
                  "per_device_train_batch_size a multiple of num_generations."},
    )

    on_bad_row: Literal["raise", "skip"] = field(
        default="raise",
        metadata={"help": "A malformed training row (empty question/answers, fewer than K candidates, passage "
                  "without text): stop with an error naming row and field, or skip it and report the count."},
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds an earlier run: the earlier run's checkpoints, "
                  "models and reports are removed first. Without it such an output_dir is refused."},
    )

    # ---- Freezing ----------------------------------------------------------------------------------------------
    freeze_selector: bool = field(
        default=False, metadata={"help": "Keep sampling from the selector but do not train it (paper's ablation)."}
    )

    def __post_init__(self):
        # Before the parent's own processing, which fails obscurely on some of these (num_generations = 0 divides by
        # zero inside TRL) or silently on others (a YAML float where an int belongs, a string where a list belongs).
        check_field_types(self)
        check_counts(self)
        refuse_unused_grpo_settings(self)
        for name in self.reward_funcs:
            get_reward(name)  # an unknown name or a dotted path that does not import: refused now, not after loading
        if self.estimator in WEIGHT_ESTIMATORS and list(self.reward_funcs) != ["log_likelihood"]:
            warnings.warn(f"reward_funcs {list(self.reward_funcs)} are logged, not trained on: estimator "
                          f"{self.estimator!r} weighs each sample by the generator's likelihood of the answer "
                          "(reinforce, rloo and grpo train on reward_funcs)", stacklevel=3)
        if self.deepspeed:  # transformers would first fail on a missing package, or start an engine DRO cannot use
            raise ValueError(f"deepspeed={self.deepspeed!r}: {DEEPSPEED_REFUSAL}")
        if self.push_to_hub and huggingface_hub.constants.HF_HUB_OFFLINE:  # else refused after the whole run
            raise ValueError("push_to_hub: true needs the Hugging Face Hub, and HF_HUB_OFFLINE=1 is set: unset it (and "
                             "log in), or leave push_to_hub false — the run folder is a complete model repository, "
                             "`huggingface-cli upload` can push it later")
        best = getattr(self.save_strategy, "value", self.save_strategy) == "best"
        if (self.load_best_model_at_end or best) and self.metric_for_best_model is None:
            self.metric_for_best_model = "answer_em"  # the parent's default, "loss", is no metric evaluate() gives
        metric = (self.metric_for_best_model or "").removeprefix("eval_")
        if metric and not any(metric == m or metric.endswith(f"_{m}") for m in EVAL_METRICS):  # <set>_<metric>: one
            # of a dict of eval sets. Else transformers' KeyError at the first evaluation, after training began
            raise ValueError(f"metric_for_best_model={self.metric_for_best_model!r} is not a metric of DROTrainer's "
                             f"evaluation: use one of {list(EVAL_METRICS)} (the eval_ prefix is optional; with a dict "
                             "of eval sets, <name>_<metric>)")
        if self.bf16 is None:  # TRL's default is True everywhere, which transformers refuses on a CPU-only machine
            self.bf16 = not (self.fp16 or self.use_cpu) and is_torch_bf16_gpu_available()
        elif self.bf16 and not self.use_cpu and not is_torch_bf16_gpu_available():  # e.g. a GPU recipe on a laptop
            raise ValueError("bf16: true needs a GPU with bf16, and this machine has none (a GPU recipe?): set bf16: "
                             "false (float32), or use_cpu: true for bf16 autocast on the CPU")
        if self.num_generations is None or self.num_generations < 1:
            raise ValueError(f"num_generations (m) must be >= 1, got {self.num_generations}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (the selector samples from softmax(logits / "
                             f"T)), got {self.temperature}")
        for name in ("learning_rate", "generator_learning_rate", "generator_loss_coef", "entropy_coef",
                     "weight_decay", "max_grad_norm"):  # max_grad_norm 0: no clipping
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("adam_beta1", "adam_beta2"):  # else torch's "Invalid beta parameter", after the warm-up
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ValueError(f"max_steps must be >= 1, or -1 to train for num_train_epochs, got {self.max_steps}")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1 (0 trains nothing and reports the "
                             f"untrained models), got {self.num_train_epochs}")
        # GRPO refuses m = 1 (its group baseline needs two samples). With one sample w̃ = 1, so the selector's
        # expected gradient is exactly zero: refused while the selector trains; a frozen selector's generator-only
        # training is fine, so the parent checks then run with 2.
        single = self.num_generations == 1
        if single and not self.freeze_selector:
            raise ValueError("num_generations = 1 (m = 1) gives the selector pure noise: with one sample its weight "
                             "is 1 and the expected gradient is exactly zero (docs/estimator.md has the measured "
                             "table). Use m >= 2 (paper: 8), or freeze_selector: true to train the generator alone.")
        if single:
            self.num_generations = 2
        # DRO's evaluation is greedy, one pick per question (DROTrainer.evaluate): GRPO's check that the eval batch
        # holds whole groups of num_generations_eval samples does not apply, so it runs with groups of one.
        eval_generations, self.num_generations_eval = self.num_generations_eval, 1
        try:
            if self.generation_batch_size is None:  # else TRL derives steps_per_generation from it, checked below
                # TRL refuses this too, but inside its own __post_init__: the message would come with its traceback.
                self._check_whole_groups(self.steps_per_generation or self.gradient_accumulation_steps, single)
            super().__post_init__()
        finally:
            self.num_generations_eval = eval_generations
            if single:
                self.num_generations = 1
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if self.generator_update not in GENERATOR_UPDATES:
            raise ValueError(f"generator_update={self.generator_update!r} is not one of {GENERATOR_UPDATES}")
        if self.selector_loss_forward not in LOSS_FORWARDS:
            raise ValueError(f"selector_loss_forward={self.selector_loss_forward!r} is not one of {LOSS_FORWARDS}")
        if self.selector_loss_forward == "kv_cache" and self.gradient_checkpointing:
            raise ValueError("selector_loss_forward='kv_cache' cannot run under gradient checkpointing (its recomputed "
                             "forwards keep no cache); use 'packed'")
        if self.importance_logits not in ("sum", "mean"):
            raise ValueError(f"importance_logits={self.importance_logits!r} is not one of ('sum', 'mean')")
        if self.estimator == "grpo" and self.scale_rewards not in ("group", "none", True, False):
            raise ValueError(f"estimator='grpo' supports scale_rewards 'group' or 'none', not {self.scale_rewards!r}")
        self.check_pipeline()
        if self.freeze_selector and self.generator_update == "none":
            raise ValueError("freeze_selector=True with generator_update='none' leaves nothing to train")
        if self.sample_without_replacement and self.estimator not in WEIGHT_ESTIMATORS:
            raise ValueError(f"sample_without_replacement corrects the weights of estimator 'dro' and "
                             f"'dro_baseline'; estimator={self.estimator!r} assumes samples drawn with replacement")
        if self.freeze_selector and self.entropy_coef:
            raise ValueError(f"entropy_coef={self.entropy_coef} is a bonus for the selector's training, which "
                             "freeze_selector=True turns off: set entropy_coef to 0 or train the selector")
        self._check_whole_groups(self.steps_per_generation)
        if self.gradient_accumulation_steps % self.steps_per_generation:
            # A generation batch spanning two optimizer steps would train its later micro-batches on samples drawn,
            # and weights scored, by the parameters before the step: off-policy, with no correction (GRPO's ratio
            # for this is not DRO's estimator).
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must divide gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}): DRO trains each generation batch within one optimizer step, "
                "on the parameters that sampled and scored it; leave steps_per_generation (and "
                "generation_batch_size) unset, or make gradient_accumulation_steps a multiple of it"
            )
        if self.generator_scoring not in ("auto", "in_loss", "separate"):
            raise ValueError(f"generator_scoring={self.generator_scoring!r} is not one of ('auto', 'in_loss', "
                             f"'separate')")
        if self.generator_scoring == "in_loss" and self._in_loss_blocker():
            raise ValueError(f"generator_scoring='in_loss' needs {self._in_loss_blocker()}; use 'auto' or 'separate'")
        if self.generator_learning_rate is None:
            self.generator_learning_rate = self.learning_rate
        if self.device.type == "cpu":  # pinned memory speeds host-to-accelerator copies; without one torch warns
            self.dataloader_pin_memory = False
        check_report_to(self.report_to)

    def check_enough_questions(self, num_questions: int) -> None:
        """Refuse a training set smaller than one generation batch: TRL's sampler drops an incomplete batch, so the
        run would train 0 steps and still end as if finished."""
        per_step = self.generation_batch_size // self.num_generations
        if num_questions < per_step:
            raise ValueError(
                f"the training set has {num_questions} questions, fewer than the {per_step} that one step samples "
                f"(per_device_train_batch_size {self.per_device_train_batch_size} x steps_per_generation "
                f"{self.steps_per_generation} x {self.world_size} process(es) / num_generations "
                f"{self.num_generations}): no step could run; give more questions or lower "
                "per_device_train_batch_size")

    def check_prompts_fit(self, tok, gtok, rows) -> None:
        """Build both prompts for the question with the most candidates and for the longest question: a
        ``max_prompt_length`` / ``generator_max_prompt_length`` too small for them is refused before any training,
        not at DRO's first step (after the recipe's warm-up and "before" evaluation)."""
        for row in (max(rows, key=lambda r: len(r["passages"])), max(rows, key=lambda r: len(r["question"]))):
            self.selector_prompt()(tok, row["question"], row["passages"])
            self.generator_prompt()(gtok, row["question"], row["passages"][: self.num_docs_selected])

    def _check_whole_groups(self, steps_per_generation: int, single: bool = False) -> None:
        local_rows = self.per_device_train_batch_size * steps_per_generation
        if local_rows % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size × steps_per_generation ({local_rows}) must be a multiple of "
                f"num_generations ({self.num_generations}) so each process holds whole question groups" +
                (" (num_generations = 1 runs as 2 in TRL's batching)" if single else "")
            )

    @property
    def scores_in_loss(self) -> bool:
        """Whether the generator loss's forward also gives the E-step's answer log-likelihoods
        (``generator_scoring``)."""
        return self.generator_scoring != "separate" and self._in_loss_blocker() is None

    def _in_loss_blocker(self) -> str | None:
        """Why the loss cannot score the generator, or None. The weights of a question need all m of its samples
        scored by the same parameters in one micro-batch, with the same (dropout-free) forward as the E-step's."""
        if self.generator_update == "none":
            return "a generator loss (generator_update is 'none': there is no loss forward to take the scores from)"
        if not self.disable_dropout:
            return "disable_dropout: true (with dropout the loss's forward is not the E-step's)"
        if self.per_device_train_batch_size % self.num_generations:
            return (f"per_device_train_batch_size ({self.per_device_train_batch_size}) to be a multiple of "
                    f"num_generations ({self.num_generations}), so that a micro-batch holds whole question groups")
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Settings checked when the config is built, so a wrong value stops a run in its first second
# ---------------------------------------------------------------------------------------------------------------------

# GRPO settings DRO does not implement: the constrained sampler draws from softmax(logits / T) over the id grammar
# (no top-p/top-k/min-p/repetition penalty, no vLLM), the loss is DRO's (no clipping, KL, entropy or GRPO loss types),
# and each generation batch is used once (num_iterations > 1 would reuse stale samples without correction).
UNUSED_GRPO_SETTINGS: tuple[str, ...] = (
    "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs", "chat_template_kwargs",
    "cache_implementation", "max_completion_length", "use_vllm", "beta", "num_iterations", "epsilon", "delta",
    "epsilon_high", "importance_sampling_level", "multi_objective_aggregation", "loss_type",
    "mask_truncated_completions", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "top_entropy_quantile", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max",
    "entropy_coef_delta", "entropy_target", "max_tool_calling_iterations", "off_policy_mask_threshold",
    "use_bias_correction_kl", "use_transformers_continuous_batching", "transformers_continuous_batching_config",
    "use_transformers_paged", "num_generations_eval", "router_aux_loss_coef", "pad_to_multiple_of",
    "log_completions_hub_repo",
)
_UNUSED_PREFIXES = ("vllm_", "sapo_", "vespo_")
# TrainingArguments settings with no effect on DRO, or one that would change what its loss scores: GRPO's sampler
# orders the data with `seed` (not `data_seed` or `train_sampling_strategy`), the loss is DRO's (no label smoothing;
# with Liger, GRPO's compute_loss would run its own loss instead of DRO's; NEFTune's noise on the embeddings in train
# mode would score the rankings under another distribution than the one that sampled them), and evaluation is DRO's
# greedy pipeline, not the Trainer's prediction loop.
UNUSED_TRAINER_SETTINGS: tuple[str, ...] = (
    "data_seed", "train_sampling_strategy", "label_smoothing_factor", "use_liger_kernel", "liger_kernel_config",
    "neftune_noise_alpha",
    "eval_accumulation_steps", "prediction_loss_only", "include_for_metrics", "eval_do_concat_batches",
    "batch_eval_metrics",
)


FP16_ON_CPU = ("fp16: true has no effect on a CPU (Accelerate's CPU autocast is bf16 only): the run would train in "
               "float32 and record fp16; leave it false, or use bf16: true with use_cpu: true")

DEEPSPEED_REFUSAL = (
    "DeepSpeed is not supported by DROTrainer: the generator is a second trainable model outside the DeepSpeed "
    "engine, so its gradients would not be averaged across processes. Launch with DDP (configs/accelerate/ddp.yaml), "
    "using QLoRA and share_base_model: true to fit large models."
)


def unused_grpo_setting(name: str) -> bool:
    """True for an inherited field (GRPOConfig's or TrainingArguments') that DROTrainer does not use (refused unless
    left at its default)."""
    return name in UNUSED_GRPO_SETTINGS or name in UNUSED_TRAINER_SETTINGS or name.startswith(_UNUSED_PREFIXES)


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def refuse_unused_grpo_settings(config: GRPOConfig) -> None:
    """A non-default value of a GRPO setting DRO does not implement is an error, never silently ignored."""
    for f in fields(GRPOConfig):
        if unused_grpo_setting(f.name) and getattr(config, f.name) != _default(f):
            why = ("the data order comes from `seed`, the loss is DRO's and evaluation is its greedy pipeline"
                   if f.name in UNUSED_TRAINER_SETTINGS else "the selector samples K ids from softmax(logits / "
                   "temperature) under the id grammar, and the loss is DRO's")
            raise ValueError(f"{f.name}={getattr(config, f.name)!r}: DRO does not use this setting ({why}); leave it "
                             f"at its default {_default(f)!r}")


def _accepts(hint: Any, kind: type) -> bool:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (
        hint,)
    return any(a is kind or typing.get_origin(a) is kind for a in args)


def _list_of(hint: Any) -> Any:
    """The item type of the ``list[...]`` in ``hint`` (None if there is none)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is not list else (hint,)
    return next((typing.get_args(a)[0] for a in args if typing.get_origin(a) is list and typing.get_args(a)), None)


def check_field_types(config: Any, names: Collection[str] | None = None) -> None:
    """Catch what YAML lets through untyped: a float or string where an int belongs, a non-boolean for a flag (``0``
    equals ``False`` but is not a flag), ``null`` for a setting that has no such value, a string for a list
    (``reward_funcs: log_likelihood`` would be read one character at a time). ``names``: only these fields (of a
    dataclass whose hints are narrower than what its fields take)."""
    hints = typing.get_type_hints(type(config))
    for f in (f for f in fields(config) if names is None or f.name in names):
        hint, value, default = hints.get(f.name), getattr(config, f.name), _default(f)
        if hint is None or (type(value) is type(default) and value == default):
            continue
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if value is None:
            if (hint in (bool, int, float) or choices) and default is not None:  # no "unset" value
                raise ValueError(f"{f.name} cannot be null: leave it out for its default, {default!r}")
            continue
        if choices and value not in choices:  # the command line's parser checks these; YAML does not
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if _accepts(hint, int) and not _accepts(hint, float) and not _accepts(hint, str):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r} ({type(value).__name__})")
        elif hint is bool and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r} ({type(value).__name__})")
        elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{f.name} must be a number, got {value!r} ({type(value).__name__})")
        elif _accepts(hint, list) and not _accepts(hint, str) and isinstance(value, str):
            raise ValueError(f"{f.name} must be a list (YAML: `{f.name}: [{value}]`), got the string {value!r}")
        elif _accepts(hint, list) and isinstance(value, list) and _list_of(hint) is str and not all(
                isinstance(item, str) for item in value):
            raise ValueError(f"{f.name} must be a list of strings, got {value!r} (YAML: quote each item)")
        elif (_accepts(hint, str) and not isinstance(value, str)
              and not any(_accepts(hint, kind) for kind in (bool, int, float, list, dict))):
            # YAML reads `yes`/`no`/`on`/`off` as booleans and digits as numbers: `retriever_model: yes` is True
            raise ValueError(f"{f.name} must be a string, got {value!r} ({type(value).__name__}); in YAML, quote it")


def check_counts(config: Any) -> None:
    """Counts the Trainer divides by or draws batches with, and the seed: refused in one line here, not by a
    ZeroDivisionError inside TRL or a torch error after the data stage and the model loads."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "generator_batch_size",
                 "gradient_accumulation_steps", "steps_per_generation"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= config.seed < 2**32:
        raise ValueError(f"seed must be between 0 and 2**32 - 1 (what numpy and torch accept), got {config.seed}")
    for what in ("save", "eval", "logging"):  # a steps strategy every 0 steps would never save, evaluate or log
        strategy, steps = getattr(config, f"{what}_strategy"), getattr(config, f"{what}_steps")
        if getattr(strategy, "value", strategy) == "steps" and steps is not None and steps <= 0:  # str or enum
            raise ValueError(f"{what}_steps must be > 0 with {what}_strategy: steps (a number of steps, or a fraction "
                             f"of the run below 1), got {steps}")


def check_report_to(report_to: list[str] | str | None) -> None:
    """Every ``report_to`` backend must be importable now, not when the Trainer starts after retrieval and warm-up."""
    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [name for name in wanted if name not in ("none", "all") and name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ValueError(f"report_to={unknown}: no integration of that name; use none, all or one of "
                         f"{sorted(INTEGRATION_TO_CALLBACK)}")
    available = set(get_available_reporting_integrations())
    missing = [name for name in wanted if name not in ("none", "all") and name not in available]
    if missing:
        raise ValueError(
            f"report_to={missing} is not installed here: install it (`pip install 'dro-rl[{missing[0]}]'` for "
            f"tensorboard or wandb) or use report_to: none"
        )
