"""Evaluate retrieve -> select -> generate, greedily, side by side: retrieval top-K, the selector, gold passages.

    python scripts/evaluate.py --datasets hotpotqa:../shared/data/hotpotqa_dev300/hotpotqa_distractor_dev300.jsonl \
        --selector outputs/warmup/selector --generator outputs/warmup/generator --num_docs_selected 5 \
        --output_dir outputs/eval
    python scripts/evaluate.py --datasets flashrag:../shared/data/flashrag_toy/test.jsonl \
        --corpus ../shared/data/flashrag_toy/sample_data.jsonl --top_n 20 --selector ... --generator ...

Each `--datasets` entry is `[format:]path` (default format: canonical). Rows with their own candidates are re-ranked
by the first-stage retriever (`--retriever none` keeps the file's order); question-only rows retrieve their top-N
from `--corpus`. Writes, per dataset,
`<name>.<strategy>.predictions.jsonl`, plus `metrics.json` and `metrics.md` for all of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from trl import TrlParser

from dro_rl.evaluation import baseline_picks, score_picks, select_greedy
from dro_rl.models import load_model
from dro_rl.pipeline import load_ranked, make_retriever
from dro_rl.pipeline_config import PipelineConfig
from dro_rl.selector import IdGrammar

METRICS = ["support_recall_at_k", "answer_recall_at_k", "answer_em", "answer_f1", "answer_sub_em"]
COUNTS = ["empty_predictions", "answer_recall_undefined"]  # in metrics.json beside the metrics


@dataclass
class EvaluateArguments:
    datasets: list[str] = field(metadata={"help": "`[format:]path` entries; formats as in dro_rl.data.FORMATS."})
    selector: str = field(metadata={"help": "Selector model (path, name, or tiny:<tokenizer> for a smoke test)."})
    generator: str = field(metadata={"help": "Generator model (path, name, or tiny:<tokenizer>)."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and metrics go."})
    corpus: str | None = field(default=None, metadata={"help": "Corpus for question-only datasets."})
    limit: int | None = field(default=None, metadata={"help": "At most this many questions per dataset."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Malformed rows: stop or skip."})


def main(args: EvaluateArguments, pipeline: PipelineConfig) -> dict:
    pipeline.check_pipeline()
    os.makedirs(args.output_dir, exist_ok=True)
    retriever = make_retriever(pipeline.retriever, pipeline.retriever_model)
    selector, tok = load_model(args.selector, seed=0)
    generator, gtok = load_model(args.generator, seed=1)
    sprompt, gprompt = pipeline.selector_prompt(), pipeline.generator_prompt()
    k = pipeline.num_docs_selected
    results: dict[str, dict] = {}
    for spec in args.datasets:
        name, rows = load_ranked(spec, retriever, args.corpus, pipeline.top_n, args.output_dir, args.on_error,
                                 args.limit, f"{pipeline.retriever}:{pipeline.retriever_model}")
        grammar = IdGrammar(tok, max(len(r["passages"]) for r in rows))
        picks = {
            "retrieval": baseline_picks(rows, k, "retrieval"),
            "selector": select_greedy(selector, tok, grammar, sprompt, rows, progress=True),
        }
        if any(r["gold"] for r in rows):
            picks["oracle"] = baseline_picks(rows, k, "oracle")
        results[name] = {}
        for strategy, chosen in picks.items():
            scores = score_picks(rows, chosen, generator, gtok, gprompt, pipeline.max_answer_tokens, progress=True)
            results[name][strategy] = {k: scores.get(k) for k in METRICS + COUNTS}
            path = os.path.join(args.output_dir, f"{name}.{strategy}.predictions.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for r, p, pred in zip(rows, chosen, scores["predictions"]):
                    record = {"id": r["id"], "question": r["question"], "answers": r["answers"], "prediction": pred,
                              "selected": [r["passages"][i]["id"] for i in p]}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        results[name]["n"] = len(rows)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results, k)
    with open(os.path.join(args.output_dir, "metrics.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    return results


def markdown_table(results: dict, k: int) -> str:
    head = ["dataset", "selection", f"support R@{k}", f"answer R@{k}", "EM", "F1", "sub-EM"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * 5]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for name, by_strategy in results.items():
        for strategy, m in by_strategy.items():
            if strategy != "n":
                lines.append(f"| {name} (n={by_strategy['n']}) | {strategy} | " + " | ".join(fmt(m[k_]) for k_ in METRICS) + " |")
    return "\n".join(lines)


def make_parser() -> TrlParser:
    return TrlParser((EvaluateArguments, PipelineConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
