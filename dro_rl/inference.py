"""``DROPipeline``: a trained selector and generator, put to work on new questions.

    from dro_rl import DROPipeline
    pipe = DROPipeline.from_pretrained("outputs/demo")
    print(pipe("which city is home to the boss of p17 ?", passages=[...]).answer)

It runs the same greedy retrieve -> select -> generate pipeline as evaluation (``dro_rl.evaluation.select_greedy``,
``dro_rl.generator.generate_answers``), with the settings the run saved (``pipeline.json``): candidates are put in
the run's first-stage retrieval order (or retrieved from a corpus by it), the selector picks K, the generator answers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .evaluation import select_greedy
from .generator import generate_answers
from .models import GENERATOR, SELECTOR, as_role
from .pipeline import make_retriever, retrieval_order
from .pipeline_config import PipelineConfig, check_positive_int
from .retrieval import load_corpus, search_corpus
from .run_folder import check_complete
from .run_models import load_pair
from .selector import SEPARATOR, IdGrammar, format_id

PROGRESS_AT = 64  # inputs of at least this many questions show progress bars


@dataclass
class Prediction:
    """One question's answer, the passages the selector picked (in its order), and what it ranked."""

    question: str
    answer: str
    passages: list[dict]
    ranking: str  # as the selector wrote it, e.g. "[3] > [1]"
    picks: list[int]  # 0-based indices into ``candidates``
    candidates: list[dict] = field(repr=False)  # in first-stage retrieval order, as the selector saw them

    def to_dict(self) -> dict:
        return asdict(self)


