"""``DROTrainer``: the DRO E-step and M-step on TRL's GRPO machinery.

Overridden, and why:

- ``__init__``: builds the second trainable model, the generator, and the selector's id grammar;
- ``_generate_and_score_completions``: the E-step (constrained sampling; unless the loss does it, generator scoring,
  weights and advantages in ``_weigh``), replacing GRPO's free-form generation and group-mean advantage;
- ``_compute_loss``: the M-step, L_generate + L_select, replacing GRPO's clipped token-level loss (a DRO sample is
  scored under the constrained distribution that drew it, which GRPO's unconstrained log-probs are not). By default
  (``DROConfig.scores_in_loss``) the generator's forward in the loss also gives the E-step's log p(y | x, d_z), from
  which ``_weigh`` computes the weights and advantages: one generator forward per sample instead of two;
- ``_prepare_inputs``: a generation batch is cut into micro-batches in order, so they hold whole question groups;
- ``create_optimizer`` / ``_clip_grad_norm`` / ``_get_grad_norm``: the generator's own param groups (own learning
  rate, the selector's weight-decay rule), its own clipping, and the guard that skips a non-finite update on every
  process at once;
- ``save_model`` / ``_save_checkpoint`` / ``_load_from_checkpoint`` / ``_load_best_model``: every save is a run folder
  (``dro_rl.run_folder``: ``selector/``, ``generator/``, ``pipeline.json``, a completion marker; the final one also the
  log history and the model card, swapped in atomically); resuming and best-model loading restore both models;
- ``_get_train_sampler`` / ``_run_epoch``: each pass over the data shuffled from (seed, pass), so that a resume in
  any pass, on any number of processes, continues the uninterrupted run's order;
- ``_issue_warnings_after_load``: no "missing key" notice for a tied output embedding;
- ``create_model_card``: a card for the selector/generator pair (``dro_rl.model_card``), used by ``push_to_hub``.

The E-step runs both models in eval mode, so that sampling and scoring are deterministic given the parameters; with
``disable_dropout`` (DROConfig's default) the M-step's forwards are dropout-free too, and the loss then scores each
ranking with exactly the log-probability it was sampled with (docs/estimator.md, 'The E-step ...').

With ``share_base_model`` the two models are two LoRA adapters on one base (``dro_rl.models``): ``self.generator`` is
then ``self.model`` itself and ``_role`` activates the right adapter around every forward.

Reused from GRPO: the RepeatSampler that groups the m samples of a question (each pass over the data seeded by its
number, for exact resumes), the generation buffer, the reward-function protocol and its cross-process gather, metric
logging.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, disable_dropout_in_model, split_tensor_dict

from rewards import get_reward

from . import estimators as E
from .config import DEEPSPEED_REFUSAL, EVAL_METRICS, FP16_ON_CPU, DROConfig
from .data import check_dataset
from .evaluation import score_picks, select_greedy, support_recall
from .files import readable_as_umask_allows
from .generator import (
    batch_answer_logprobs,
    generate_answers,
    target_logprobs,
)
from .model_card import describe_data, read_report, recipe_settings, render, summarize
from .models import (
    GENERATOR,
    SELECTOR,
    as_role,
    cast_adapters_to_bf16,
    enable_adapter_checkpointing,
    load_model,
    shared_base_model,
)
from .resume import (
    RUN_FILE,
    check_same_run,
    claim_output_dir,
    resolve_checkpoint,
    run_record,
    write_run_record,
)
from .run_folder import (
    BASE_DIRS,
    COMPLETE_MARKER,
    SHARED_BASE,
    STAGING,
    TRAINER_STATE,
    base_dir,
    mark_complete,
    publish,
    stale_results,
)
from .run_models import name_adapter_base
from .selector import (
    IdGrammar,
    left_pad,
    parse_ranking,
    right_pad,
    sample_rankings,
    selector_logprobs,
)

logger = get_logger(__name__)

# What DROTrainer itself writes into output_dir (the recipe adds data, warm-up and reports beside them).
TRAINER_ARTEFACTS = ("selector", "generator", RUN_FILE, TRAINER_STATE, "pipeline.json", COMPLETE_MARKER, *BASE_DIRS)


class _ZeroGeneratorGrads(TrainerCallback):
    """The Trainer zeroes only the selector's grads after each optimizer step; this zeroes the generator's."""

    def __init__(self, generator: torch.nn.Module):
        self.generator = generator

    def on_step_end(self, args, state, control, **kwargs):
        self.generator.zero_grad(set_to_none=True)


class _PassSeededSampler(RepeatSampler):
    """TRL's RepeatSampler whose shuffle for pass e is seeded with ``seed + e``: the Trainer calls ``set_epoch(e)``
    before every pass, a resumed run's first one included (pass 0 keeps TRL's order)."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed(self.seed + epoch)


