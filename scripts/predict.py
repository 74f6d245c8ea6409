"""Answer new questions with a trained DRO run: (retrieve ->) select -> generate, greedily.

    python scripts/predict.py --run_dir outputs/demo --input questions.jsonl
    dro-rl predict --run_dir outputs/run --input questions.jsonl --corpus corpus.jsonl --output answers.jsonl

`--input` is canonical JSONL with `question` and, optionally, `id`, `passages` (the question's candidates, put in
the run's first-stage retrieval order) and `answers` (when present, EM / F1 / sub-EM are printed and written per
question). Questions without passages retrieve the run's top-N from `--corpus` with the run's retriever. Every
pipeline setting comes from the run folder (`pipeline.json`). Writes one JSON object per question: `id`, `question`,
`prediction`, the `selected` passage ids in the selector's order and its `ranking` — an existing file is refused
before any model loads, unless `--overwrite`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import transformers

from dro_rl import DROPipeline
from dro_rl.cli import refusals_in_one_line
from dro_rl.data import load_questions
from dro_rl.evaluation import exact_match, f1_score, sub_exact_match
from dro_rl.files import claim_output, write_lines
from dro_rl.parser import DROParser
from dro_rl.pipeline import parse_spec
from dro_rl.pipeline_config import PipelineConfig, check_positive_int
from dro_rl.run_folder import check_complete


@dataclass
class PredictArguments:
    run_dir: str = field(metadata={"help": "A DRO run or checkpoint folder (selector/, generator/, pipeline.json)."})
    input: str = field(metadata={"help": "Canonical JSONL of questions; `passages` and `answers` are optional."})
    output: str | None = field(
        default=None,
        metadata={"help": "Predictions JSONL (default: <input name>.predictions.jsonl in the current folder); an "
                  "existing file is refused unless --overwrite."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file."})
    corpus: str | None = field(
        default=None, metadata={"help": "Corpus JSONL for questions without passages (FlashRAG or id/title/text)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Answer at most this many questions."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Malformed rows: stop or skip."})
    batch_size: int = field(default=32, metadata={"help": "Questions per forward pass."})
    disable_tqdm: bool = field(
        default=False, metadata={"help": "No progress bars (a log file); train_rl.py's flag of the same name."}
    )

    def __post_init__(self):
        fmt, path, _ = parse_spec(self.input)
        if fmt != "canonical":
            raise ValueError(f"--input {self.input!r}: predict.py reads canonical questions, not the {fmt!r} format "
                             f"of train_rl.py and evaluate.py; convert the file first: scripts/retrieve.py "
                             f"--questions {path} --format {fmt} --output <canonical>.jsonl")
        check_positive_int("--batch_size", self.batch_size)
        if self.limit is not None:
            check_positive_int("--limit", self.limit)


def main(args: PredictArguments) -> dict:
    output = args.output or os.path.splitext(os.path.basename(args.input))[0] + ".predictions.jsonl"
    claim_output(output, args.overwrite, "--overwrite",  # before any model loads, not after the answers; never an input
                 [args.input] + ([args.corpus] if args.corpus else []))
    rows, stats = load_questions(args.input, args.on_error, args.limit)
    print(stats.summary(), flush=True)
    if os.path.isdir(args.run_dir):  # a damaged folder named as DROPipeline and evaluate.py name it
        check_complete(args.run_dir)
    k = PipelineConfig.load_pipeline(args.run_dir).num_docs_selected if os.path.isdir(args.run_dir) else None
    problems = {  # found before any model loads (a Hub run's K only once it is downloaded, by DROPipeline)
        "no `passages` and no --corpus to retrieve them from": [
            i for i, r in enumerate(rows) if not r["passages"] and not args.corpus],
        f"fewer candidate passages than the K = {k} the run's selector picks": [
            i for i, r in enumerate(rows) if k is not None and 0 < len(r["passages"]) < k],
    }
    found_all = [(reason, found) for reason, found in problems.items() if found]

    def named(found: list[int]) -> str:
        return ", ".join(f"question {i + 1} (id {rows[i]['id']!r})" for i in found[:5]) + (" ..." if len(found) > 5
                                                                                           else "")

    if found_all and args.on_error == "raise":  # every kind at once: a file mended by hand needs one pass
        raise ValueError(f"{args.input}: " + "; ".join(f"{len(found)} of {len(rows)} questions have {reason}: "
                                                     f"{named(found)}" for reason, found in found_all) +
                         "; fix them, or pass --on_error skip")
    for reason, found in found_all:
        print(f"skipped {len(found)} of {len(rows)} questions with {reason}: {named(found)}", flush=True)
    skipped = {i for _, found in found_all for i in found}
    rows = [r for i, r in enumerate(rows) if i not in skipped]
    if not rows:
        raise ValueError(f"{args.input}: no question left to answer")
    if skipped or stats.skipped:  # the rows the reader skipped as malformed, and those skipped here
        print(f"answering {len(rows)} questions; {len(skipped) + len(stats.skipped)} skipped in all", flush=True)
    if args.disable_tqdm:  # transformers' own bars too (loading weights)
        transformers.utils.logging.disable_progress_bar()
    pipe = DROPipeline.from_pretrained(args.run_dir, batch_size=args.batch_size,
                                       progress=False if args.disable_tqdm else None)
    predictions = pipe([r["question"] for r in rows], [r["passages"] for r in rows], corpus=args.corpus)
    records, scored = [], []
    for row, p in zip(rows, predictions):
        record = {"id": row["id"], "question": row["question"], "prediction": p.answer,
                  "selected": [d["id"] for d in p.passages], "ranking": p.ranking,
                  "candidates": [d["id"] for d in p.candidates]}  # the order the ranking's [i] count in
        if row["answers"]:
            scores = {"em": exact_match(p.answer, row["answers"]), "f1": f1_score(p.answer, row["answers"]),
                      "sub_em": sub_exact_match(p.answer, row["answers"])}
            record.update(answers=row["answers"], **scores)
            scored.append(scores)
        records.append(record)
    write_lines(records, output)
    print(f"wrote {len(predictions)} predictions to {output}", flush=True)
    metrics = {key: sum(s[key] for s in scored) / len(scored) for key in ("em", "f1", "sub_em")} if scored else None
    if metrics:
        print(f"on the {len(scored)} questions with answers: EM {metrics['em']:.3f}, F1 {metrics['f1']:.3f}, "
              f"sub-EM {metrics['sub_em']:.3f}", flush=True)
    return {"output": output, "n": len(predictions), "n_with_answers": len(scored), "metrics": metrics}


def make_parser() -> DROParser:
    return DROParser((PredictArguments,))


if __name__ == "__main__":
    with refusals_in_one_line("predict.py"):
        main(*make_parser().parse_args_and_config())
