"""The selector and the generator a run saved, loaded back: full models, LoRA adapters, or one base with both.

A LoRA adapter names its base in ``adapter_config.json`` (``base_model_name_or_path``), which ``load_model``
resolves: a Hub name, a local path, or ``tiny:``. A base that no name can rebuild — built from a config, like the
demo's and the tests' tiny models, whose random weights depend on a seed — is saved beside the adapters by
``save_unnamed_base`` and named by its path relative to the adapter folder.
"""

from __future__ import annotations

import os

import torch
from peft import PeftConfig, PeftModel

from .models import BASE_IN_RUN, GENERATOR, SELECTOR, adapter_base, load_model, load_tokenizer
from .run_folder import check_model_folder

ADAPTER_CONFIG = "adapter_config.json"


def unnamed(name: str | None) -> bool:
    """True when ``name`` cannot rebuild the weights: empty (built from a config) or ``tiny:`` (random, seeded)."""
    return not name or name.startswith("tiny:")


def base_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The frozen base's weights under the bare model's names: LoRA and modules_to_save copies left out."""
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        out[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = value
    return out


def name_adapter_base(model: PeftModel, tokenizer, folder: str, base_dir: str, adapter_dirs: list[str]) -> None:
    """Point the adapters saved in ``folder/<adapter_dirs>`` at a base that no name rebuilds: one this run trained
    before them (``BASE_IN_RUN``: the recipe's warm-up, named by its path in the run folder — the name it was
    loaded as would give the weights before the warm-up), or one built from a config (saved into
    ``folder/base_dir`` with ``tokenizer``, a loadable model on its own)."""
    base = model.get_base_model()
    in_run = getattr(base, BASE_IN_RUN, None)
    if in_run is None and not unnamed(base.name_or_path):
        return
    if in_run is None:
        base.save_pretrained(os.path.join(folder, base_dir), state_dict=base_state_dict(model))
        tokenizer.save_pretrained(os.path.join(folder, base_dir))
    for adapter_dir in adapter_dirs:
        config = PeftConfig.from_pretrained(os.path.join(folder, adapter_dir))
        config.base_model_name_or_path = in_run or os.path.relpath(os.path.join(folder, base_dir),
                                                                   os.path.join(folder, adapter_dir))
        config.save_pretrained(os.path.join(folder, adapter_dir))


def is_adapter(path: str) -> bool:
    return os.path.exists(os.path.join(path, ADAPTER_CONFIG))


def load_saved_model(path: str, adapter_name: str = "default", **init_kwargs):
    """(model, tokenizer) from a saved folder (full model or adapter), or a name ``load_model`` resolves."""
    if not is_adapter(path):
        return load_model(path, **init_kwargs)
    base, _ = load_model(adapter_base(path), **init_kwargs)
    return PeftModel.from_pretrained(base, path, adapter_name=adapter_name), load_tokenizer(path)


def load_pair(selector_path: str, generator_path: str, **init_kwargs):
    """(selector, tokenizer, generator, generator tokenizer); two adapters on one base share one loaded base.

    With a shared base, selector and generator are the same ``PeftModel`` holding adapters ``selector`` and
    ``generator``; ``dro_rl.models.as_role`` activates the right one around each forward. Folders inside a run
    folder whose save did not finish are refused.
    """
    check_model_folder(selector_path)
    check_model_folder(generator_path)
    if is_adapter(selector_path) and is_adapter(generator_path) and (
        adapter_base(selector_path) == adapter_base(generator_path)
    ):
        model, tok = load_saved_model(selector_path, SELECTOR, **init_kwargs)
        model.load_adapter(generator_path, adapter_name=GENERATOR)
        return model.eval(), tok, model, load_tokenizer(generator_path)
    selector, tok = load_saved_model(selector_path, SELECTOR, **init_kwargs)
    # seed: two `tiny:` names (random weights, for smoke tests) give two different models
    generator, gtok = load_saved_model(generator_path, GENERATOR, seed=1, **init_kwargs)
    return selector.eval(), tok, generator.eval(), gtok
