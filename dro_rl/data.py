"""The canonical example schema and its JSONL reader.

One row per question::

    {"id": "q1", "question": "...", "answers": ["gold", "alias"],
     "passages": [{"id": "d7", "title": "...", "text": "...", "gold": false}, ...]}

``passages`` are the first-stage candidates (any order; the pipeline sorts them by retrieval). The optional
per-passage ``gold`` flags become the row-level ``gold`` list used for support recall; they never reach training.
"""

from __future__ import annotations

import json
from typing import Iterable


class DataError(ValueError):
    """A malformed input row, named by file, line and field."""


def normalise_row(raw: dict, where: str) -> dict:
    """Check one row of the canonical schema and return it in the trainer's layout."""

    def fail(field: str, why: str):
        raise DataError(f"{where}: field '{field}' {why}")

    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        fail("question", "must be a non-empty string")
    answers = raw.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        fail("answers", "must be a non-empty list of non-empty strings")
    passages = raw.get("passages")
    if not isinstance(passages, list) or not passages:
        fail("passages", "must be a non-empty list of {title, text} objects")
    out_passages, gold = [], []
    for j, p in enumerate(passages):
        if isinstance(p, str):
            p = {"text": p}
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            fail(f"passages[{j}].text", "must be a string")
        out_passages.append({"title": str(p.get("title") or ""), "text": p["text"]})
        gold.append(bool(p.get("gold", False)))
    return {
        "id": str(raw.get("id", where)),
        "question": question,
        "answers": answers,
        "passages": out_passages,
        "gold": gold if any(gold) else [],
    }


def read_jsonl(path: str) -> list[dict]:
    """Rows of a canonical-schema JSONL file; a bad line raises DataError naming the file, line and field."""
    return list(_iter_jsonl(path))


def _iter_jsonl(path: str) -> Iterable[dict]:
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(raw, dict):
                raise DataError(f"{where}: a row must be a JSON object")
            yield normalise_row(raw, where)
