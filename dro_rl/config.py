"""``DROConfig``: GRPOConfig plus the knobs of DRO. Defaults follow the paper (METHOD.md §6); extras are opt-in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig

from .estimators import ESTIMATORS, GENERATOR_UPDATES
from .pipeline_config import PipelineConfig


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
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout probability of both models (LoRA dropout included) to 0, so that the loss "
                  "scores each sampled ranking with the log-probability it was sampled with. The E-step (sampling, "
                  "scoring) runs in eval mode either way; `false` keeps dropout in the M-step's forwards only."},
    )

    share_prompt_forward: bool = field(
        default=False,
        metadata={"help": "In the loss, run each question's prompt once and only the m completions per sample "
                  "(same values and gradients as the per-row forward; ignored under gradient checkpointing)."},
    )

    # ---- Weights and advantages ---------------------------------------------------------------------------------
    estimator: Literal["dro", "dro_baseline", "reinforce", "rloo", "grpo"] = field(
        default="dro",
        metadata={
            "help": "Selector advantage (METHOD.md §3): `dro` = self-normalised weights (the paper), `dro_baseline` = "
            "weights − 1/m, `reinforce` = reward, `rloo` = leave-one-out baseline, `grpo` = group-normalised reward "
            "(divided by the group std unless scale_rewards='none')."
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
        default=64, metadata={"help": "Rows per chunk when scoring answers without gradients."}
    )

    on_bad_row: Literal["raise", "skip"] = field(
        default="raise",
        metadata={"help": "A malformed training row (empty question/answers, fewer than K candidates, passage "
                  "without text): stop with an error naming row and field, or skip it and report the count."},
    )

    # ---- Freezing ----------------------------------------------------------------------------------------------
    freeze_selector: bool = field(
        default=False, metadata={"help": "Keep sampling from the selector but do not train it (paper's ablation)."}
    )

    def __post_init__(self):
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
        try:
            super().__post_init__()
        finally:
            if single:
                self.num_generations = 1
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if self.generator_update not in GENERATOR_UPDATES:
            raise ValueError(f"generator_update={self.generator_update!r} is not one of {GENERATOR_UPDATES}")
        if self.importance_logits not in ("sum", "mean"):
            raise ValueError(f"importance_logits={self.importance_logits!r} is not one of ('sum', 'mean')")
        if self.estimator == "grpo" and self.scale_rewards not in ("group", "none", True, False):
            raise ValueError(f"estimator='grpo' supports scale_rewards 'group' or 'none', not {self.scale_rewards!r}")
        self.check_pipeline()
        if self.freeze_selector and self.generator_update == "none":
            raise ValueError("freeze_selector=True with generator_update='none' leaves nothing to train")
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size × steps_per_generation ({local_rows}) must be a multiple of "
                f"num_generations ({self.num_generations}) so each process holds whole question groups"
            )
        if self.generator_learning_rate is None:
            self.generator_learning_rate = self.learning_rate
