"""Evaluate retrieve -> select -> generate, greedily, side by side: retrieval top-K, the selector, gold passages.

    python scripts/evaluate.py --datasets hotpotqa:../shared/data/hotpotqa_dev300/hotpotqa_distractor_dev300.jsonl \
        --selector outputs/warmup/selector --generator outputs/warmup/generator --num_docs_selected 5 \
        --output_dir outputs/eval
    python scripts/evaluate.py --datasets flashrag:../shared/data/flashrag_toy/test.jsonl \
        --corpus ../shared/data/flashrag_toy/sample_data.jsonl --top_n 20 --selector ... --generator ...
    python scripts/evaluate.py --run_dir outputs/demo --datasets dev.jsonl     # a DRO run folder: no prompt flags

With `--run_dir` (a run or checkpoint folder), the selector and generator default to its `selector/` and
`generator/` and every pipeline setting comes from its `pipeline.json`: a flag that contradicts a prompt setting
(K, passage budgets, prompt caps, repeat_ids, chat template) is refused by name, and one that changes the retriever,
top_n or answer length is honoured with a warning. A folder whose save did not finish is refused.

Each `--datasets` entry is `[format:]path` (default format: canonical). Rows with their own candidates are re-ranked
by the first-stage retriever (`--retriever none` keeps the file's order); question-only rows retrieve their top-N
from `--corpus`. `--strategies` picks the selections to score (default: retrieval, selector, oracle; `closed_book` has
the generator read no passage; `best_reward` is the pick DRO's reward points to, a ceiling). Writes, per dataset,
`<name>.<strategy>.predictions.jsonl` (with each question's scores), plus `metrics.json` and `metrics.md` for all of
them: each metric with its 95 % bootstrap interval over questions, what made them (`evaluated_with`: the run or
models, the datasets, `--limit` and every pipeline setting), and each strategy's wall time and throughput
(non-padding tokens through the models' forwards, prompts and decoding steps, per second). An output_dir holding an earlier evaluation's files is refused before any model loads,
unless `--overwrite true`, which removes all of them once the inputs are read and the models loaded (a folder never
mixes two evaluations, and a mistyped path costs nothing).
"""

from __future__ import annotations

import dro_rl  # noqa: F401  # first: it quiets bitsandbytes' CPU notice before peft or trl import bitsandbytes

import os
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel

from dro_rl.cli import refusals_in_one_line
from dro_rl.data import check_data_file
from dro_rl.evaluation import (
    baseline_picks,
    bootstrap_interval,
    defined_mean,
    reward_picks,
    score_picks,
    select_greedy,
)
from dro_rl.files import atomic_write, claim_folder, write_json, write_lines
from dro_rl.models import GENERATOR, SELECTOR, as_role, check_model_name
from dro_rl.parser import DROParser
from dro_rl.pipeline import load_ranked, make_retriever, parse_spec
from dro_rl.pipeline_config import PipelineConfig, check_positive_int
from dro_rl.run_folder import COMPLETE_MARKER, check_complete, check_model_folder, given_settings, run_settings
from dro_rl.run_models import load_pair, load_saved_model
from dro_rl.selector import IdGrammar

METRICS = ["support_recall_at_k", "answer_recall_at_k", "answer_em", "answer_f1", "answer_sub_em"]
COUNTS = ["empty_predictions", "answer_recall_undefined"]  # in metrics.json beside the metrics
STRATEGIES = ("closed_book", "retrieval", "selector", "oracle", "best_reward")


