"""The canonical example schema, and loaders that produce it from public QA formats.

One row per question::

    {"id": "q1", "question": "...", "answers": ["gold", "alias"],
     "passages": [{"id": "d7", "title": "...", "text": "..."}, ...],
     "gold": [false, true, ...],          # one flag per passage; [] when the source has no labels
     "metadata": {...}}                   # free, source-specific

``passages`` are a question's candidates (the pipeline sorts them by first-stage retrieval). ``gold`` marks the
supporting passages: it is used for support recall and the oracle baseline, never to train the selector.

Every loader reads a file line by line (or record by record) and checks each row. A malformed row raises
:class:`DataError` naming the file, the line (1-based; for JSON arrays the record, 1-based, with its index) and
the field — or, with ``on_error="skip"``, is counted in :class:`LoadStats` and reported, so that rows in = rows
kept + rows skipped.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

from .evaluation import normalize_answer
from .files import json_problem, write_lines

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A malformed input row, named by file, line and field."""


@dataclass
class LoadStats:
    """What a loader read: rows kept, and rows skipped with the reason for each (``on_error="skip"``)."""

    source: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)
    limit: int | None = None  # only the first ``limit`` rows were read

    @property
    def seen(self) -> int:
        return self.kept + len(self.skipped)

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} rows kept, {len(self.skipped)} skipped"
        text += f" (a limit: at most its first {self.limit} rows read)" if self.limit is not None else ""
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
    """Gold answers. At least one must keep a word after answer normalisation (punctuation and articles removed):
    a row whose only answers are ``"."`` or ``"the"`` would credit every prediction that normalises to nothing. Such
    an answer beside real ones (NQ-open's ``"A+"`` next to ``"AB+"``) is kept and never matches (see evaluation)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(where, name, "must be a non-empty list of answer strings")
    answers = [a for a in value if isinstance(a, str) and a.strip()]
    if len(answers) != len(value):
        _fail(where, name, "must hold only non-empty strings")
    if not any(normalize_answer(a) for a in answers):
        _fail(where, name, f"holds only {answers!r}, empty after answer normalisation (punctuation and articles "
              "removed): no prediction can be scored against it (skipping bad rows drops such rows: the scripts' "
              "--on_error skip, training's on_bad_row: skip)")
    return answers


def _label(value: Any, where: str, name: str) -> bool:
    """A gold flag: JSON true/false (or 0/1). A string such as ``"false"`` is refused: ``bool("false")`` is True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    _fail(where, name, f"must be true or false, not {value!r} ({type(value).__name__})")


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
    unanswered = answers is None or answers == []  # new questions: an empty list says "no gold answer" too
    answers = [] if unanswered and not answers_required else _answers(answers, where, answers_field)
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
        _fail(where, "passages", f"has {len(out_passages)} candidate{'' if len(out_passages) == 1 else 's'}, fewer than "
                                 f"the {min_passages} needed")
    gold = [_label(g, where, f"gold[{j}]") for j, g in enumerate(gold or [])]
    if gold and len(gold) != len(out_passages):
        _fail(where, "gold", f"has {len(gold)} flags for {len(out_passages)} passages")
    return {
        "id": str(qid if qid is not None else where),
        "question": question,
        "answers": answers,
        "passages": out_passages,
        "gold": gold if any(gold) else [],
        "metadata": metadata or {},
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------


def check_data_file(path: str) -> None:
    """Refuse a data path that is missing or a folder — by commands before their models load, and by the reader."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is a folder, not a data file" if os.path.isdir(path) else
                                f"data file not found: {path}")


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for each JSONL line, each element of a JSON array file, or each row of a pandas column-wise
    file (``DataFrame.to_json()``: ``{"question": {"0": ..., "1": ...}, ...}``); where = ``path:line``."""
    check_data_file(path)
    with open(path, "rb") as f:  # a UTF-8 byte-order mark (Windows editors save one) is not part of the data
        head = f.read(64).removeprefix(codecs.BOM_UTF8).lstrip()
        f.seek(0)
        first_line = f.readline().removeprefix(codecs.BOM_UTF8)
    if head.startswith(b"["):
        with open(path, encoding="utf-8-sig") as f:
            try:
                records = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not a valid JSON array ({err})") from err
        for i, record in enumerate(records):  # counted from 1, as lines are; the Python index beside it
            yield f"{path}:record {i + 1} (index {i})", record
        return
    if head.startswith(b"{"):
        columns = _column_wise(path, first_line)
        if columns is not None:
            yield from columns
            return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                # without its line break, so that a line cut off short is named at its own last column
                line = (raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw).rstrip(b"\r\n")
                yield where, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield where, DataError(f"{where}: invalid UTF-8 ({err.reason} at byte {err.start})")
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: {json_problem(err)}")


def _is_column_wise(document: Any) -> bool:
    """pandas' default ``to_json()`` layout: field -> {row index -> value}. A canonical row has a string question."""
    return isinstance(document, dict) and isinstance(document.get("question"), dict) and all(
        isinstance(column, dict) for column in document.values()
    )


def _column_wise(path: str, first_line: bytes) -> list[tuple[str, dict]] | None:
    """The rows of a file holding one column-wise JSON object, or None for JSONL.

    The whole file is parsed only when its first line is such an object (pandas writes one line) or is no JSON at
    all (the object may be pretty-printed over many lines). One JSON object that is not column-wise is an error
    that says how to re-save it.
    """
    try:
        first = json.loads(first_line.decode("utf-8"))
        if not _is_column_wise(first):
            return None
        document = first
    except (json.JSONDecodeError, UnicodeDecodeError):
        try:
            with open(path, encoding="utf-8-sig") as f:
                document = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # JSONL with a bad line: named line by line
        if not _is_column_wise(document):
            keys = sorted(document)[:8] if isinstance(document, dict) else type(document).__name__
            raise DataError(
                f"{path}: one JSON object (keys {keys}) spread over several lines, not one row per line: re-save it "
                "as JSONL (pandas: df.to_json(path, orient='records', lines=True)) or as a JSON array of rows"
            )
    index = list(document["question"])
    for name, column in document.items():
        if list(column) != index:
            raise DataError(f"{path}: column-wise JSON whose column {name!r} has other row indices than 'question'")
    return [(f"{path}:row {i}", {name: column[i] for name, column in document.items() if column[i] is not None})
            for i in index]


def convert(
    records: Iterable[tuple[str, Any]], to_row: Callable[[str, dict], dict], source: str, on_error: OnError = "raise",
    limit: int | None = None,
) -> tuple[list[dict], LoadStats]:
    """Apply ``to_row`` to each record; raise on the first bad one, or skip and count it. A row whose id repeats an
    earlier row's is a bad one.

    No rows at all is an error too — an empty file, or one whose every row was skipped — so that nothing downstream
    writes an empty output or fails on an empty list far from the cause. ``limit``: only the first records are read
    (and the counts say so).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    rows, stats, first_seen = [], LoadStats(source, limit=limit), {}
    for where, record in (records if limit is None else itertools.islice(records, limit)):
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where}: a row must be a JSON object, not {type(record).__name__}")
            row = to_row(where, record)
            qid = row.get("id") if isinstance(row, dict) else None
            if qid in first_seen:  # predictions, paired comparisons and caches are keyed by id
                _fail(where, "id", f"repeats the id {qid!r} of {first_seen[qid]}")
            if qid is not None:
                first_seen[qid] = where
            rows.append(row)
            stats.kept += 1
        except DataError as err:
            if on_error == "raise":
                raise
            stats.skipped.append(str(err))
    if not stats.seen:
        raise DataError(f"{source}: no rows: the input is empty")
    if not rows:
        raise DataError(f"{source}: no rows left: all {stats.seen} rows were skipped\n{stats.summary()}")
    return rows, stats


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


def _canonical(where: str, r: dict, answers_required: bool = True, min_passages: int = 0) -> dict:
    passages = r.get("passages")
    if passages is not None and not isinstance(passages, list):
        _fail(where, "passages", "must be a list")
    gold = [_label(p.get("gold") if p.get("gold") is not None else False, where, f"passages[{j}].gold")
            if isinstance(p, dict) else False for j, p in enumerate(passages or [])]  # None: a Dataset's missing key
    if r.get("gold") not in (None, []):  # the trainer's in-memory row layout: one list beside the passages ([]: none)
        row_gold = r["gold"]
        if not isinstance(row_gold, list) or len(row_gold) != len(passages or []):
            _fail(where, "gold", f"must be a list of one true/false per passage ({len(passages or [])}), or be left "
                                 "out for gold flags inside the passages")
        if any(isinstance(p, dict) and p.get("gold") is not None for p in passages):
            _fail(where, "gold", "is given both as a row-level list and inside the passages: keep one")
        gold = [_label(g, where, f"gold[{j}]") for j, g in enumerate(row_gold)]
    hint = None if answers_required else _format_hint(r)
    if hint:  # a raw source row would pass as a bare question, its own paragraphs and answer silently ignored
        raise DataError(f"{where}: {hint}; predict.py and DROPipeline read canonical questions: convert the file "
                        "first with scripts/retrieve.py and that --format")
    try:
        return make_row(where, r.get("id"), r.get("question"), r.get("answers"), passages, gold, r.get("metadata"),
                        answers_required=answers_required, min_passages=min_passages)
    except DataError as err:
        hint = _format_hint(r)
        raise DataError(f"{err}; {hint}" if hint else str(err)) from None


def _format_hint(r: dict) -> str | None:
    """A hint for a raw source row read as canonical (the fields that give its format away)."""
    for fmt, fields in (("musique", ("paragraphs",)), ("hotpotqa", ("context", "supporting_facts")),
                        ("flashrag", ("golden_answers",)), ("nq_open", ("answer",))):
        if all(f in r for f in fields) and "answers" not in r and "passages" not in r:
            also = " or '2wikimultihopqa'" if fmt == "hotpotqa" else ""
            return (f"this row looks like format '{fmt}'{also}: read it as {fmt}:<path> (train_rl.py --dataset, "
                    f"evaluate.py --datasets), --format {fmt} (retrieve.py) or format='{fmt}' (dro_rl.data.load)")
    return None


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


def _hotpot(where: str, r: dict) -> dict:
    """HotpotQA and 2WikiMultihopQA (the same row layout; the id is ``_id`` or ``id``)."""
    pairs, gold_titles = _hotpot_pairs(where, r)
    missing = sorted(gold_titles - {t for t, _ in pairs})
    if missing:  # the gold passage is absent: the row would silently lose a label
        _fail(where, "supporting_facts", f"names {missing[0]!r}, a title not among the context's "
              f"{[t for t, _ in pairs]}")
    passages = [{"id": str(j), "title": t, "text": " ".join(s).strip()} for j, (t, s) in enumerate(pairs)]
    gold = [t in gold_titles for t, _ in pairs]
    qid = r["_id"] if r.get("_id") is not None else r.get("id")
    meta = {k: r[k] for k in ("type", "level") if k in r}
    return make_row(where, qid, r.get("question"), r.get("answer"), passages, gold, meta, answers_field="answer")


def _musique(where: str, r: dict) -> dict:
    paragraphs = r.get("paragraphs")
    if not isinstance(paragraphs, list):
        _fail(where, "paragraphs", "must be a list of {idx, title, paragraph_text, is_supporting}")
    passages, gold = [], []
    for j, p in enumerate(paragraphs):
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
            _fail(where, f"paragraphs[{j}].paragraph_text", "must be a string")
        passages.append({"id": str(p.get("idx", j)), "title": p.get("title") or "", "text": p["paragraph_text"]})
        gold.append(_label(p.get("is_supporting", False), where, f"paragraphs[{j}].is_supporting"))
    answers = [r.get("answer")] + list(r.get("answer_aliases") or [])
    return make_row(where, r.get("id"), r.get("question"), answers, passages, gold, answers_field="answer")


def _qa_only(answer_key: str) -> Callable[[str, dict], dict]:
    """FlashRAG (``golden_answers``) and NQ-open (``answer``): questions without candidates."""

    def to_row(where: str, r: dict) -> dict:
        return make_row(where, r.get("id"), r.get("question"), r.get(answer_key), answers_field=answer_key)

    return to_row


MAPPED_FIELDS = ("id", "question", "answers", "passages", "passage_id", "title", "text", "gold")


def parse_mapping(text: str) -> dict[str, str]:
    """A ``--mapping`` argument: a JSON object from canonical field names (``MAPPED_FIELDS``) to source field names
    (dotted for nested ones), checked here so that a typo is named instead of surfacing as a missing field."""
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--mapping is not valid JSON ({e}): give an object such as "
                         '\'{"question": "query", "answers": "golds"}\'') from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ValueError(f"--mapping must be a JSON object of field names (strings), got {text!r}")
    unknown = sorted(set(mapping) - set(MAPPED_FIELDS))
    if unknown:
        raise ValueError(f"--mapping: unknown canonical field(s) {unknown}; the keys are {list(MAPPED_FIELDS)} and "
                         "the values the source file's names")
    return mapping


def _mapped(mapping: dict[str, str]) -> Callable[[str, dict], dict]:
    """Generic JSON: ``mapping`` names the source field of ``question``, ``answers``, ``passages`` (and ``id``,
    ``title``, ``text``, ``gold`` inside passages)."""

    def get(r: dict, key: str):
        value: Any = r
        for part in mapping.get(key, key).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def to_row(where: str, r: dict) -> dict:
        for key in ("question", "answers"):
            if get(r, key) is None:  # named by its source field, which is what the user can fix
                _fail(where, mapping.get(key, key), "is missing" + ("" if key in mapping else
                      f" (format json reads '{key}' unless a mapping names another field: give it to "
                      "scripts/retrieve.py --format json --mapping '{...}', whose canonical output every command "
                      f"reads; keys {list(MAPPED_FIELDS)})"))
        raw = get(r, "passages") or []
        if not isinstance(raw, list):
            _fail(where, mapping.get("passages", "passages"), "must be a list")
        passages, gold = [], []
        gold_key = mapping.get("gold", "gold")
        for j, p in enumerate(raw):
            if isinstance(p, dict):
                for key in ("passage_id", "title", "text", "gold"):  # a field the mapping names must be there
                    if key in mapping and mapping[key] not in p:
                        _fail(where, f"{mapping.get('passages', 'passages')}[{j}].{mapping[key]}",
                              f"is missing (the mapping's {key!r})")
                passages.append({
                    "id": p.get(mapping.get("passage_id", "id")), "title": p.get(mapping.get("title", "title")),
                    "text": p.get(mapping.get("text", "text")),
                })
                gold.append(_label(p.get(gold_key, False), where, f"{mapping.get('passages', 'passages')}[{j}]."
                                   f"{gold_key}"))
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
    "2wikimultihopqa": _hotpot,
    "flashrag": _qa_only("golden_answers"),
    "nq_open": _qa_only("answer"),
}


def _converter(format: str, mapping: dict[str, str] | None) -> Callable[[str, dict], dict]:
    if mapping and format != "json":
        raise ValueError(f"a field mapping applies to format 'json' only; format {format!r} has fixed field names")
    if format == "json":
        return _mapped(mapping or {})
    if format in FORMATS:
        return FORMATS[format]
    raise ValueError(f"unknown format {format!r}: use one of {sorted(FORMATS) + ['json']}")


def _refuse_fmt(function: str, kwargs: dict) -> None:
    """``format`` is the one public name (as in the README and ``--format``); the old ``fmt=`` gets an error saying
    so instead of a bare TypeError."""
    if "fmt" in kwargs:
        raise TypeError(f"{function}() takes the format as format=, not fmt=")


def load(
    path: str, format: str = "canonical", on_error: OnError = "raise", mapping: dict[str, str] | None = None,
    limit: int | None = None, **unexpected,
) -> tuple[list[dict], LoadStats]:
    """Rows of a file in one of ``FORMATS`` (or ``json`` with a field ``mapping``), and what was kept/skipped."""
    _refuse_fmt("load", unexpected)
    if unexpected:
        raise TypeError(f"load() got unexpected keyword arguments {sorted(unexpected)}")
    return convert(iter_records(path), _converter(format, mapping), path, on_error, limit)


def load_questions(path: str, on_error: OnError = "raise", limit: int | None = None) -> tuple[list[dict], LoadStats]:
    """Canonical rows of new questions: ``answers`` may be absent (``[]``), ``passages`` too (retrieve them)."""
    to_row = lambda where, r: _canonical(where, r, answers_required=False)  # noqa: E731
    return convert(iter_records(path), to_row, path, on_error, limit)


def load_hf(
    name: str, split: str, format: str = "canonical", on_error: OnError = "raise",
    mapping: dict[str, str] | None = None, **load_kwargs,
) -> tuple[list[dict], LoadStats]:
    """A Hugging Face dataset (a Hub name needs the Hub; ``"json"`` + ``data_files=`` works offline), converted with
    the same row checks as the files. ``load_kwargs`` go to ``datasets.load_dataset`` (``name=`` config, ...)."""
    from datasets import load_dataset

    _refuse_fmt("load_hf", load_kwargs)
    to_row = _converter(format, mapping)
    data = load_dataset(name, split=split, **load_kwargs)
    return convert(((f"{name}[{split}]:{i}", dict(r)) for i, r in enumerate(data)), to_row, name, on_error)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a canonical-schema JSONL file; a bad line raises DataError naming the file, line and field."""
    return load(path)[0]


def write_jsonl(rows: Iterable[dict], path: str) -> None:
    """Canonical rows to JSONL (passages' gold flags written inline), atomically."""

    def records() -> Iterator[dict]:
        for r in rows:
            gold = r.get("gold") or [False] * len(r["passages"])
            passages = [{**p, "gold": g} for p, g in zip(r["passages"], gold)]
            yield {**{k: v for k, v in r.items() if k != "gold"}, "passages": passages}

    write_lines(records(), path)


def check_dataset(dataset, k: int, on_error: OnError = "raise", name: str = "train_dataset"):
    """Validate trainer rows (question, answers, passages) before training; return (dataset, LoadStats). ``dataset``
    is a ``datasets.Dataset`` or a list of rows.

    Each row is read as the canonical file reader reads a line, so that a Dataset built in Python trains on what
    the same rows in a file would give: a row with fewer than K candidates, an empty question or answer list, or a
    passage without text raises a DataError naming the row and field — or, with ``on_error="skip"``, is dropped
    and counted. An answer given as one string becomes a one-answer list (not a list of its characters), passages
    given as plain strings become ``{"title": "", "text": ...}``, and gold flags inside the passages become the
    row-level ``gold`` list the trainer logs support recall from.
    """
    from datasets import Dataset

    if not isinstance(dataset, (Dataset, list)):
        hint = {"DataFrame": ": datasets.Dataset.from_pandas(df)",
                "IterableDataset": " (DRO draws whole groups from a sampler that needs the length): "
                                   "datasets.Dataset.from_list(list(ds))"}.get(type(dataset).__name__, "")
        raise TypeError(f"{name} must be a datasets.Dataset or a list of row dicts, not {type(dataset).__name__}"
                        + hint)
    read: dict[int, dict] = {}

    def check(where: str, row: dict) -> int:
        for required in ("question", "answers", "passages"):  # else "has 0 candidates", "must be a non-empty list"
            if required not in row:
                _fail(where, required, f"is missing (the row's fields: {sorted(k for k in row if k != '__index__')})")
        read[row["__index__"]] = _canonical(where, row, min_passages=k)
        return row["__index__"]

    # Named 1-based, as the loaders name lines: question 1 is dataset[0] (or a file's first question read).
    records = ((f"{name} question {i + 1}" + (f" (id {row['id']!r})" if row.get("id") else ""),
                {**row, "__index__": i}) for i, row in enumerate(dataset))
    keep, stats = convert(records, check, name, on_error)

    def as_read(row: dict, canonical: dict) -> dict:
        return {**row, "answers": canonical["answers"],
                "gold": row["gold"] if row.get("gold") not in (None, []) else canonical["gold"],
                "passages": [{"title": "", "text": p} if isinstance(p, str) else
                             {key: value for key, value in p.items() if key != "gold"} for p in row["passages"]]}

    def changed(row: dict) -> bool:
        return isinstance(row["answers"], str) or any(isinstance(p, str) or "gold" in p for p in row["passages"])

    if any(changed(dataset[i]) for i in keep):  # one rebuild: Arrow infers each column's type from every row
        rows = [as_read(dataset[i], read[i]) for i in keep]
        if isinstance(dataset, Dataset):  # its name and description kept (the model card cites them), not its types
            info = dataset.info.copy()
            info.features = None
            dataset = Dataset.from_list(rows, info=info)
        else:
            dataset = rows
    elif stats.skipped:
        dataset = dataset.select(keep) if isinstance(dataset, Dataset) else [dataset[i] for i in keep]
    return dataset, stats
