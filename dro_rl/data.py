"""The canonical example schema, and loaders that produce it from public QA formats.

One row per question::

    {"id": "q1", "question": "...", "answers": ["gold", "alias"],
     "passages": [{"id": "d7", "title": "...", "text": "..."}, ...],
     "gold": [false, true, ...],          # one flag per passage; [] when the source has no labels
     "metadata": {...}}                   # free, source-specific

``passages`` are a question's candidates (the pipeline sorts them by first-stage retrieval). ``gold`` marks the
supporting passages: it is used for support recall and the oracle baseline, never to train the selector.

Every loader reads a file line by line (or record by record) and checks each row. A malformed row raises
:class:`DataError` naming the file, the line (1-based; the record index for JSON arrays) and the field — or, with
``on_error="skip"``, is counted in :class:`LoadStats` and reported, so that rows in = rows kept + rows skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A malformed input row, named by file, line and field."""


@dataclass
class LoadStats:
    """What a loader read: rows kept, and rows skipped with the reason for each (``on_error="skip"``)."""

    source: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.kept + len(self.skipped)

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} rows kept, {len(self.skipped)} skipped"
        return text + ("".join(f"\n  - {reason}" for reason in self.skipped[:20]) if self.skipped else "")


# ---------------------------------------------------------------------------------------------------------------
# Checking one row
# ---------------------------------------------------------------------------------------------------------------


def _fail(where: str, name: str, why: str):
    raise DataError(f"{where}: field '{name}' {why}")