class DROPipeline:
    """Greedy retrieve -> select -> generate with a DRO-trained selector and generator.

    ``selector`` and ``generator`` may be one model with two LoRA adapters (``selector``, ``generator``); each role
    then runs under its own adapter.
    """

    def __init__(self, selector, tokenizer, generator, generator_tokenizer, config: PipelineConfig,
                 batch_size: int = 32, progress: bool | None = None):
        """``progress``: progress bars of retrieval, selection and answering — by default retrieval's when stderr is
        a terminal, the others' from 64 questions; False for none (a log file), True for all."""
        config.check_pipeline()
        check_positive_int("batch_size", batch_size)
        self.selector, self.tokenizer = selector.eval(), tokenizer  # greedy decoding, dropout off
        self.generator, self.generator_tokenizer = generator.eval(), generator_tokenizer
        self.config, self.batch_size = config, batch_size
        self.selector_prompt, self.generator_prompt = config.selector_prompt(), config.generator_prompt()
        self._retriever, self.progress = None, progress

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, batch_size: int = 32,
                        progress: bool | None = None, **model_init_kwargs):
        """Load a run folder or a ``checkpoint-N`` folder (or a Hub repo pushed by ``DROTrainer.push_to_hub``).

        Everything comes from the folder: both models (full weights, LoRA adapters on their base, or one base with
        both adapters), their tokenizers and ``pipeline.json``. A folder whose save did not finish is refused.
        ``model_init_kwargs`` go to ``from_pretrained`` of the models or bases (``dtype``, ``quantization_config``).
        """
        check_positive_int("batch_size", batch_size)  # before anything is read or loaded
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: this machine (this torch build) has no CUDA GPU; leave device unset "
                             "for the best one there is")
        path = os.path.expanduser(path)  # "~/runs/x" from Python, where no shell expands it
        if not os.path.isdir(path):
            if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
                raise FileNotFoundError(f"{path} is not a run folder (no such folder)")  # a path, not a Hub id
            path = _download(path)
        check_complete(path)
        config = PipelineConfig.load_pipeline(path)
        selector, tok, generator, gtok = load_pair(os.path.join(path, SELECTOR), os.path.join(path, GENERATOR),
                                                   **model_init_kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if getattr(selector, "hf_device_map", None) is None:
            selector.to(device)
        if getattr(generator, "hf_device_map", None) is None:
            generator.to(device)
        return cls(selector, tok, generator, gtok, config, batch_size, progress)

    @property
    def retriever(self):
        """The run's first-stage retriever (None for ``retriever: none``), loaded on first use."""
        if self._retriever is None and self.config.retriever != "none":
            self._retriever = make_retriever(self.config.retriever, self.config.retriever_model, self.progress)
        return self._retriever

    def __call__(
        self, questions: str | Sequence[str], passages: Sequence | None = None, corpus: str | Sequence | None = None,
        progress: bool | None = None,
    ) -> Prediction | list[Prediction]:
        """Answer one question (returns a Prediction) or a list of questions (returns a list).

        ``passages``: the question's candidates (strings or ``{"title", "text"}`` dicts), or one list per question;
        they are put in the run's first-stage retrieval order. ``corpus``: a corpus file (FlashRAG ``contents`` or
        id/title/text JSONL) or a list of passages, from which each question without candidates retrieves its
        top ``top_n`` with the run's retriever.
        """
        single = isinstance(questions, str)
        if not single and not isinstance(questions, Iterable):
            raise TypeError(f"questions: a question string or a list of them, not {type(questions).__name__}")
        questions = [questions] if single else list(questions)
        for i, q in enumerate(questions):  # as the data loaders check a `question` field
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string, got {q!r}")
        if isinstance(passages, str) or (single and passages is not None and any(
                not isinstance(p, (str, dict)) for p in passages)):
            raise TypeError("passages: a list of candidate passages (strings or {title, text} dicts) for one question, "
                            "or one such list per question — not a single string")
        if passages is not None and single:
            passages = [passages]
        if passages is not None and len(passages) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(passages)} candidate lists")
        rows = self.candidates(questions, passages or [[] for _ in questions], corpus)
        results = self.predict_rows(rows, progress)
        return results[0] if single else results

    def candidates(self, questions: Sequence[str], passages: Sequence[Sequence], corpus) -> list[dict]:
        """Rows ``{question, passages}`` with candidates in first-stage retrieval order: given, or from ``corpus``."""
        rows = [{"question": q, "passages": [_passage(p, j) for j, p in enumerate(ps)]}
                for q, ps in zip(questions, passages)]
        for i, row in enumerate(rows):  # the answer names its picks by id: two alike could not be told apart
            ids = [p["id"] for p in row["passages"]]
            repeated = sorted({pid for pid in ids if ids.count(pid) > 1})
            if repeated:
                raise ValueError(f"questions[{i}] ({row['question']!r}): its passages repeat the id {repeated[0]!r}; "
                                 "give each candidate its own id (or none: its position is used)")
        missing = [i for i, r in enumerate(rows) if not r["passages"]]
        if corpus is not None and not missing:
            warnings.warn("the corpus is searched only for questions without passages, and every question has "
                          "some: it was not read", stacklevel=3)
        if missing and corpus is None:
            raise ValueError(f"questions[{missing[0]}] ({rows[missing[0]]['question']!r}) has no candidate passages: "
                             "give it candidates (passages=; in predict.py a `passages` field), or a corpus to "
                             "retrieve them from (corpus=; predict.py --corpus)")
        if missing and self.retriever is None:
            raise ValueError("this run's retriever is 'none', so it cannot search a corpus: pass passages=")
        with_candidates = [r for r in rows if r["passages"]]
        ranked = iter(retrieval_order(with_candidates, self.retriever) if with_candidates else [])
        out = [next(ranked) if r["passages"] else r for r in rows]
        if missing:
            docs = load_corpus(corpus) if isinstance(corpus, str) else [_passage(p, j) for j, p in enumerate(corpus)]
            hits = search_corpus(self.retriever, [rows[i]["question"] for i in missing], docs, self.config.top_n)
            for i, hit in zip(missing, hits):
                out[i] = {**rows[i], "passages": [dict(docs[j]) for j in hit]}
        return out

    def predict_rows(self, rows: Sequence[dict], progress: bool | None = None) -> list[Prediction]:
        """Select and answer for rows whose candidates are already in first-stage retrieval order."""
        if not rows:
            return []
        k = self.config.num_docs_selected
        for i, row in enumerate(rows):
            if len(row["passages"]) < k:
                raise ValueError(f"questions[{i}] ({row['question']!r}) has {len(row['passages'])} candidate "
                                 f"passages, fewer than the K = {k} the selector picks")
        progress = self.progress if progress is None else progress
        show = len(rows) >= PROGRESS_AT if progress is None else progress
        n = max(len(r["passages"]) for r in rows)
        grammar = IdGrammar(self.tokenizer, n)  # refuses more candidates than the selector's tokenizer has ids for
        with as_role(self.selector, SELECTOR):
            picks = select_greedy(self.selector, self.tokenizer, grammar, self.selector_prompt, rows,
                                  self.batch_size, progress=show)
        prompts = [self.generator_prompt(self.generator_tokenizer, r["question"], [r["passages"][i] for i in p])
                   for r, p in zip(rows, picks)]
        answers: list[str] = []
        with as_role(self.generator, GENERATOR):
            for s in tqdm(range(0, len(prompts), self.batch_size), desc="answer", disable=not show):
                answers += generate_answers(self.generator, self.generator_tokenizer, prompts[s: s + self.batch_size],
                                            self.config.max_answer_tokens, self.batch_size)
        return [
            Prediction(r["question"], a, [r["passages"][i] for i in p], SEPARATOR.join(format_id(i) for i in p), p,
                       r["passages"])
            for r, p, a in zip(rows, picks, answers)
        ]


def _download(repo_id: str) -> str:
    """The local copy of a run pushed to the Hub (what the model card's quick start loads)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as err:  # offline, unknown repo, malformed id: all mean "not a run we can read"
        raise FileNotFoundError(f"{repo_id} is neither a local run folder nor a reachable Hub repo ({err})") from err


def _passage(p, j: int) -> dict:
    """A candidate as ``{id, title, text}`` from a string or a dict."""
    if isinstance(p, str):
        return {"id": str(j), "title": "", "text": p}
    if not isinstance(p, dict) or not isinstance(p.get("text"), str):
        raise ValueError(f"passage {j} must be a string or a dict with a 'text' string, got {p!r:.80}")
    return {"id": str(p.get("id", j)), "title": p.get("title") or "", "text": p["text"]}
