"""Writing result files so that nothing is lost: a reader never finds half a file, and an existing result is replaced
only when the user asked for it.

Every JSON / JSONL file the project writes — run records, pipeline.json, retrieval caches, predictions, metrics —
goes through ``atomic_write``: a uniquely named temporary file beside the target, flushed to disk, then renamed over
it, so an interrupted write leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from safetensors import safe_open


def claim_output(
    path: str, overwrite: bool = False, flag: str = "--overwrite true", inputs: Iterable[str] = ()
) -> None:
    """Check, before any work, that ``path`` can be written as a new result file: not a folder, not one of the
    command's ``inputs``, not an existing file unless ``overwrite``, in a folder that exists (made here) and that this
    process may write. Each refusal names the user's path, not a temporary file that a late failure would name."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder: give a file path")
    for source in inputs:
        if os.path.abspath(source) == os.path.abspath(path) or (
                os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path)):
            raise ValueError(f"{path} is also the input: write the output elsewhere")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists: pass {flag} to replace it, or write elsewhere")
    claim_folder(os.path.dirname(os.path.abspath(path)))


def claim_folder(folder: str) -> None:
    """Make ``folder`` (and its parents) and check that this process may create files in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-check.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(probe, "x"):
            pass
        os.unlink(probe)
    except FileExistsError:
        raise NotADirectoryError(f"{folder} is a file, not a folder: nothing can be written under it") from None
    except OSError as err:
        raise PermissionError(f"cannot write in {folder}: {err.strerror}") from None


@contextmanager
def atomic_write(path: str) -> Iterator[TextIO]:
    """A text file opened for writing whose content replaces ``path`` only once the block has finished.

    Whether ``path`` may be replaced is the command's decision, taken before its work (``claim_output``). The
    temporary name is unique (pid and a random suffix), so two writers never share it; it is created with the
    default permissions (umask), which ``tempfile.mkstemp``'s 0600 would not give the renamed result.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(value: Any, path: str, **dump_kwargs) -> None:
    """``json.dump(value)`` to ``path`` through ``atomic_write``, ending with a newline (indent 2 unless told)."""
    with atomic_write(path) as f:
        json.dump(value, f, **{"indent": 2, **dump_kwargs})
        f.write("\n")


def read_json(path: str) -> Any:
    """What ``write_json`` wrote."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def json_problem(err: json.JSONDecodeError) -> str:
    """A JSON parse error as the loaders name it: "not valid JSON (<what> at column <n>)"."""
    return f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"


def write_lines(records: Iterable[Any], path: str) -> int:
    """One JSON object per line (JSONL, UTF-8 kept as is) through ``atomic_write``; returns the number written."""
    n = 0
    with atomic_write(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def readable_as_umask_allows(folder: str) -> None:
    """Give every file under ``folder`` the permissions the user's umask gives a new file. transformers 5.24 writes
    ``model.safetensors`` through a private temporary file (0600): a run folder shared on a cluster would then hold
    weights that nobody else can read, beside a config.json that everybody can."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def missing_local_path(name: str) -> bool:
    """``name`` reads as a path (``./``, ``/``, ``~``, or more than the one slash of a Hub id ``org/name``) and no
    folder is there: refused by name, rather than by the Hub client's error about a connection."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") >= 2
    return looks_local and not os.path.isdir(os.path.expanduser(name))


def safetensors_problem(path: str) -> str | None:
    """Why a safetensors file cannot be read (truncated, corrupt header), naming it; None when it can."""
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # reading the header checks offsets; touching each tensor checks the data is there
                f.get_slice(key)
    except Exception as err:  # safetensors raises its own error types, without the path
        return f"{path} is truncated or corrupt ({err})"
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) < 8 + header_len + end:
        return f"{path} is truncated ({os.path.getsize(path)} bytes, its header needs {8 + header_len + end})"
    return None


def refuse_unreadable_weights(folder: str) -> None:
    """Refuse a model folder whose weights file is truncated or corrupt, naming the file: loading it would fail deep
    in safetensors with an error that names no file (a copy or download cut short)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem:
                raise ValueError(f"{problem}: copy or save the model again")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
