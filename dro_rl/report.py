"""End-of-run report: a printed table, ``report.json`` and ``curves.png`` from the Trainer's log history."""

from __future__ import annotations

import json
import os
from typing import Any

CURVES = [
    ("selector/support_recall", "support recall@K of sampled picks"),
    ("generator/answer_logprob", "log p(y | x, d_z)"),
    ("weights/ess", "effective sample size of w̃"),
    ("selector/ranking_logprob", "log p(z | x) of sampled rankings"),
    ("generator/loss", "generator loss"),
    ("frac_reward_zero_std", "fraction of groups with equal rewards"),
]


def format_table(report: dict) -> str:
    """Markdown before/after table of support recall@K and answer EM/F1."""
    recall, em, f1 = report["support_recall_at_k"], report["answer_em"], report["answer_f1"]
    lines = ["| selection | support recall@K | answer EM | answer F1 |", "| --- | ---: | ---: | ---: |"]
    rows = [
        ("random", recall.get("random"), None, None),
        ("retrieval order (top-K)", recall.get("retrieval"), em.get("retrieval_order"), f1.get("retrieval_order")),
        ("selector before DRO", recall.get("before"), em.get("before"), f1.get("before")),
        ("selector after DRO", recall.get("after"), em.get("dro"), f1.get("dro")),
        ("oracle (gold passages)", recall.get("oracle"), em.get("oracle"), f1.get("oracle")),
    ]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines += [f"| {name} | {fmt(r)} | {fmt(e)} | {fmt(f)} |" for name, r, e, f in rows]
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