def _string(value: Any, where: str, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(where, name, "must be a non-empty string" if not allow_empty else "must be a string")
    return value


def _answers(value: Any, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(where, name, "must be a non-empty list of answer strings")
    answers = [a for a in value if isinstance(a, str) and a.strip()]
    if len(answers) != len(value):
        _fail(where, name, "must hold only non-empty strings")
    return answers


def make_row(
    where: str,
    qid: Any,
    question: Any,
    answers: Any,
    passages: list[dict] | None = None,
    gold: list[bool] | None = None,
    metadata: dict | None = None,
    answers_field: str = "answers",
    min_passages: int = 0,
    answers_required: bool = True,
) -> dict:
    """A checked canonical row. ``passages`` items need ``text`` (``title`` and ``id`` optional).

    ``answers_required=False`` (new questions to answer) accepts a missing ``answers`` as ``[]``.
    """
    question = _string(question, where, "question")
    answers = [] if answers is None and not answers_required else _answers(answers, where, answers_field)
    out_passages, seen_ids = [], set()
    for j, p in enumerate(passages or []):
        if isinstance(p, str):
            p = {"text": p}
        if not isinstance(p, dict):
            _fail(where, f"passages[{j}]", "must be an object with a 'text' string")
        text = _string(p.get("text"), where, f"passages[{j}].text", allow_empty=True)
        pid = str(p.get("id", j))
        if pid in seen_ids:
            _fail(where, f"passages[{j}].id", f"repeats the id {pid!r}")
        seen_ids.add(pid)
        out_passages.append({"id": pid, "title": str(p.get("title") or ""), "text": text})
    if len(out_passages) < min_passages:
        _fail(where, "passages", f"has {len(out_passages)} candidates, fewer than the {min_passages} needed")
    gold = list(gold or [])
    if gold and len(gold) != len(out_passages):
        _fail(where, "gold", f"has {len(gold)} flags for {len(out_passages)} passages")
    return {
        "id": str(qid if qid is not None else where),
        "question": question,
        "answers": answers,
        "passages": out_passages,
        "gold": [bool(g) for g in gold] if any(gold) else [],
        "metadata": metadata or {},
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for each JSONL line, or each element of a JSON array file; where = ``path:line``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not a valid JSON array ({err})") from err
        for i, record in enumerate(records):
            yield f"{path}:record {i}", record
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield where, DataError(f"{where}: invalid UTF-8 ({err.reason} at byte {err.start})")
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno})")


def convert(
    records: Iterable[tuple[str, Any]], to_row: Callable[[str, dict], dict], source: str, on_error: OnError = "raise"
) -> tuple[list[dict], LoadStats]:
    """Apply ``to_row`` to each record; raise on the first bad one, or skip and count it."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    rows, stats = [], LoadStats(source)
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where}: a row must be a JSON object, not {type(record).__name__}")
            rows.append(to_row(where, record))
            stats.kept += 1
        except DataError as err:
            if on_error == "raise":
                raise
            stats.skipped.append(str(err))
    return rows, stats


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


def _canonical(where: str, r: dict, answers_required: bool = True) -> dict:
    passages = r.get("passages")
    if passages is not None and not isinstance(passages, list):
        _fail(where, "passages", "must be a list")
    gold = [bool(p.get("gold", False)) if isinstance(p, dict) else False for p in passages or []]
    return make_row(where, r.get("id"), r.get("question"), r.get("answers"), passages, gold, r.get("metadata"),
                    answers_required=answers_required)


def _hotpot_pairs(where: str, r: dict) -> tuple[list[tuple[str, list[str]]], set[str]]:
    """(title, sentences) pairs and supporting titles from HotpotQA's row-wise or column-wise layout."""
    context, facts = r.get("context"), r.get("supporting_facts")
    if isinstance(context, dict):  # Hugging Face column-wise layout
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            _fail(where, "context", "must hold aligned 'title' and 'sentences' lists")
        pairs = list(zip(titles, sentences))
        gold_titles = set((facts or {}).get("title", [])) if isinstance(facts, dict) else set()
    elif isinstance(context, list):  # official row-wise layout
        pairs = []
        for j, item in enumerate(context):
            if not isinstance(item, list) or len(item) != 2:
                _fail(where, f"context[{j}]", "must be a [title, [sentences]] pair")
            pairs.append((item[0], item[1]))
        gold_titles = {f[0] for f in facts or [] if isinstance(f, list) and f}
    else:
        _fail(where, "context", "is missing or not a list/dict")
    for j, (title, sents) in enumerate(pairs):
        if not isinstance(title, str) or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            _fail(where, f"context[{j}]", "must be a title string and a list of sentence strings")
    return pairs, gold_titles


def _hotpot(where: str, r: dict, answer_key: str = "answer", id_key: str = "id") -> dict:
    pairs, gold_titles = _hotpot_pairs(where, r)
    passages = [{"id": str(j), "title": t, "text": " ".join(s).strip()} for j, (t, s) in enumerate(pairs)]
    gold = [t in gold_titles for t, _ in pairs]
    qid = r.get(id_key, r.get("_id"))
    meta = {k: r[k] for k in ("type", "level") if k in r}
    return make_row(where, qid, r.get("question"), r.get(answer_key), passages, gold, meta, answers_field=answer_key)


def _musique(where: str, r: dict) -> dict:
    paragraphs = r.get("paragraphs")
    if not isinstance(paragraphs, list):
        _fail(where, "paragraphs", "must be a list of {idx, title, paragraph_text, is_supporting}")
    passages, gold = [], []
    for j, p in enumerate(paragraphs):
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
            _fail(where, f"paragraphs[{j}].paragraph_text", "must be a string")
        passages.append({"id": str(p.get("idx", j)), "title": p.get("title") or "", "text": p["paragraph_text"]})
        gold.append(bool(p.get("is_supporting", False)))
    answers = [r.get("answer")] + list(r.get("answer_aliases") or [])
    return make_row(where, r.get("id"), r.get("question"), answers, passages, gold, answers_field="answer")


def _two_wiki(where: str, r: dict) -> dict:
    return _hotpot(where, r, id_key="_id")


def _qa_only(answer_key: str) -> Callable[[str, dict], dict]:
    """FlashRAG (``golden_answers``) and NQ-open (``answer``): questions without candidates."""

    def to_row(where: str, r: dict) -> dict:
        return make_row(where, r.get("id"), r.get("question"), r.get(answer_key), answers_field=answer_key)

    return to_row


def _mapped(mapping: dict[str, str]) -> Callable[[str, dict], dict]:
    """Generic JSON: ``mapping`` names the source field of ``question``, ``answers``, ``passages`` (and ``id``,
    ``title``, ``text``, ``gold`` inside passages)."""

    def get(r: dict, key: str):
        value: Any = r
        for part in mapping.get(key, key).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def to_row(where: str, r: dict) -> dict:
        raw = get(r, "passages") or []
        if not isinstance(raw, list):
            _fail(where, mapping.get("passages", "passages"), "must be a list")
        passages, gold = [], []
        for p in raw:
            if isinstance(p, dict):
                passages.append({
                    "id": p.get(mapping.get("passage_id", "id")), "title": p.get(mapping.get("title", "title")),
                    "text": p.get(mapping.get("text", "text")),
                })
                gold.append(bool(p.get(mapping.get("gold", "gold"), False)))
            else:
                passages.append(p)
                gold.append(False)
        passages = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in passages]
        return make_row(where, get(r, "id"), get(r, "question"), get(r, "answers"), passages, gold,
                        answers_field=mapping.get("answers", "answers"))

    return to_row