class _StopOnNonFiniteParameters(TrainerCallback):
    """After each optimizer step: parameters that overflowed stop training here, with the step and learning rates,
    instead of as an obscure failure in the next step's sampling. (Processes hold identical parameters, so all stop.)"""

    def __init__(self, trainer: DROTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        for role, params in ((SELECTOR, trainer._selector_parameters(trainer.model)),
                             (GENERATOR, trainer._generator_parameters())):
            if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
                raise FloatingPointError(f"the {role}'s parameters are non-finite after optimizer step "
                                         f"{state.global_step}: the update overflowed. {trainer._lower_the_lr()}")


class CandidateOrderWarning(UserWarning):
    """The rows' candidates are trained on in the order given, while the run's ``pipeline.json`` names a first-stage
    retriever that ``DROPipeline``, ``evaluate.py`` and ``predict.py`` put new candidates in the order of. The recipe,
    which ranked the rows with that retriever, silences it; filter it (``warnings.filterwarnings``) when yours are."""


class DROTrainer(GRPOTrainer):
    """Train a list-wise selector (``model``) and a generator jointly with DRO (Shi et al., 2025).

    Dataset rows hold ``question`` (str), ``answers`` (list of gold strings; the first is the training target),
    ``passages`` (list of ``{"title", "text"}`` in first-stage retrieval order) and optionally ``gold`` (list of bools,
    used only for logging support recall, never for training).
    """

    _tag_names = ["trl", "dro"]
    _name = "DRO"
    _paper = {
        "title": "Direct Retrieval-augmented Optimization: Synergizing Knowledge Selection and Language Models",
        "id": "2505.03075",
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        generator: str | PreTrainedModel | PeftModel | None = None,
        args: DROConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        generator_processing_class=None,
        peft_config=None,
        generator_peft_config=None,
        quantization_config=None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        args = args or DROConfig(output_dir="dro-output")
        self._created_at = time.time()  # results files older than this belong to an earlier run (run_folder.py)
        self._in_checkpoint = False
        self._pass_sampler: _PassSeededSampler | None = None  # made with the train dataloader
        self._record: dict | None = None  # dro_run.json (_run_record)
        refuse_deepspeed(args)
        # rows as a list, as evaluate() takes them (GRPOTrainer takes only a Dataset)
        train_dataset = Dataset.from_list(train_dataset) if isinstance(train_dataset, list) else train_dataset
        self.data_stats = []
        if train_dataset is not None:
            train_dataset, stats = check_dataset(train_dataset, args.num_docs_selected, args.on_bad_row)
            self.data_stats.append(stats)
            args.check_enough_questions(len(train_dataset))
            if args.retriever != "none":
                model_name = f" ({args.retriever_model})" if args.retriever == "dense" else ""
                warnings.warn(f"DROTrainer trains on each row's candidates in the order given, and the run's "
                              f"pipeline.json records retriever={args.retriever!r}{model_name}: DROPipeline, "
                              "evaluate.py and predict.py put new candidates in that retriever's order. Give rows "
                              "ranked by it (scripts/retrieve.py), or set retriever='none' to keep candidates as "
                              "given (or 'bm25')", CandidateOrderWarning, stacklevel=2)
        if isinstance(eval_dataset, dict):  # named sets, each evaluated under its own prefix (eval_<name>_...)
            eval_dataset = {name: self._checked_eval_rows(data, args, f"eval_dataset[{name!r}]")
                            for name, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._checked_eval_rows(eval_dataset, args)
        metric = (args.metric_for_best_model or "").removeprefix("eval_")
        metrics = [f"{name}_{m}" for name in eval_dataset for m in EVAL_METRICS] if isinstance(eval_dataset, dict) \
            else []
        if metric and metrics and metric not in metrics:  # DROConfig checks the metric; a dict's set names are
            # known only here. Else a KeyError at the first evaluation
            raise ValueError(f"metric_for_best_model={args.metric_for_best_model!r} is not among this trainer's "
                             f"evaluation metrics: {metrics} (eval_ prefix optional)")
        for stats in self.data_stats:
            if stats.skipped:
                logger.warning(stats.summary())
        if args.share_base_model and generator is not None and generator is not model:
            raise ValueError("share_base_model: the generator is an adapter on the selector's base; "
                             "do not pass `generator=`")
        if generator is model and not isinstance(model, str) and not args.share_base_model:
            raise ValueError("model and generator are one module: DRO trains two models, so pass two instances (or "
                             "names, each loaded on its own), or one base with a LoRA adapter per role: "
                             "share_base_model=True with a peft_config")
        if isinstance(model, str):  # loaded here rather than by GRPOTrainer, so every name dro_rl.models knows works
            model, loaded_tokenizer = load_by_name(model, args, quantization_config, seed=args.seed)
            processing_class = processing_class or loaded_tokenizer
        elif processing_class is None and not getattr(model, "name_or_path", ""):  # else the Hub client's repo-id error
            raise ValueError("pass `processing_class` (its tokenizer) with a selector model instance built from a "
                             "config: it has no name_or_path to load one from")
        if processing_class is not None:
            check_vocabulary(model, processing_class, "selector (model)")
        if args.share_base_model:
            model, generator = self._shared_model(model, peft_config, generator_peft_config)
            # The generator's forward bypasses the DDP wrapper; its adapter's gradients still arrive in the same
            # backward, which DDP accepts only if it does not also mark them unused after the selector's forward.
            if args.ddp_find_unused_parameters:
                raise ValueError("share_base_model needs ddp_find_unused_parameters: false")
            args.ddp_find_unused_parameters = False
            peft_config, generator_processing_class = None, generator_processing_class or processing_class
        super().__init__(
            model=model,
            reward_funcs=[get_reward(name) for name in args.reward_funcs],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.reward_func_names = list(args.reward_funcs)
        refuse_fp16_on_cpu(args, self.accelerator.device)
        said = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        if self.accelerator.mixed_precision != said:  # an accelerate config's mixed_precision wins over the run's
            raise ValueError(f"accelerate runs mixed precision {self.accelerator.mixed_precision!r} (its config file or "
                             f"--mixed_precision), and this run's settings say {said!r} (bf16: {args.bf16}, fp16: "
                             f"{args.fp16}), which its files would record: set bf16 / fp16 to match, or launch with "
                             f"--mixed_precision {said}")
        if args.share_base_model:
            self._init_shared_generator(generator_processing_class)
        else:
            self._init_generator(generator, generator_processing_class, generator_peft_config, quantization_config)
        if self.accelerator.device.type == "cpu" and any(
            getattr(m, "is_loaded_in_4bit", False) for m in (self.model, self.generator)
        ):  # bitsandbytes 0.50 on CPU: the first eval-mode forward (evaluate()) converts 4-bit layers for inference
            raise ValueError("4-bit (QLoRA) training needs a GPU: on CPU, bitsandbytes switches 4-bit layers to an "
                             "inference-only layout at their first evaluation, and gradients stop flowing through them")
        if self.generator_processing_class.pad_token_id is None:
            self.generator_processing_class.pad_token = self.generator_processing_class.eos_token
        self.add_callback(_ZeroGeneratorGrads(self.generator))
        self.add_callback(_StopOnNonFiniteParameters(self))
        self._nonfinite_losses, self._skipped_in_a_row = 0, 0

        datasets = [d for d in [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else
                                                [eval_dataset])] if d is not None]
        max_candidates = max((len(p) for d in datasets for p in d["passages"]), default=100)
        self.grammar = IdGrammar(self.processing_class, max(max_candidates, 1))
        self.selector_prompt, self.generator_prompt = args.selector_prompt(), args.generator_prompt()
        for data in datasets:
            args.check_prompts_fit(self.processing_class, self.generator_processing_class, data)

    def _init_generator(self, generator, generator_processing_class, generator_peft_config, quantization_config):
        """The generator as a second model: loaded if named, LoRA-wrapped if asked, DDP-wrapped when trainable."""
        args = self.args
        generator = generator if generator is not None else args.generator_model_name_or_path
        if generator is None:
            raise ValueError("DROTrainer needs a generator: pass `generator=` or set `generator_model_name_or_path`")
        if isinstance(generator, str):
            generator, loaded_tokenizer = load_by_name(generator, args, quantization_config, seed=args.seed + 1)
            generator_processing_class = generator_processing_class or loaded_tokenizer
        if generator_processing_class is None:
            raise ValueError("pass `generator_processing_class` with a generator model instance")
        check_vocabulary(generator, generator_processing_class, "generator")
        if generator_peft_config is not None:  # a copy: PEFT writes the base's name into the config it is given, and
            # the selector's may be the same object (it would then name the generator's base)
            generator = get_peft_model(generator, copy.deepcopy(generator_peft_config))
            cast_adapters_to_bf16(generator)
        if args.generator_update == "none":
            generator.requires_grad_(False)
        elif args.gradient_checkpointing:
            generator.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
            if isinstance(generator, PeftModel):
                generator.enable_input_require_grads()
        if args.freeze_selector:  # (a shared base freezes the selector's adapter instead)
            self.model.requires_grad_(False)
        if args.disable_dropout:
            disable_dropout_in_model(generator)
        self.generator_processing_class = generator_processing_class
        if any(p.requires_grad for p in generator.parameters()):  # DDP/FSDP wrap so replicas stay in sync
            self.generator = self.accelerator.prepare_model(generator)
        else:  # a frozen generator needs no wrapper (DDP refuses a module without trainable parameters)
            self.generator = generator.to(self.accelerator.device)

    @staticmethod
    def _shared_model(model, peft_config, generator_peft_config):
        """(model, model): one base with a `selector` and a `generator` LoRA adapter."""
        if isinstance(model, PeftModel):
            if not {SELECTOR, GENERATOR} <= set(model.peft_config):
                raise ValueError(f"share_base_model needs adapters named {SELECTOR!r} and {GENERATOR!r}, "
                                 f"found {sorted(model.peft_config)}")
            return model, model
        if peft_config is None:
            raise ValueError("share_base_model needs a LoRA config (use_peft: true, or `peft_config=`)")
        model = shared_base_model(model, peft_config, copy.deepcopy(generator_peft_config or peft_config))
        return model, model

    def _init_shared_generator(self, generator_processing_class):
        """The generator is the `generator` adapter of ``self.model``: same module, same DDP wrapper."""
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("share_base_model is not supported with FSDP; use separate base models")
        self.generator = self.model
        self.generator_processing_class = generator_processing_class
        frozen = [name for name, off in ((SELECTOR, self.args.freeze_selector),
                                         (GENERATOR, self.args.generator_update == "none")) if off]
        if frozen:
            self.model.set_requires_grad(frozen, False)

    def _role(self, name: str) -> AbstractContextManager:
        """Activate the selector's or the generator's adapter when they share one base; otherwise nothing to do."""
        return as_role(self.accelerator.unwrap_model(self.model), name) if self.args.share_base_model else nullcontext()

    @contextmanager
    def _nonfinite_context(self) -> Iterator[None]:
        """Adds the step and the learning rates to a non-finite-logits error raised inside the block."""
        try:
            yield
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}, after optimizer step {self.state.global_step}. {self._lower_the_lr()}") \
                from err

    def _generator_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The generator's trainable parameters by name (with a shared base: its adapter's, inside ``self.model``)."""
        generator = self.accelerator.unwrap_model(self.generator)
        return [(n, p) for n, p in generator.named_parameters()
                if p.requires_grad and (not self.args.share_base_model or f".{GENERATOR}." in n)]

    def _generator_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._generator_named_parameters()]

    def _selector_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The selector's trainable parameters (with a shared base: all but the generator adapter's)."""
        generator = {id(p) for p in self._generator_parameters()}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in generator]

    def _lower_the_lr(self) -> str:
        return (f"Lower learning_rate ({self.args.learning_rate}) / generator_learning_rate "
                f"({self.args.generator_learning_rate}), or keep max_grad_norm > 0.")

    # ------------------------------------------------------------------------------------------------------------
    # Optimizer and clipping: the generator is a second trainable model
    # ------------------------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        named = self._generator_named_parameters()
        optimizer = super().create_optimizer(model)
        if self.args.share_base_model:  # the selector's groups hold every trainable parameter of the shared module
            ids = {id(p) for _, p in named}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        # The selector's rule (Trainer.get_decay_parameter_names): no decay on norm weights and biases.
        decay = set(self.get_decay_parameter_names(self.accelerator.unwrap_model(self.generator)))
        for weight_decay, params in ((self.args.weight_decay, [p for n, p in named if n in decay]),
                                     (0.0, [p for n, p in named if n not in decay])):
            if params:
                optimizer.add_param_group(
                    {"params": params, "lr": self.args.generator_learning_rate, "weight_decay": weight_decay}
                )
        return optimizer

    def _clip_grad_norm(self, model):
        return self._clip_and_guard(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        # Called at every optimizer step; without clipping (max_grad_norm = 0) the guard runs from here.
        if grad_norm is None:
            grad_norm = self._clip_and_guard(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _clip_and_guard(self, model, max_norm: float):
        """Clip each model's gradients to ``max_norm`` on its own, and drop a non-finite update on every process.

        One optimizer holds both models' parameter groups, so an fp16 grad scaler unscales it once, here;
        accelerate's ``clip_grad_norm_`` would unscale again on each call, which the scaler refuses.
        """
        self.accelerator.unscale_gradients()
        selector = model.parameters() if not self.args.share_base_model else self._selector_parameters(model)
        generator = [p for p in self._generator_parameters() if p.grad is not None]
        with _unscaled(self.accelerator):
            norm = self.accelerator.clip_grad_norm_(selector, max_norm)
            gen_norm = self.accelerator.clip_grad_norm_(generator, max_norm) if generator else None
        if gen_norm is not None:
            self._metrics["train"]["generator/grad_norm"].append(float(gen_norm))
        self._skip_nonfinite_update(model, norm, gen_norm)
        return norm

    def _skip_nonfinite_update(self, model, norm, gen_norm) -> None:
        """Drop this update, on every process alike, if any process had a non-finite loss or gradient.

        Gradients are all-reduced, so their norms agree across processes; a non-finite loss is seen by one process
        only, so its count is summed here. Updates skipped many times in a row mean the weights have diverged: stop.
        """
        # (An fp16 grad scaler skips steps with inf gradients itself, and lowers its scale: not an error.)
        bad_grad = self.accelerator.scaler is None and not all(
            torch.isfinite(torch.as_tensor(n)) for n in (norm, gen_norm) if n is not None
        )
        counts = torch.tensor([float(self._nonfinite_losses), float(bad_grad)], device=self.accelerator.device)
        bad_loss, bad_grad = (self.accelerator.reduce(counts, "sum") > 0).tolist()
        self._nonfinite_losses = 0
        if not (bad_loss or bad_grad):
            self._skipped_in_a_row = 0
            return
        for p in [*model.parameters(), *self.generator.parameters()]:
            p.grad = None
        for key, bad in (("guard/skipped_nonfinite_loss", bad_loss), ("guard/skipped_nonfinite_grad", bad_grad)):
            if bad:
                self._metrics["train"][key].append(1.0)
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"{MAX_SKIPPED_IN_A_ROW} optimizer steps in a row had a non-finite loss or gradient and were skipped "
                f"(after optimizer step {self.state.global_step}): the weights have diverged. {self._lower_the_lr()}"
            )

    # ------------------------------------------------------------------------------------------------------------
    # E-step
    # ------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        args, m = self.args, self.num_generations
        device, mode = self.accelerator.device, "train" if self.model.training else "eval"
        tok, gtok = self.processing_class, self.generator_processing_class
        questions = inputs[::m]  # RepeatSampler puts the m copies of a question next to each other
        if any(inputs[q * m + j]["question"] != row["question"] for q, row in enumerate(questions) for j in range(m)):
            raise RuntimeError("a generation batch must hold whole groups of num_generations copies per question")
        if mode == "train" and args.shuffle_candidates:  # one order per question: its m samples share the prompt
            questions = [shuffled_candidates(r, f"{args.seed}:{self.state.global_step}:{r.get('id') or r['question']}")
                         for r in questions]
            inputs = [r for r in questions for _ in range(m)]

        # Sampling and scoring in eval mode: the weights and the sampled log-probs are functions of the parameters,
        # never of a dropout mask (docs/estimator.md, 'The E-step ...').
        with eval_mode(self.model, self.generator):
            # 1. Sample m valid rankings per question from the current selector (the E-step proposal).
            prompts = [self.selector_prompt(tok, r["question"], r["passages"]) for r in questions]
            # One autocast region around all of the sampler's forwards: each casts the weights to half precision
            # in its own region, which the outer one's cache turns into one cast per weight for the whole sampling.
            with (unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped,
                  self._role(SELECTOR), self._nonfinite_context(), self.accelerator.autocast()):
                samples = sample_rankings(
                    unwrapped, self.grammar, prompts, [len(r["passages"]) for r in questions],
                    args.num_docs_selected, m, temperature=self.temperature, pad_token_id=tok.pad_token_id,
                    without_replacement=args.sample_without_replacement,
                )

            # 2. The generator's inputs for each pick, and what the rewards need besides log p(y | x, d_z).
            gen_prompts = [
                self.generator_prompt(gtok, r["question"], [r["passages"][i] for i in picks])
                for r, picks in zip(inputs, samples.picks)
            ]
            targets = [self.generator_prompt.target(gtok, r["answers"][0]) for r in inputs]
            completions = tok.batch_decode(samples.completion_ids, skip_special_tokens=True)
            rows = [{**r, "answer_num_tokens": len(t), "picks": p} for r, t, p in zip(inputs, targets, samples.picks)]
            if any(getattr(f, "needs_generated_answer", False) for f in self.reward_funcs):
                with self._role(GENERATOR):
                    generated = generate_answers(
                        self.accelerator.unwrap_model(self.generator), gtok, gen_prompts, args.max_answer_tokens,
                        args.generator_batch_size,
                    )
                for row, answer in zip(rows, generated):
                    row["generated_answer"] = answer

        p_ids, p_mask = left_pad([p for p in prompts for _ in range(m)], tok.pad_token_id, device)
        g_ids, g_mask = left_pad(gen_prompts, gtok.pad_token_id, device)
        y_ids, y_mask = right_pad(targets, gtok.pad_token_id, device)
        batch = {
            "prompt_ids": p_ids,
            "prompt_mask": p_mask,
            "completion_ids": samples.completion_ids,
            "completion_mask": samples.completion_mask,
            "allowed": samples.allowed,
            "group": torch.arange(len(questions), device=device).repeat_interleave(m),  # rows sharing a prompt
            "gen_prompt_ids": g_ids,
            "gen_prompt_mask": g_mask,
            "gen_target_ids": y_ids,
            "gen_target_mask": y_mask,
            "sample_logps": samples.logps,
            # Each row's share of its question's policy expectations (mean 1 per question): 1 with replacement;
            # without, ρ̃·m (0 for spare repeats), and the log ratios log ρ the weights take.
            "sample_share": (torch.ones(len(rows), device=device) if samples.log_ratio is None else
                             (E.proposal_weights(samples.log_ratio.view(-1, m), m) * m).reshape(-1)),
            **({"sample_log_ratio": samples.log_ratio} if samples.log_ratio is not None else {}),
            "rows": rows,
            "completions": completions,
        }
        if mode == "train" and self.args.scores_in_loss:
            return batch  # the loss's generator forward gives log p(y | x, d_z), and _compute_loss weighs (_weigh)

        # 3. Score each pick with the generator: log p(y | x, d_z), no grad.
        with eval_mode(self.generator), self._role(GENERATOR):
            answer_logp = batch_answer_logprobs(
                self.accelerator.unwrap_model(self.generator), gen_prompts, targets, gtok.pad_token_id,
                args.generator_batch_size,
            )  # [B]
        batch["advantages"], batch["gen_coef"] = self._weigh(batch, answer_logp, mode)
        return batch

    def _weigh(self, batch: dict[str, Any], answer_logp: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards, importance weights and advantages of the rows of ``batch`` (whole question groups, in order)
        from their answers' log-likelihoods: (selector advantages [B], generator coefficients [B]), detached."""
        args, m, device = self.args, self.num_generations, answer_logp.device
        answer_logp = answer_logp.detach()
        rows = batch["rows"]
        n_tokens = batch["gen_target_mask"].sum(-1).float()

        # Rewards through TRL's reward protocol (gathered over processes), combined with reward_weights.
        reward_rows = [{**r, "answer_logprob": float(lp)} for r, lp in zip(rows, answer_logp.tolist())]
        rewards_per_func = self._calculate_rewards(
            reward_rows, [r["question"] for r in rows], batch["completions"], batch["completion_ids"].tolist()
        )  # [B_global, F]
        rewards_global = (rewards_per_func * self.reward_weights.to(device)[None]).nansum(1)
        start = self.accelerator.process_index * len(rows)
        rewards = rewards_global[start : start + len(rows)]

        # Importance weights and advantages (README 'How DRO is implemented'; docs/estimator.md), per question.
        log_w = answer_logp if args.importance_logits == "sum" else answer_logp / n_tokens
        log_ratio = batch["sample_log_ratio"].view(-1, m) if "sample_log_ratio" in batch else None  # without replacement
        weights = E.importance_weights(log_w.view(-1, m), log_ratio)  # [Q, m]
        adv = E.advantages(args.estimator, weights, rewards.view(-1, m), args.scale_rewards not in ("none", False),
                           log_ratio=log_ratio)
        gen_coef = E.generator_coefficients(args.generator_update, weights, log_ratio)  # [Q, m]

        # Metrics, gathered over processes.
        self._log_estep_metrics(mode, batch, answer_logp, weights, rewards_per_func, rewards_global)
        if args.log_completions:
            self._log_samples(rows, batch["completions"], rewards_per_func, adv, weights)
        return adv.reshape(-1), gen_coef.reshape(-1)

    def _log_samples(self, inputs, completions, rewards_per_func, adv, weights) -> None:
        """``log_completions``: GRPO's sample table, in DRO's terms — the question, the sampled ranking, its rewards
        (log p(y | x, d_z) by default), advantage and importance weight w̃ — printed at each logging step."""
        self._logs["prompt"].extend(gather_object([r["question"] for r in inputs]))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        gather = self.accelerator.gather
        self._logs["advantages"].extend(gather(adv.reshape(-1)).tolist())
        self._logs["extra"]["weight"].extend(gather(weights.reshape(-1)).tolist())

    def _log_estep_metrics(self, mode, batch, answer_logp, weights, rewards_per_func, rewards_global):
        """Per-row metrics are estimates of the policy's expectations: rows drawn without replacement count by their
        normalised ratios ρ̃ (a plain mean would describe the proposal — with m = N, every candidate equally)."""
        metrics, m, gathered = self._metrics[mode], self.num_generations, self.accelerator.gather
        device, rows, args = answer_logp.device, batch["rows"], self.args
        share = gathered(batch["sample_share"])

        def policy_mean(values: torch.Tensor) -> float:  # over all processes' rows; NaN or weightless rows left out
            values = values.float()
            kept = ~torch.isnan(values) & (share > 0)
            return ((values * share)[kept].sum() / share[kept].sum()).item()

        valid = [  # the decoded text must parse back, with no repair, to the picks that were sampled
            parse_ranking(c, len(r["passages"]), args.num_docs_selected) == (r["picks"], True)
            for c, r in zip(batch["completions"], rows)
        ]
        metrics["selector/valid_rate"].append(gathered(torch.tensor(valid, device=device).float()).mean().item())
        metrics["selector/ranking_logprob"].append(policy_mean(gathered(batch["sample_logps"])))
        metrics["generator/answer_logprob"].append(policy_mean(gathered(answer_logp)))
        metrics["weights/ess"].append(gathered(E.effective_sample_size(weights)).mean().item())
        metrics["weights/entropy"].append(gathered(E.weight_entropy(weights)).mean().item())
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(policy_mean(rewards_per_func[:, i]))
        metrics["reward"].append(policy_mean(rewards_global))
        # The spread of the rewards among each question's samples, spare samples (weight 0) left out.
        drawn = (share > 0).view(-1, m)
        grouped = torch.where(drawn, rewards_global.view(-1, m), float("nan"))
        count = drawn.sum(-1)
        centred = grouped - grouped.nanmean(-1, keepdim=True)
        std = (centred.nan_to_num() ** 2).sum(-1).div((count - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std
        metrics["reward_std"].append(std[count > 1].mean().item() if (count > 1).any() else 0.0)
        metrics["frac_reward_zero_std"].append(((std < 1e-8) | (count < 2)).float().mean().item())
        # One entry per row on every process (NaN without labels), so the gather has the same shape everywhere.
        recalls = [support_recall(r["picks"], r.get("gold")) for r in rows]
        recalls = gathered(torch.tensor([float("nan") if x is None else x for x in recalls], device=device))
        if not torch.isnan(recalls).all():
            metrics["selector/support_recall"].append(policy_mean(recalls))

    # ------------------------------------------------------------------------------------------------------------
    # M-step
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        """GRPO's, except that a generation batch is cut into micro-batches in order, not shuffled row by row: when
        the loss scores the generator (``DROConfig.scores_in_loss``) a micro-batch must hold whole question groups,
        since a question's importance weights need all m of its samples, and either way the packed loss forward then
        finds a question's rows together. DRO uses each generation batch once, within one optimizer step, so the order
        of its rows does not change the update — and both scoring paths draw the same random numbers."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self._step % self.args.steps_per_generation == 0 or self._buffered_inputs is None:
            self._buffered_inputs = split_tensor_dict(self._generate_and_score_completions(generation_batch),
                                                      self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _compute_loss(self, model, inputs):
        args, m, mode = self.args, self.num_generations, "train" if self.model.training else "eval"
        loss = torch.zeros((), device=self.accelerator.device)
        if args.share_base_model and args.gradient_checkpointing:
            # Installed before every loss: Trainer.train() and generation re-enable plain checkpointing.
            enable_adapter_checkpointing(self.accelerator.unwrap_model(model), args.activation_checkpointing_kwargs)
        advantages, gen_coef = inputs.get("advantages"), inputs.get("gen_coef")
        if args.generator_update != "none":
            if not args.share_base_model:  # the Trainer sets only the selector's mode (and a loaded model is in eval
                self.generator.train(self.model.training)  # mode, where gradient checkpointing is skipped)
            with self._role(GENERATOR):
                answer_logp = target_logprobs(
                    self.generator, inputs["gen_prompt_ids"], inputs["gen_prompt_mask"], inputs["gen_target_ids"],
                    inputs["gen_target_mask"],
                ).sum(-1)  # [B]
            if advantages is None:  # scored in the loss: this forward's log p(y | x, d_z) are the E-step's (no dropout)
                advantages, gen_coef = self._weigh(inputs, answer_logp, mode)
            generate = E.generator_loss(gen_coef, answer_logp, m)
            self._metrics[mode]["generator/loss"].append(self.accelerator.gather(generate.detach()).mean().item())
            loss = loss + args.generator_loss_coef * generate
        if not args.freeze_selector:
            bonus_on = args.entropy_coef > 0
            with self._role(SELECTOR):  # by default one packed forward per question: prompt + its m completions
                scored = selector_logprobs(
                    args.selector_loss_forward, model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["group"],
                    inputs["completion_ids"], inputs["completion_mask"], inputs["allowed"], self.temperature,
                    self.processing_class.pad_token_id, entropy=bonus_on,
                )
            # logp: [B], under the constrained distribution that sampled
            logp, entropy = scored if bonus_on else (scored, None)
            select = E.selector_loss(advantages, logp, m)
            self._metrics[mode]["selector/loss"].append(self.accelerator.gather(select.detach()).mean().item())
            loss = loss + select
            if entropy is not None:  # a gradient even where the advantages vanish (a group of m equal samples)
                bonus = (entropy * inputs["sample_share"]).mean()  # the policy's expected entropy (rows by share)
                self._metrics[mode]["selector/entropy"].append(self.accelerator.gather(bonus.detach()).mean().item())
                loss = loss - args.entropy_coef * bonus
        if not torch.isfinite(loss):
            # Counted, and the whole update is then skipped on every process (_skip_nonfinite_update). The zero keeps
            # the graph, so the backward still runs DDP's gradient all-reduce in step with the other processes.
            self._nonfinite_losses += 1
            loss = loss.nan_to_num() * 0.0
        return loss / self.current_gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation: the greedy retrieve -> select -> generate pipeline on the eval set
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _checked_eval_rows(data, args: DROConfig, name: str = "eval_dataset"):
        data, stats = check_dataset(data, args.num_docs_selected, args.on_bad_row, name)
        if stats.skipped:
            logger.warning(stats.summary())
        return data

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Support recall@K and answer EM/F1 of greedy selection + greedy answers (replaces GRPO's eval loss).

        As the Trainer's: a dict of datasets is evaluated set by set under ``<prefix>_<name>``, and a name picks one
        of the dict given at construction; a dataset given here is checked as the constructor checks its own."""
        if isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is not None and not isinstance(eval_dataset, dict):
            eval_dataset = self._checked_eval_rows(eval_dataset, self.args)
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if data is None:
            raise ValueError("evaluate() needs an eval_dataset")
        if isinstance(data, dict):
            return {key: value for name, part in data.items()
                    for key, value in self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}").items()}
        rows = [dict(r) for r in data]
        most = max(len(r["passages"]) for r in rows)  # a dataset given here may hold more candidates than the others
        grammar = self.grammar if most <= len(self.grammar.first) else IdGrammar(self.processing_class, most)
        selector = self.accelerator.unwrap_model(self.model)
        generator = self.accelerator.unwrap_model(self.generator)
        with self._role(SELECTOR):
            picks = select_greedy(selector, self.processing_class, grammar, self.selector_prompt, rows,
                                  self.args.per_device_eval_batch_size)
        with self._role(GENERATOR):
            scores = score_picks(rows, picks, generator, self.generator_processing_class, self.generator_prompt,
                                 self.args.max_answer_tokens, self.args.per_device_eval_batch_size)
        metrics = {
            f"{metric_key_prefix}_{key}": value
            for key, value in scores.items()
            if key in EVAL_METRICS and value is not None
        }
        Trainer.log(self, metrics)  # not GRPO's log(), which would flush the pending training metrics here
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, *args, **kwargs):
        """The Trainer's prediction loop runs a loss forward, which has no meaning for a ranking policy."""
        raise NotImplementedError("DROTrainer has no prediction loop: evaluate() scores a dataset, and "
                                  "DROPipeline.from_pretrained(<saved run>) answers new questions with both models")

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: selector/ and generator/
    # ------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save a run folder: both models and ``pipeline.json``, and for the final save also ``trainer_state.json``
        and the model card, staged and swapped in with the completion marker written last (``dro_rl.run_folder``).

        Inside ``_save_checkpoint`` the models go straight into the new ``checkpoint-N`` folder, whose marker is
        written once the optimizer state is saved too.
        """
        output_dir = output_dir or self.args.output_dir
        if self._in_checkpoint:
            self._save_models(output_dir)
            return
        staging = os.path.join(output_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        self._save_models(staging)
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE))
            stale = stale_results(output_dir, self._created_at)
            report = None if "report.json" in stale else read_report(output_dir)
            self._model_card(output_dir, report=report).save(os.path.join(staging, "README.md"))
            publish(staging, output_dir, self.state.global_step, stale)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_models(self, folder: str) -> None:
        """``selector/`` and ``generator/`` (weights or adapters, each with its tokenizer) and ``pipeline.json``."""
        if self.args.share_base_model:  # PEFT writes each named adapter to its own folder: selector/, generator/
            if self.args.should_save:
                model = self.accelerator.unwrap_model(self.model)
                model.save_pretrained(folder, safe_serialization=True)
                self.processing_class.save_pretrained(os.path.join(folder, SELECTOR))
                self.generator_processing_class.save_pretrained(os.path.join(folder, GENERATOR))
                name_adapter_base(model, self.processing_class, folder, SHARED_BASE, [SELECTOR, GENERATOR])
        else:
            super().save_model(os.path.join(folder, SELECTOR), _internal_call=True)  # gathers FSDP shards
            if self.args.should_save:
                path = os.path.join(folder, GENERATOR)
                generator = self.accelerator.unwrap_model(self.generator)
                generator.save_pretrained(path, safe_serialization=True)
                self.generator_processing_class.save_pretrained(path)
                for role, model, tok in ((SELECTOR, self.accelerator.unwrap_model(self.model), self.processing_class),
                                         (GENERATOR, generator, self.generator_processing_class)):
                    if isinstance(model, PeftModel):
                        name_adapter_base(model, tok, folder, base_dir(role), [role])
        if self.args.should_save:
            self.args.save_pipeline(folder)
            write_run_record(self._run_record(), folder)  # what a resume of this save must match
            readable_as_umask_allows(folder)

    def _save_checkpoint(self, model, trial) -> None:
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False
        # Written last (the run record came with the models): a checkpoint without it was interrupted while saving
        # and is never resumed from.
        if self.args.should_save:
            mark_complete(os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}"),
                          self.state.global_step, whole=True)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """Write the run's card to ``output_dir/README.md`` (TRL's hook: called by checkpoints and ``push_to_hub``).
        Written by a checkpoint, its quick start loads that checkpoint: the run folder holds no models until the
        final save."""
        if self.is_world_process_zero():
            folder = self.args.output_dir
            models_in = os.path.join(folder, f"checkpoint-{self.state.global_step}") if self._in_checkpoint else folder
            card = self._model_card(models_in, model_name or os.path.basename(os.path.abspath(folder)), dataset_name,
                                    tags, report=read_report(folder))
            card.save(os.path.join(self.args.output_dir, "README.md"))

    def _model_card(self, output_dir: str, model_name: str | None = None, dataset_name: str | None = None,
                    tags: str | list[str] | None = None, report: dict | None = None):
        """The card of this run: both models and their base, data, recipe, ``report`` (the run's report.json)."""
        shared = self.args.share_base_model
        selector = self.accelerator.unwrap_model(self.model)
        generator = self.accelerator.unwrap_model(self.generator)
        models = [
            summarize(model, role, role if shared else "default", SHARED_BASE if shared else base_dir(role))
            for role, model in ((SELECTOR, selector), (GENERATOR, generator))
        ]
        data = self.train_dataset
        dataset_name = dataset_name or (data.info.dataset_name if data is not None else None)
        skipped = len(self.data_stats[0].skipped) if data is not None and self.data_stats else 0
        skipped += (report or {}).get("data", {}).get("train", {}).get("skipped", 0)  # the recipe's, before the trainer
        held_out = self.eval_dataset is not None and not isinstance(self.eval_dataset, dict)
        rows = self.eval_dataset if held_out else data
        return render(
            model_name or os.path.basename(os.path.abspath(output_dir)), self.hub_model_id or output_dir, models,
            shared, self.args, recipe_settings(self.args, self.state.global_step),
            describe_data(dataset_name, len(data) if data is not None else 0, skipped),
            rows[0] if rows else {"question": "your question", "passages": []}, report,
            [tags] if isinstance(tags, str) else list(tags or []) + self._tag_names, dataset_name,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Train, or resume: ``True`` resumes from the newest complete, readable checkpoint in ``output_dir``.

        A resumed checkpoint must come from the same run (``dro_rl.resume``: settings, models and training rows);
        a new run refuses an ``output_dir`` holding an earlier run's checkpoints unless ``overwrite_output_dir``.
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir, logger.warning)
        if checkpoint is not None:
            check_same_run(checkpoint, self._run_record())
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            if 0 < self.args.max_steps <= state.global_step:
                return self._nothing_left_to_train(checkpoint, state)
        else:
            claim_output_dir(self.args.output_dir, False, self.args.overwrite_output_dir, TRAINER_ARTEFACTS,
                             logger.warning)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _get_train_sampler(self, dataset=None) -> RepeatSampler:
        """GRPO's sampler (the m copies of a question side by side, one order on every process), with each pass over
        the data shuffled from (seed, pass) — so that a run resumed in its third pass shuffles as the uninterrupted
        run did. TRL's draws every pass from one generator seeded once, whose state no checkpoint holds: a resumed
        process replayed the first pass's order in later ones, and its steps differed from the uninterrupted run's."""
        sampler = super()._get_train_sampler(dataset)
        self._pass_sampler = _PassSeededSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                                sampler.repeat_count, sampler.shuffle, sampler.seed)
        return self._pass_sampler

    def _run_epoch(self, *args, epoch: int, **kwargs):
        """The Trainer's pass over the data, with the sampler told the pass's number first: the Trainer's own
        ``set_epoch`` does not reach it in a resumed pass on several processes (accelerate's skip wrapper around its
        shard of the batches hides the sampler), which then replayed the first pass's order."""
        if self._pass_sampler is not None:
            self._pass_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _nothing_left_to_train(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        """A checkpoint already at ``max_steps`` (e.g. a run stopped after its last save): its models and state, no
        step. The Trainer's loop would skip to the checkpoint's batch and take one more step before it checks
        ``max_steps`` — a resumed finished run would end one step past the run it continues."""
        logger.warning(f"{checkpoint} is at step {state.global_step} and max_steps is {self.args.max_steps}: "
                       "nothing left to train; its models are the final ones")
        self._load_from_checkpoint(checkpoint)
        final = os.path.join(self.args.output_dir, TRAINER_STATE_NAME)
        saved = TrainerState.load_from_json(final) if os.path.exists(final) else None
        # the final save's state, when it is this step's, also holds the run's closing summary (the curves read it)
        self.state = saved if saved is not None and saved.global_step == state.global_step else state
        return TrainOutput(state.global_step, 0.0, {})  # no step taken here, so no loss to average

    def _run_record(self) -> dict:
        """``dro_run.json``, computed once: settings, models and training rows do not change during a run, and the
        rows' fingerprint hashes every passage."""
        if self._record is None:
            unwrap = self.accelerator.unwrap_model
            self._record = run_record(self.args, unwrap(self.model), unwrap(self.generator), self.train_dataset)
        return self._record

    def _load_best_model(self) -> None:
        """Both models from the best checkpoint (the Trainer's version looks for weights at the checkpoint's top)."""
        logger.info(f"Loading the best selector and generator from {self.state.best_model_checkpoint} "
                    f"(score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's warnings, without a tied output embedding: a tied ``lm_head.weight`` is saved once, under the
        input embedding's name, so it is "missing" from every checkpoint and comes back through the tie."""
        tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
        super()._issue_warnings_after_load(
            load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.args.share_base_model:
            for name in (SELECTOR, GENERATOR):
                load_weights(self.accelerator.unwrap_model(self.model), os.path.join(resume_from_checkpoint, name),
                             adapter_name=name)
            return
        super()._load_from_checkpoint(os.path.join(resume_from_checkpoint, "selector"), model)
        load_weights(self.accelerator.unwrap_model(self.generator), os.path.join(resume_from_checkpoint, "generator"))


MAX_SKIPPED_IN_A_ROW = 10


def shuffled_candidates(row: dict[str, Any], seed: str) -> dict[str, Any]:
    """The row with its passages (and their gold labels) in a random order drawn from ``seed``."""
    order = list(range(len(row["passages"])))
    random.Random(seed).shuffle(order)
    shuffled = {**row, "passages": [row["passages"][i] for i in order]}
    if row.get("gold"):
        shuffled["gold"] = [row["gold"][i] for i in order]
    return shuffled


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block (no dropout), then each back to its own previous mode."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def _unscaled(accelerator) -> Iterator[None]:
    """``accelerator.clip_grad_norm_`` without its own ``unscale_gradients`` call (the caller unscaled once)."""
    accelerator.unscale_gradients = lambda optimizer=None: None
    try:
        yield
    finally:
        del accelerator.unscale_gradients


def refuse_deepspeed(args: DROConfig) -> None:
    """DeepSpeed is refused at start-up: accelerate builds one DeepSpeed engine, for the selector; the generator, a
    second trainable model, gets no engine, so its gradients would not be averaged over processes (or sharded), and
    each process would train its own generator. (With a shared base, PEFT adapter switching inside one engine is
    untested.) DDP, with QLoRA and ``share_base_model`` for memory, is the tested multi-process path."""
    if getattr(args.distributed_state, "distributed_type", None) == DistributedType.DEEPSPEED:
        raise ValueError(DEEPSPEED_REFUSAL)


def refuse_fp16_on_cpu(args: DROConfig, device: torch.device) -> None:
    if args.fp16 and device.type == "cpu":
        raise ValueError(FP16_ON_CPU)


def check_vocabulary(model: torch.nn.Module, tokenizer, role: str) -> None:
    """A tokenizer with more tokens than the model has embedding rows is another model's: refused here, not as an
    IndexError inside the first forward (after transformers has rewritten the model's special-token ids)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the {role}'s tokenizer has {len(tokenizer)} tokens and its model {rows} embedding rows: a "
                         "tokenizer of another model? Pass the model's own")


def load_by_name(name: str, args: DROConfig, quantization_config, seed: int):
    """(model, tokenizer) for a Hub name, local path or ``tiny:``, with the config's init kwargs and quantization."""
    if quantization_config is not None and name.startswith("tiny:"):
        raise ValueError(f"quantization_config quantises a pretrained checkpoint as it loads; {name} is built from a "
                         "config in float32 and would not be quantised")
    init_kwargs = dict(args.model_init_kwargs or {}, trust_remote_code=args.trust_remote_code)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # as GRPOTrainer loads: "auto" would spread one replica over all GPUs
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    return load_model(name, seed=seed, **init_kwargs)


def load_weights(model: torch.nn.Module, path: str, adapter_name: str = "default") -> None:
    """Restore a model saved in folder ``path``: a LoRA adapter (into ``adapter_name``) or full weights."""
    if isinstance(model, PeftModel):
        state = load_file(os.path.join(path, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise RuntimeError(f"adapter checkpoint {path} does not match: unexpected={result.unexpected_keys}")
        return
    state = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"checkpoint {path} does not match: missing={missing} unexpected={unexpected}")