@dataclass
class EvaluateArguments:
    datasets: list[str] = field(metadata={"help": "`[format:]path` entries; formats as in dro_rl.data.FORMATS."})
    run_dir: str | None = field(
        default=None,
        metadata={"help": "A DRO run or checkpoint folder: models from its selector/ and generator/, every pipeline "
                  "setting from its pipeline.json."},
    )
    selector: str | None = field(
        default=None, metadata={"help": "Selector model (folder, name, or tiny:<tokenizer>); default: run_dir's. "
                                "Needed only by the `selector` strategy."}
    )
    generator: str | None = field(
        default=None, metadata={"help": "Generator model (folder, name, or tiny:<tokenizer>); default: run_dir's."}
    )
    output_dir: str = field(
        default="outputs/eval",
        metadata={"help": "Where predictions and metrics go; a folder holding an earlier evaluation's files is refused "
                  "unless --overwrite true (which removes them first)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier evaluation's files in output_dir."})
    corpus: str | None = field(default=None, metadata={"help": "Corpus for question-only datasets."})
    limit: int | None = field(default=None, metadata={"help": "At most this many questions per dataset."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Malformed rows: stop or skip."})
    disable_tqdm: bool = field(
        default=False, metadata={"help": "No progress bars (a log file); train_rl.py's flag of the same name."}
    )
    group_by: str | None = field(
        default=None,
        metadata={"help": "Also score each value of this field of the rows' `metadata` on its own (HotpotQA: `type`, "
                  "bridge or comparison, or `level`; the demo: `hops`): in metrics.json as `by_<field>`, in "
                  "metrics.md as rows `name [field=value]`, each with its n and intervals."},
    )
    batch_size: int = field(
        default=32, metadata={"help": "Questions per forward (selection, answers, best_reward scoring); lower it when "
                              "a large model runs out of memory."}
    )
    strategies: list[str] = field(
        default_factory=lambda: ["retrieval", "selector", "oracle"],
        metadata={"help": f"Selections to score, of {list(STRATEGIES)}: `closed_book` (the generator reads no "
                  "passage), `retrieval` (top-K in retrieval order), `selector` (its greedy pick), `oracle` (gold "
                  "passages first; scored on the rows with gold labels only, their number as its `n`), `best_reward` "
                  "(the K passages under which the generator gives the gold answer the highest likelihood, DRO's "
                  "reward: a ceiling for a selector trained on it, since it reads the gold answer)."},
    )

    def __post_init__(self):
        if self.limit is not None:
            check_positive_int("--limit", self.limit)
        check_positive_int("--batch_size", self.batch_size)


def main(args: EvaluateArguments, pipeline: PipelineConfig, given: Collection[str] = ()) -> dict:
    """``given``: the pipeline fields set on the command line (checked against ``run_dir``'s settings)."""
    if args.run_dir:
        if args.selector or args.generator:
            raise ValueError("--run_dir evaluates the run's own selector and generator: drop --selector/--generator, "
                             "or evaluate other models without --run_dir (with the prompt flags they were trained "
                             "with)")
        check_complete(args.run_dir)
        pipeline = run_settings(args.run_dir, pipeline, given)
    elif not args.generator:
        raise ValueError("give --run_dir, or --generator (and --selector for the `selector` strategy)")
    pipeline.check_pipeline()
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown or not args.strategies:
        raise ValueError(f"strategies: unknown {unknown}, choose from {list(STRATEGIES)}")
    if not (args.run_dir or args.selector) and "selector" in args.strategies:
        raise ValueError("--strategies selector scores a selector's picks: give --selector (or --run_dir), or drop "
                         "`selector` from --strategies")
    names = [parse_spec(spec)[2] for spec in args.datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # their predictions, metrics rows and retrieval caches would overwrite each other
        raise ValueError("--datasets: each dataset's results are named after its file, and these names repeat: " +
                         "; ".join(f"{n} ({', '.join(s for s, m in zip(args.datasets, names) if m == n)})"
                                   for n in repeated) + ". Evaluate them in separate calls (separate --output_dir) "
                         "or give the files different names.")
    for path in [parse_spec(spec)[1] for spec in args.datasets] + ([args.corpus] if args.corpus else []):
        check_data_file(path)  # before any model loads, and before the output folder is made
    held = [name for name in ("config.json", "adapter_config.json", COMPLETE_MARKER)
            if os.path.exists(os.path.join(args.output_dir, name))]
    if held:  # its metrics and predictions would sit among a model's or a save's files
        raise ValueError(f"--output_dir {args.output_dir} is a model or run folder (it holds {held[0]}): give the "
                         "evaluation a folder of its own")
    claim_folder(args.output_dir)  # before any model loads: a folder this process can write in
    earlier = sorted(name for name in os.listdir(args.output_dir)
                     if name in ("metrics.json", "metrics.md") or name.endswith(".predictions.jsonl"))
    if earlier and not args.overwrite:  # earlier results are never replaced silently
        raise FileExistsError(f"output_dir {args.output_dir} holds an earlier evaluation's {', '.join(earlier)}: pass "
                              "--overwrite true to replace them, or choose another --output_dir")
    for path in (args.selector, args.generator):
        if path is not None:  # a run's model folder whose save did not finish: named as such, not as a bad name
            check_model_folder(path)
    for name, setting in ((args.selector, "--selector"), (args.generator, "--generator"),
                          (pipeline.retriever_model if pipeline.retriever == "dense" else None, "retriever_model")):
        if name is not None:  # a misspelt name: refused now, not by the Hub client after the other models load
            check_model_name(name, setting=setting)
    retriever = make_retriever(pipeline.retriever, pipeline.retriever_model)
    generator_path = args.generator or os.path.join(args.run_dir, GENERATOR)
    if args.selector or args.run_dir:
        selector, tok, generator, gtok = load_pair(args.selector or os.path.join(args.run_dir, SELECTOR),
                                                   generator_path)
    else:  # no strategy asked reads a selector: the generator alone is loaded
        generator, gtok = load_saved_model(generator_path, GENERATOR)
        selector, tok = generator.eval(), gtok
    datasets = [load_ranked(spec, retriever, args.corpus, pipeline.top_n, args.output_dir, args.on_error, args.limit,
                            f"{pipeline.retriever}:{pipeline.retriever_model}") for spec in args.datasets]
    # Every input read and both models loaded: only now does the earlier evaluation go, all of it, so that a typo in
    # a path costs nothing and the folder never mixes two evaluations, even if this one stops midway.
    for name in earlier:
        os.remove(os.path.join(args.output_dir, name))
    if earlier:
        print(f"--overwrite: removed the earlier evaluation's {', '.join(earlier)} from {args.output_dir}", flush=True)
    if args.group_by:
        for name, rows, _ in datasets:
            check_group_field(name, rows, args.group_by)
    sprompt, gprompt = pipeline.selector_prompt(), pipeline.generator_prompt()
    k = pipeline.num_docs_selected
    results: dict[str, dict] = {}
    for name, rows, _ in datasets:
        grammar = IdGrammar(tok, max(len(r["passages"]) for r in rows))
        results[name] = {}
        labelled = [r for r in rows if any(r["gold"] or [])]
        short = sum(len(r["passages"]) < k for r in rows)
        if short:
            print(f"{name}: {short} of {len(rows)} questions have fewer than K = {k} candidates: every strategy picks "
                  "all of theirs", flush=True)
        for strategy in args.strategies:
            scored_rows = labelled if strategy == "oracle" else rows  # gold passages exist only on labelled rows
            if not scored_rows:
                print(f"{name}: no question has gold passage labels: no oracle row", flush=True)
                continue
            start = time.perf_counter()
            with count_tokens(selector, generator) as tokens:
                if strategy == "selector":
                    with as_role(selector, SELECTOR):  # one base with two adapters plays each role with its own
                        chosen = select_greedy(selector, tok, grammar, sprompt, rows, args.batch_size,
                                               progress=not args.disable_tqdm)
                elif strategy == "best_reward":
                    with as_role(generator, GENERATOR):
                        chosen = reward_picks(rows, k, generator, gtok, gprompt, args.batch_size,
                                              progress=not args.disable_tqdm)
                else:
                    chosen = [[]] * len(rows) if strategy == "closed_book" else baseline_picks(scored_rows, k, strategy)
                with as_role(generator, GENERATOR):
                    scores = score_picks(scored_rows, chosen, generator, gtok, gprompt, pipeline.max_answer_tokens,
                                         args.batch_size, progress=not args.disable_tqdm)
            seconds = time.perf_counter() - start
            results[name][strategy] = {
                **({"n": len(scored_rows)} if len(scored_rows) < len(rows) else {}),
                **{m: scores.get(m) for m in METRICS + COUNTS},
                "ci95": {m: bootstrap_interval(scores["per_question"][m]) for m in METRICS},
                "wall_seconds": seconds, "tokens": tokens[0], "tokens_per_second": tokens[0] / seconds,
            }
            if args.group_by:
                results[name][strategy][f"by_{args.group_by}"] = by_group(scored_rows, scores["per_question"],
                                                                          args.group_by)
            write_lines(({"id": r["id"], "question": r["question"], "answers": r["answers"], "prediction": pred,
                          "selected": [r["passages"][j]["id"] for j in p],
                          "scores": {m: scores["per_question"][m][i] for m in METRICS}}
                         for i, (r, p, pred) in enumerate(zip(scored_rows, chosen, scores["predictions"]))),
                        os.path.join(args.output_dir, f"{name}.{strategy}.predictions.jsonl"))
        results[name]["n"] = len(rows)
    table = markdown_table(results, k)
    setup = {"run_dir": args.run_dir, "selector": args.selector, "generator": args.generator,
             "datasets": args.datasets, "limit": args.limit, "pipeline": pipeline.pipeline_dict()}
    write_json({**results, "evaluated_with": setup}, os.path.join(args.output_dir, "metrics.json"))
    with atomic_write(os.path.join(args.output_dir, "metrics.md")) as f:  # what made the figures, above them
        models = (f"run {args.run_dir}" if args.run_dir else
                  (f"selector {args.selector}, " if args.selector else "") + f"generator {args.generator}")
        f.write(f"{models}; K = {k}, retriever {pipeline.retriever}" +
                (f" ({pipeline.retriever_model})" if pipeline.retriever == "dense" else "") +
                (f"; at most {args.limit} questions per dataset" if args.limit else "") + "\n\n" + table + "\n")
    print("\n" + table, flush=True)
    return results


def group_value(row: dict, field_name: str) -> str:
    value = (row.get("metadata") or {}).get(field_name)
    return "missing" if value is None else str(value)


def check_group_field(name: str, rows: list[dict], field_name: str) -> None:
    """Refuse a --group_by field that no row of a dataset holds: a typo would give one group, 'missing'."""
    if all(group_value(r, field_name) == "missing" for r in rows):
        fields = sorted({key for r in rows for key in (r.get("metadata") or {})})
        raise ValueError(f"--group_by {field_name}: no row of {name} has it in its metadata (its rows' metadata "
                         f"fields: {fields or 'none'})")


def by_group(rows: list[dict], per_question: dict[str, list], field_name: str) -> dict[str, dict]:
    """Each metric's mean and interval over the rows of each value of ``metadata[field_name]`` (the per-question
    scores ``score_picks`` returns, split by group)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(group_value(r, field_name), []).append(i)
    out = {}
    for value, members in sorted(groups.items()):
        part = {m: [per_question[m][i] for i in members] for m in METRICS}
        out[value] = {"n": len(members), **{m: defined_mean(part[m]) for m in METRICS},
                      "ci95": {m: bootstrap_interval(part[m]) for m in METRICS}}
    return out


@contextmanager
def count_tokens(*models: torch.nn.Module) -> Iterator[list[int]]:
    """Count the non-padding input tokens that every forward of ``models`` processes: each prompt once, then one per
    row and decoding step (``generate`` keeps stepping rows that have ended until the whole batch has; constrained
    ranking masks them out). Yields a one-element list that holds the running count."""
    total = [0]

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        total[0] += int(mask[:, -ids.shape[1] :].sum()) if mask is not None else ids.numel()

    bases = {id(m): m.get_base_model() if isinstance(m, PeftModel) else m for m in models}  # generate() skips PEFT's
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in bases.values()]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def markdown_table(results: dict, k: int) -> str:
    """Each metric with its 95 % interval, then the strategy's wall time and throughput."""
    head = ["dataset", "selection", f"support R@{k}", f"answer R@{k}", "EM", "F1", "sub-EM", "time (s)", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * 7]

    def cell(m: dict, metric: str) -> str:
        if m[metric] is None:
            return "–"
        ci = m["ci95"][metric]
        return f"{m[metric]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    for name, by_strategy in results.items():
        for strategy, m in by_strategy.items():
            if strategy != "n":
                cells = [cell(m, metric) for metric in METRICS] + [f"{m['wall_seconds']:.0f}",
                                                                   f"{m['tokens_per_second']:.0f}"]
                lines.append(f"| {name} (n={m.get('n', by_strategy['n'])}) | {strategy} | " + " | ".join(cells) + " |")
                for key in (key for key in m if key.startswith("by_")):  # --group_by: one row per value
                    for value, g in m[key].items():
                        lines.append(f"| {name} [{key[3:]}={value}] (n={g['n']}) | {strategy} | " +
                                     " | ".join(cell(g, metric) for metric in METRICS) + " | – | – |")
    return "\n".join(lines)


def make_parser() -> DROParser:
    return DROParser((EvaluateArguments, PipelineConfig))


if __name__ == "__main__":
    with refusals_in_one_line("evaluate.py"):
        main(*make_parser().parse_args_and_config(), given=given_settings(sys.argv[1:], [EvaluateArguments]))
