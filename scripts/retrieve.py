"""First-stage retrieval: write each question's top-N candidates as canonical JSONL, in retrieval order.

    python scripts/retrieve.py --questions ../shared/data/flashrag_toy/test.jsonl --format flashrag \
        --corpus ../shared/data/flashrag_toy/sample_data.jsonl --top_n 20 --output outputs/retrieved/toy.jsonl
    python scripts/retrieve.py --questions ../shared/data/hotpotqa_dev300/hotpotqa_distractor_dev300.jsonl \
        --format hotpotqa --output outputs/retrieved/hotpot.jsonl     # rows with candidates: re-rank them

With ``--corpus`` every question retrieves from the corpus (dense exact search, FAISS above 200k passages, or BM25);
the hits are cached next to the output, keyed by the questions, the corpus content and every setting, and checked
when read back. Without it, each row's own candidates are sorted by the retriever, and a row without candidates is
an error. An input with no rows (empty, or every row skipped) is an error too: nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dro_rl.cli import refusals_in_one_line
from dro_rl.data import FORMATS, load, parse_mapping, write_jsonl
from dro_rl.files import claim_output
from dro_rl.models import check_model_name
from dro_rl.parser import DROParser
from dro_rl.pipeline import make_retriever, retrieval_order
from dro_rl.pipeline_config import check_positive_int
from dro_rl.retrieval import DEFAULT_DENSE_MODEL, load_corpus, retrieve_candidates


@dataclass
class RetrieveArguments:
    questions: str = field(metadata={"help": "Question file (JSONL or JSON array)."})
    output: str = field(metadata={"help": "Canonical JSONL to write (an existing file is refused unless --overwrite)."})
    format: str = field(
        default="canonical",
        metadata={"help": "Source layout: " + " | ".join([*FORMATS, "json"]) + " (json: field names from --mapping)."},
    )
    mapping: str | None = field(
        default=None,
        metadata={"help": 'For --format json: source field of each canonical field, as JSON, e.g. '
                  '\'{"question": "q.text", "answers": "golds", "passages": "ctxs"}\'.'},
    )
    corpus: str | None = field(default=None, metadata={"help": "Corpus JSONL (FlashRAG `contents` or id/title/text)."})
    top_n: int = field(default=20, metadata={"help": "Candidates per question (paper: 20)."})
    retriever: Literal["dense", "bm25"] = field(default="dense", metadata={"help": "First-stage retriever."})
    retriever_model: str = field(default=DEFAULT_DENSE_MODEL, metadata={"help": "sentence-transformers model."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Malformed rows: stop or skip."})
    limit: int | None = field(default=None, metadata={"help": "Read at most this many questions."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file."})

    def __post_init__(self):
        check_positive_int("--top_n", self.top_n)
        if self.limit is not None:
            check_positive_int("--limit", self.limit)


def main(args: RetrieveArguments) -> list[dict]:
    mapping = parse_mapping(args.mapping) if args.mapping is not None else None
    claim_output(args.output, args.overwrite, "--overwrite",  # before the retrieval, not after it; never an input
                 [args.questions] + ([args.corpus] if args.corpus else []))
    if args.retriever == "dense":  # a misspelt name: refused now, not by the Hub client's traceback
        check_model_name(args.retriever_model, setting="retriever_model")
    rows, stats = load(args.questions, args.format, args.on_error, mapping, limit=args.limit)
    print(stats.summary(), flush=True)
    retriever = make_retriever(args.retriever, args.retriever_model)
    if args.corpus:
        corpus = load_corpus(args.corpus)
        replaced = sum(bool(r["passages"]) for r in rows)
        print(f"retrieving top-{args.top_n} of {len(corpus)} passages for {len(rows)} questions"
              + (f" ({replaced} rows' own candidates are replaced)" if replaced else "")
              + (f"; the corpus is smaller than --top_n, so each question gets all {len(corpus)}"
                 if len(corpus) < args.top_n else ""), flush=True)
        rows = retrieve_candidates(rows, corpus, retriever, args.top_n, args.output + ".cache.json")
    else:
        rows = retrieval_order(rows, retriever)
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} rows to {args.output}", flush=True)
    return rows


def make_parser() -> DROParser:
    return DROParser((RetrieveArguments,))


if __name__ == "__main__":
    with refusals_in_one_line("retrieve.py"):
        main(*make_parser().parse_args_and_config())
