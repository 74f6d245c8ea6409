"""Write a smaller HotpotQA distractor file: each question's gold paragraphs plus its first D distractors.

    python scripts/hotpotqa_subset.py --input ../shared/data/hotpotqa_train300/hotpotqa_distractor_train300.jsonl \
        --output outputs/real_cpu/data/train_n4.jsonl --distractors 2 --rows 0:250

Why: on a CPU a 135 M model reads ~50-200 tokens/s, so the real recipe's N = 10 paragraphs per question are out of
reach for training there; N = 4 (the two supporting paragraphs and two of HotpotQA's own retrieved distractors) keeps
the task — pick the paragraph that answers — at a third of the selector prompt. Distractors are taken in the file's
order (HotpotQA's, not a label-aware choice), the paragraphs keep that order, and the output has the input's layout
(Hugging Face column-wise or official row-wise), so it reads as ``hotpotqa:<path>`` anywhere. ``--rows a:b`` keeps
rows a..b-1, for a tuning split of a training file. Every row is checked by the training loader first
(``dro_rl.data.load``): a malformed row stops the script with its line and field, and nothing is written. Rows that
end up with fewer paragraphs than asked (their source has fewer) or with no supporting paragraph are counted and
named in the summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dro_rl.cli import refusals_in_one_line
from dro_rl.data import iter_records, load
from dro_rl.files import claim_output, write_lines
from dro_rl.parser import DROParser


@dataclass
class SubsetArguments:
    input: str = field(metadata={"help": "HotpotQA distractor file (JSONL or JSON array; column-wise or row-wise)."})
    output: str = field(metadata={"help": "JSONL to write (refused if it exists, unless --overwrite)."})
    distractors: int = field(default=2, metadata={"help": "D, non-supporting paragraphs kept per question."})
    rows: str | None = field(
        default=None, metadata={"help": "`a:b`: keep rows a..b-1 of the file (0-based, 0 <= a < b <= rows in file)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})


def parse_rows(spec: str | None, total: int) -> range:
    """``a:b`` -> range(a, b), within the file; either end may be left out (``:50``, ``250:``)."""
    if spec is None:
        return range(total)
    try:
        a, b = (int(x) if x.strip() else None for x in spec.split(":"))
    except ValueError as err:
        raise ValueError(f"--rows must look like a:b (0-based, b excluded), got {spec!r}") from err
    a, b = 0 if a is None else a, total if b is None else b
    if not 0 <= a < b <= total:
        raise ValueError(f"--rows {spec}: the file has {total} rows, so a:b needs 0 <= a < b <= {total}")
    return range(a, b)


def subset_row(row: dict, gold: list[bool], distractors: int) -> tuple[dict, int]:
    """(``row`` — a record of the file — with its gold paragraphs and the first ``distractors`` others, in the file's
    order; how many distractors it kept). ``gold`` holds the loader's flags, one per paragraph ([] when none)."""
    context = row["context"]
    columnwise = isinstance(context, dict)  # the Hugging Face layout; else the official [title, sentences] pairs
    keep, extra = [], 0
    for j in range(len(context["title"] if columnwise else context)):
        if j < len(gold) and gold[j]:
            keep.append(j)
        elif extra < distractors:
            keep.append(j)
            extra += 1
    if columnwise:
        context = {"title": [context["title"][j] for j in keep], "sentences": [context["sentences"][j] for j in keep]}
    else:
        context = [context[j] for j in keep]
    return {**row, "context": context}, extra


def main(args: SubsetArguments) -> int:
    """Write the subset; returns the number of questions written."""
    if isinstance(args.distractors, bool) or not isinstance(args.distractors, int) or args.distractors < 0:
        raise ValueError(f"--distractors must be an integer >= 0, got {args.distractors!r}")
    claim_output(args.output, args.overwrite, "--overwrite", [args.input])
    if os.path.isdir(args.input):
        raise IsADirectoryError(f"--input {args.input} is a folder: give a HotpotQA file")
    rows, _ = load(args.input, "hotpotqa")  # every row checked (file, line, field) before anything is written
    raw = [record for _, record in iter_records(args.input)]
    picked = parse_rows(args.rows, len(raw))
    subset, kept = zip(*(subset_row(raw[i], rows[i]["gold"], args.distractors) for i in picked))
    short = [(i, len(rows[i]["passages"])) for i, n in zip(picked, kept)
             if n < args.distractors]  # the source has fewer distractors than asked: every paragraph is kept
    no_gold = [i for i in picked if not rows[i]["gold"]]

    write_lines(subset, args.output)  # atomically: nothing partial is left if this stops
    print(f"wrote {len(subset)} questions (rows {picked.start}-{picked.stop - 1} of {args.input}) to {args.output}: "
          f"the gold paragraphs and the first {args.distractors} distractors of each")
    if short:
        print(f"  {_rows(len(short))} fewer than {args.distractors} distractors in the source, so fewer paragraphs: "
              + ", ".join(f"row {i} ({n} paragraphs)" for i, n in short[:10]) + (" ..." if len(short) > 10 else ""))
    if no_gold:
        print(f"  {_rows(len(no_gold))} no supporting paragraph (kept with distractors only): rows "
              + ", ".join(map(str, no_gold[:10])) + (" ..." if len(no_gold) > 10 else ""))
    return len(subset)


def _rows(n: int) -> str:
    return f"{n} row has" if n == 1 else f"{n} rows have"


if __name__ == "__main__":
    with refusals_in_one_line("hotpotqa_subset.py"):
        main(DROParser(SubsetArguments).parse_args_and_config()[0])
