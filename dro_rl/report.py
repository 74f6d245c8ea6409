"""End-of-run report: a printed table, ``report.json`` and ``curves.png`` from the Trainer's log history."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .evaluation import bootstrap_interval

CURVES = [
    ("selector/support_recall", "support recall@K of sampled picks"),
    ("generator/answer_logprob", "log p(y | x, d_z)"),
    ("weights/ess", "effective sample size of w̃"),
    ("selector/ranking_logprob", "log p(z | x) of sampled rankings"),
    ("generator/loss", "generator loss"),
    ("frac_reward_zero_std", "fraction of groups with equal rewards"),
]


# The rows of a run's table: (label, evaluation, strategy). "before" is evaluated with the warm-up models, "after"
# with the DRO pair; the pair the paper compares is "retrieval top-K, warm-up generator" vs "selector after DRO".
ROWS = [
    ("random", "after", "random"),
    ("retrieval top-K, warm-up generator", "before", "retrieval"),
    ("retrieval top-K, DRO generator", "after", "retrieval"),
    ("selector before DRO", "before", "selector"),
    ("selector after DRO", "after", "selector"),
    ("oracle (gold passages), DRO generator", "after", "oracle"),
]
METRICS = {"support_recall_at_k": "support recall@K", "answer_recall_at_k": "answer recall@K",
           "answer_em": "answer EM", "answer_f1": "answer F1"}  # report key: table header
# Paired differences over the same questions: (name, metric, (evaluation, strategy), minus (evaluation, strategy)).
DIFFERENCES = [
    ("selector_after_minus_retrieval", "support_recall_at_k", ("after", "selector"), ("after", "retrieval")),
    ("selector_after_minus_retrieval", "answer_recall_at_k", ("after", "selector"), ("after", "retrieval")),
    ("dro_pair_minus_warmup_generator_on_retrieval", "answer_em", ("after", "selector"), ("before", "retrieval")),
    ("dro_pair_minus_warmup_generator_on_retrieval", "answer_f1", ("after", "selector"), ("before", "retrieval")),
]


def build_report(before: dict, after: dict, wall: float, config: dict, data: dict | None = None,
                 resumed: bool = False) -> dict:
    """The figures of a run, each with its 95 % bootstrap interval over questions, and the paired differences that
    say whether DRO helped (an interval excluding 0 is a difference larger than the resampling noise); ``data``: the
    rows kept and skipped per split (``data/skipped.json``, without the reasons). ``wall``: this process's seconds;
    ``resumed`` says that earlier processes did part of the run, so ``wall`` is not the run's whole time."""
    evaluations = {"before": before, "after": after}

    def values(evaluation: str, strategy: str, metric: str) -> list | None:
        return evaluations[evaluation].get(strategy, {}).get("per_question", {}).get(metric)

    rows = {}
    for label, evaluation, strategy in ROWS:
        if after and strategy not in evaluations[evaluation]:
            continue  # the oracle of an evaluation set without gold passage labels
        label = _starting_generator(label, config)
        found = evaluations[evaluation].get(strategy, {})
        rows[label] = {metric: {"mean": found.get(metric),
                                "ci95": _interval(values(evaluation, strategy, metric) or [])}
                       for metric in METRICS}
    differences = {}
    for name, metric, (ea, sa), (eb, sb) in DIFFERENCES:
        a, b = values(ea, sa, metric), values(eb, sb, metric)
        if a and b:
            paired = [x - y for x, y in zip(a, b) if x is not None and y is not None]
            differences.setdefault(name, {})[metric] = {"mean": sum(paired) / len(paired) if paired else None,
                                                        "ci95": _interval(paired)}
    return {
        "rows": rows,
        "differences": differences,
        "num_eval_questions": after.get("selector", {}).get("n"),
        "num_labelled_eval_questions": after.get("oracle", {}).get("n", 0),  # the oracle's rows
        "data": {split: {"kept": d["kept"], "skipped": d["skipped"],
                         **({"read_limit": d["read_limit"]} if d.get("read_limit") else {})}
                 for split, d in (data or {}).items()},
        "wall_seconds": wall,
        "resumed": resumed,
        "config": config,
    }


def _starting_generator(label: str, config: dict) -> str:
    """``label``, with the "warm-up generator" (a row's label) or "warmup generator" (a difference's key) named for
    what it is in a run without a generator warm-up: the generator the run started from."""
    if (config.get("script") or {}).get("generator_warmup_steps", 1) != 0:
        return label
    return re.sub(r"warm-?up generator", "generator before DRO (no warm-up)", label)


def _interval(values: list) -> list[float] | None:
    """A JSON-shaped 95 % interval, so that report.json reads back equal to the report."""
    found = bootstrap_interval(values)
    return list(found) if found else None


def format_table(report: dict) -> str:
    """Markdown table of support and answer recall@K and answer EM/F1 with 95 % intervals, and the paired
    differences. Answer recall (a gold answer string in the picked passages) is the paper's selector recall, and the
    selector's figure where K is below the number of gold passages (support recall@1 of two gold passages is at
    most 0.5)."""
    def cell(entry: dict) -> str:
        mean, ci = entry["mean"], entry["ci95"]
        return "–" if mean is None else f"{mean:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    k = ((report.get("config") or {}).get("training") or {}).get("num_docs_selected")  # the run's K, when recorded
    header = [label.replace("@K", f"@{k}") if k else label for label in METRICS.values()]
    lines = ["| selection | " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(METRICS)]
    missing = {"mean": None, "ci95": None}  # a report.json written before the metric existed
    lines += [f"| {label} | " + " | ".join(cell(row.get(m, missing)) for m in METRICS) + " |"
              for label, row in report["rows"].items()]
    total, labelled = report.get("num_eval_questions"), report.get("num_labelled_eval_questions")
    if total and labelled is not None and labelled < total:
        lines.append("\noracle: no evaluation question has gold passage labels, so there is no oracle row"
                     if not labelled else
                     f"\noracle: scored on the {labelled} of {total} evaluation questions with gold passage labels")
    for name, by_metric in report["differences"].items():  # report.json keeps the key; the line says what it is
        label = _starting_generator(name.replace("_", " "), report.get("config") or {})
        lines.append(f"\n{label}: " + ", ".join(f"{m} {cell(e)}" for m, e in by_metric.items()))
    data = report.get("data") or {}
    if any(d["skipped"] for d in data.values()):
        lines.append("\nrows skipped as malformed (on_bad_row: skip; which and why: data/skipped.json): " +
                     ", ".join(f"{split} {d['skipped']} of {d['kept'] + d['skipped']} read" +
                               (f" (at most {d['read_limit']}: --max_{split}_questions)" if d.get("read_limit") else "")
                               for split, d in data.items()))
    return "\n".join(lines)


def plot_curves(log_history: list[dict[str, Any]], path: str) -> None:
    """Training curves of the logged DRO metrics, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, t) for k, t in CURVES if any(k in h for h in log_history)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, present):
        points = [(h["step"], h[key]) for h in log_history if h.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, log_history: list[dict[str, Any]], output_dir: str) -> str:
    """Write ``report.json`` and ``curves.png`` into ``output_dir``; return the table."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    plot_curves(log_history, os.path.join(output_dir, "curves.png"))
    return format_table(report)
