"""Train a selector and a generator jointly with DRO, then compare selections before and after.

    python scripts/train_rl.py                                   # the embedded demo (configs/demo.yaml)
    accelerate launch scripts/train_rl.py --config configs/demo.yaml
    accelerate launch scripts/train_rl.py --config configs/<recipe>.yaml --max_steps 100   # flags override YAML

Steps: load rows (the synthetic demo world, or a canonical-schema JSONL) -> order each question's candidates with the
first-stage retriever -> build or load the two models -> warm-up SFT (generator on gold passages; optionally the
selector imitating the retriever) -> evaluate -> DRO -> evaluate -> report.json, curves.png and a printed table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from datasets import Dataset
from trl import (
    ModelConfig,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)

from dro_rl import DROConfig, DROTrainer
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama
from dro_rl.models import load_model
from dro_rl.pipeline import compare, load_ranked, make_retriever, retrieval_order
from dro_rl.report import write_report
from dro_rl.selector import IdGrammar
from dro_rl.warmup import (
    generator_sft_rows,
    run_sft,
    selector_sft_rows,
    selector_targets,
    warmup_config,
)

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml")


@dataclass
class TrainScriptArguments:
    """Options of this script (data, retrieval, demo world, warm-up); training options are DROConfig's."""

    dataset: str = field(
        default="demo", metadata={"help": "`demo`, or `[format:]path` of training rows (formats: dro_rl.data)."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "`[format:]path` of evaluation rows."})
    corpus: str | None = field(default=None, metadata={"help": "Corpus for question-only datasets."})
    demo_num_train: int = field(default=2000, metadata={"help": "Demo: training questions."})
    demo_num_eval: int = field(default=300, metadata={"help": "Demo and JSONL: evaluation questions (at most)."})
    demo_num_candidates: int = field(default=8, metadata={"help": "Demo: N, candidates per question."})
    demo_two_hop_fraction: float = field(default=0.5, metadata={"help": "Demo: share of two-hop questions."})
    demo_num_people: int = field(default=200, metadata={"help": "Demo: people in the world."})
    demo_own_home_distractor: bool = field(
        default=True, metadata={"help": "Demo: two-hop candidates include the asked person's own home city."}
    )
    demo_hidden_size: int = field(default=64, metadata={"help": "Demo: width of the tiny Llama models."})
    demo_num_layers: int = field(default=2, metadata={"help": "Demo: depth of the tiny Llama models."})
    generator_warmup_steps: int = field(default=300, metadata={"help": "Generator SFT steps before DRO (0: none)."})
    selector_warmup_steps: int = field(
        default=0, metadata={"help": "Selector SFT steps imitating the retriever's ranking before DRO (0: none)."}
    )
    warmup_learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of both warm-ups."})
    warmup_batch_size: int = field(default=64, metadata={"help": "Batch size of both warm-ups."})


def load_rows(args: TrainScriptArguments, dro: DROConfig, retriever) -> tuple[list[dict], list[dict]]:
    """Training and evaluation rows, candidates in first-stage retrieval order (corpus hits cached in cache_dir)."""
    if args.dataset == "demo":
        world = WorldConfig(
            num_people=args.demo_num_people, num_candidates=args.demo_num_candidates,
            two_hop_fraction=args.demo_two_hop_fraction, own_home_distractor=args.demo_own_home_distractor,
            seed=dro.seed,
        )
        train, evals = make_split(world, args.demo_num_train, 1), make_split(world, args.demo_num_eval, 2)
        print(f"retrieval: ranking the candidates of {len(train) + len(evals)} demo questions", flush=True)
        return retrieval_order(train, retriever), retrieval_order(evals, retriever)
    ranked = lambda spec, limit=None: load_ranked(  # noqa: E731
        spec, retriever, args.corpus, dro.top_n, dro.output_dir, limit=limit,
        retriever_name=f"{dro.retriever}:{dro.retriever_model}",
    )[1]
    return ranked(args.dataset), ranked(args.eval_dataset, args.demo_num_eval) if args.eval_dataset else []