FORMATS: dict[str, Callable[[str, dict], dict]] = {
    "canonical": _canonical,
    "hotpotqa": _hotpot,
    "musique": _musique,
    "2wikimultihopqa": _two_wiki,
    "flashrag": _qa_only("golden_answers"),
    "nq_open": _qa_only("answer"),
}


def load(
    path: str, fmt: str = "canonical", on_error: OnError = "raise", mapping: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[dict], LoadStats]:
    """Rows of a file in one of ``FORMATS`` (or ``json`` with a field ``mapping``), and what was kept/skipped."""
    if fmt == "json":
        to_row = _mapped(mapping or {})
    elif fmt in FORMATS:
        to_row = FORMATS[fmt]
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {sorted(FORMATS) + ['json']}")
    return convert(_first(iter_records(path), limit), to_row, path, on_error)


def load_questions(path: str, on_error: OnError = "raise", limit: int | None = None) -> tuple[list[dict], LoadStats]:
    """Canonical rows of new questions: ``answers`` may be absent (``[]``), ``passages`` too (retrieve them)."""
    to_row = lambda where, r: _canonical(where, r, answers_required=False)  # noqa: E731
    return convert(_first(iter_records(path), limit), to_row, path, on_error)


def _first(records: Iterator[tuple[str, Any]], limit: int | None) -> Iterator[tuple[str, Any]]:
    return records if limit is None else (rec for _, rec in zip(range(limit), records))


def load_hf(
    name: str, split: str, fmt: str = "canonical", on_error: OnError = "raise",
    mapping: dict[str, str] | None = None, **load_kwargs,
) -> tuple[list[dict], LoadStats]:
    """A Hugging Face dataset (a Hub name needs the Hub; ``"json"`` + ``data_files=`` works offline), converted with
    the same row checks as the files. ``load_kwargs`` go to ``datasets.load_dataset`` (``name=`` config, ...)."""
    from datasets import load_dataset

    data = load_dataset(name, split=split, **load_kwargs)
    to_row = _mapped(mapping or {}) if fmt == "json" else FORMATS[fmt]
    return convert(((f"{name}[{split}]:{i}", dict(r)) for i, r in enumerate(data)), to_row, name, on_error)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a canonical-schema JSONL file; a bad line raises DataError naming the file, line and field."""
    return load(path)[0]


def write_jsonl(rows: Iterable[dict], path: str) -> None:
    """Canonical rows to JSONL (passages' gold flags written inline)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            gold = r.get("gold") or [False] * len(r["passages"])
            passages = [{**p, "gold": g} for p, g in zip(r["passages"], gold)]
            row = {k: v for k, v in r.items() if k != "gold"}
            f.write(json.dumps({**row, "passages": passages}, ensure_ascii=False) + "\n")


def check_dataset(dataset, k: int, on_error: OnError = "raise", name: str = "train_dataset"):
    """Validate trainer rows (question, answers, passages) before training; return (dataset, LoadStats).

    A row with fewer than K candidates, an empty question or answer list, or a passage without text raises a
    DataError naming the row and field — or, with ``on_error="skip"``, is dropped and counted.
    """

    def check(where: str, row: dict) -> int:
        make_row(where, row.get("id"), row.get("question"), row.get("answers"), row.get("passages"), row.get("gold"),
                 min_passages=k)
        return row["__index__"]

    records = ((f"{name} row {i}", {**row, "__index__": i}) for i, row in enumerate(dataset))
    keep, stats = convert(records, check, name, on_error)
    return (dataset.select(keep) if stats.skipped else dataset), stats