def build_models(args: TrainScriptArguments, dro: DROConfig, model_args: ModelConfig, rows: list[dict]):
    """(selector, tokenizer, generator, generator tokenizer): the demo's tiny models, or by name (dro_rl.models).

    With ``share_base_model`` the generator is None: the trainer puts both adapters on the selector's base.
    """
    if dro.share_base_model and (args.generator_warmup_steps or args.selector_warmup_steps):
        raise ValueError("share_base_model trains two adapters on one base: warm up with scripts/warmup_sft.py first "
                         "and set generator_warmup_steps / selector_warmup_steps to 0")
    if model_args.model_name_or_path is None:
        n = max(len(r["passages"]) for r in rows)
        tok = demo_tokenizer(rows, n, dro.num_docs_selected)
        shape = dict(hidden=args.demo_hidden_size, layers=args.demo_num_layers, heads=4)
        selector = tiny_llama(len(tok), seed=dro.seed, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, **shape)
        if dro.share_base_model:
            return selector, tok, None, tok
        generator = tiny_llama(len(tok), seed=dro.seed + 1, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, **shape)
        return selector, tok, generator, tok
    init = dict(dro.model_init_kwargs or {}, dtype=model_args.dtype, revision=model_args.model_revision,
                trust_remote_code=dro.trust_remote_code)
    if model_args.attn_implementation is not None:
        init["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        init["quantization_config"] = quantization
    size = dict(hidden_size=args.demo_hidden_size, num_layers=args.demo_num_layers)
    if dro.share_base_model and dro.generator_model_name_or_path not in (None, model_args.model_name_or_path):
        raise ValueError(f"share_base_model: the generator is an adapter on {model_args.model_name_or_path}, not "
                         f"{dro.generator_model_name_or_path}")
    selector, tok = load_model(model_args.model_name_or_path, dro.seed, **size, **init)
    if dro.share_base_model:
        return selector, tok, None, tok
    gen_name = dro.generator_model_name_or_path or model_args.model_name_or_path
    generator, gtok = load_model(gen_name, dro.seed + 1, **size, **init)
    return selector, tok, generator, gtok


def warm_up(args, dro, selector, tok, generator, gtok, train_rows, grammar, sprompt, gprompt):
    """Generator SFT on gold + retrieved passages; optional selector SFT imitating the retriever."""
    def sft(steps: int, out: str):
        return warmup_config(os.path.join(dro.output_dir, out), steps, args.warmup_batch_size,
                             args.warmup_learning_rate, dro)

    if args.generator_warmup_steps > 0:
        print(f"warm-up: generator SFT, {args.generator_warmup_steps} steps", flush=True)
        rows = generator_sft_rows(gtok, gprompt, train_rows, dro.num_docs_selected, dro.seed)
        run_sft(generator, gtok, rows, sft(args.generator_warmup_steps, "warmup-generator"))
    if args.selector_warmup_steps > 0:  # imitates the retriever; gold labels are never used
        print(f"warm-up: selector SFT on retriever rankings, {args.selector_warmup_steps} steps", flush=True)
        rows = selector_sft_rows(tok, grammar, sprompt, *selector_targets(train_rows, "retrieval", dro.seed))
        run_sft(selector, tok, rows, sft(args.selector_warmup_steps, "warmup-selector"))

def main(script_args: TrainScriptArguments, training_args: DROConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    torch.manual_seed(training_args.seed)

    # 1. Data, in first-stage retrieval order.
    retriever = make_retriever(training_args.retriever, training_args.retriever_model)
    train_rows, eval_rows = load_rows(script_args, training_args, retriever)

    # 2. Models and the shared prompt definitions.
    selector, tok, generator, gtok = build_models(script_args, training_args, model_args, train_rows + eval_rows)
    sprompt, gprompt = training_args.selector_prompt(), training_args.generator_prompt()
    grammar = IdGrammar(tok, max(len(r["passages"]) for r in train_rows + eval_rows))

    # 3. Warm-up, then the "before" evaluation.
    warm_up(script_args, training_args, selector, tok, generator, gtok, train_rows, grammar, sprompt, gprompt)
    evaluate = lambda sel, gen: compare(eval_rows, sel, tok, grammar, sprompt, gen, gtok, gprompt)  # noqa: E731
    before = evaluate(selector, generator or selector) if eval_rows else {}  # a shared base starts as both

    # 4. DRO.
    peft_config = get_peft_config(model_args)
    trainer = DROTrainer(
        model=selector, generator=generator, args=training_args,
        train_dataset=Dataset.from_list([{k_: r[k_] for k_ in ("question", "answers", "passages", "gold")}
                                         for r in train_rows]),
        processing_class=tok, generator_processing_class=gtok,
        peft_config=peft_config, generator_peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()

    # 5. After, and the report.
    selector = trainer.accelerator.unwrap_model(trainer.model)
    generator = trainer.accelerator.unwrap_model(trainer.generator)
    after = evaluate(selector, generator) if eval_rows else {}
    report = build_report(before, after, time.time() - start, script_args, training_args, model_args)
    if trainer.accelerator.is_main_process:
        table = write_report(report, trainer.state.log_history, training_args.output_dir)
        print(f"\n{table}\n\nwall time {report['wall_seconds']:.0f} s; report.json and curves.png in "
              f"{training_args.output_dir}", flush=True)
    return report


def build_report(before: dict, after: dict, wall: float, script_args, training_args, model_args) -> dict:
    """The figures of a run: selection quality before/after DRO and the reference strategies."""
    get = lambda res, name, key: res.get(name, {}).get(key)  # noqa: E731
    return {
        "support_recall_at_k": {
            "random": get(after, "random", "support_recall_at_k"),
            "retrieval": get(after, "retrieval", "support_recall_at_k"),
            "before": get(before, "selector", "support_recall_at_k"),
            "after": get(after, "selector", "support_recall_at_k"),
            "oracle": get(after, "oracle", "support_recall_at_k"),
        },
        # All with the final generator, except `before` (warm-up selector and warm-up generator) and
        # `retrieval_order_before_dro` (retrieval top-K read by the warm-up generator).
        **{
            metric: {
                "retrieval_order": get(after, "retrieval", metric),
                "dro": get(after, "selector", metric),
                "oracle": get(after, "oracle", metric),
                "before": get(before, "selector", metric),
                "retrieval_order_before_dro": get(before, "retrieval", metric),
            }
            for metric in ("answer_em", "answer_f1")
        },
        "wall_seconds": wall,
        "num_eval_questions": get(after, "selector", "n"),
        "config": {
            "script": asdict(script_args),
            "training": json.loads(training_args.to_json_string()),
            "model": asdict(model_args),
        },
    }


def make_parser(subparsers=None) -> TrlParser:
    dataclass_types = (TrainScriptArguments, DROConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("dro", help="Train with DRO", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    argv = sys.argv[1:] if any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]) else [
        "--config", DEMO_CONFIG, *sys.argv[1:]]
    main(*make_parser().parse_args_and_config(args=argv))
