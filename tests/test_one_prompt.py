"""One prompt definition everywhere: the warm-up script, the evaluation script and the trainer, each given the same
pipeline flags, build the same selector and generator prompts token for token, with long passages that hit the
prompt caps (the scripts used to ignore `max_prompt_length` / `generator_max_prompt_length`)."""

import copy
import sys
import types
from pathlib import Path

from datasets import Dataset
from trl import TrlParser

from dro_rl import DROConfig, DROTrainer
from dro_rl import evaluation as evaluation_module
from dro_rl import trainer as trainer_module
from dro_rl.data import write_jsonl
from dro_rl.generator import GeneratorPrompt
from dro_rl.models import load_model
from dro_rl.pipeline_config import PipelineConfig
from dro_rl.selector import IdGrammar, SelectorPrompt, apply_template, passage_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import evaluate  # noqa: E402
import warmup_sft  # noqa: E402

K, SELECTOR_CAP, GENERATOR_CAP = 2, 160, 70
PIPELINE_FLAGS = [
    "--num_docs_selected", str(K), "--max_passage_tokens", "64", "--max_prompt_length", str(SELECTOR_CAP),
    "--generator_max_passage_tokens", "64", "--generator_max_prompt_length", str(GENERATOR_CAP),
    "--use_chat_template", "false", "--repeat_ids", "true", "--retriever", "none",
]


def long_rows(n: int = 3) -> list[dict]:
    """Six ~120-word passages per question, the first two gold; far over both caps at 64 tokens per passage."""
    words = "the river flows past the old mill where people gather every market day to trade grain and wool".split()
    rows = []
    for q in range(n):
        passages = [{"id": f"q{q}d{i}", "title": f"Title {q} {i}",
                     "text": " ".join(words[(i + j) % len(words)] for j in range(120))} for i in range(6)]
        rows.append({"id": f"q{q}", "question": f"where do people trade grain on day {q} ?", "answers": ["the mill"],
                     "passages": passages, "gold": [True, True, False, False, False, False]})
    return rows


def capture(monkeypatch, owner, name: str, index: int) -> list:
    """Records argument ``index`` (the prompts) of every call to ``owner.name``."""
    seen, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        seen.extend(args[index])
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return seen


def test_warmup_evaluation_and_training_build_the_same_capped_prompts(tmp_path, monkeypatch):
    rows = long_rows()
    data = tmp_path / "long.jsonl"
    write_jsonl(rows, str(data))
    _, tok = load_model("tiny:minilm")

    # the trainer, configured from the same flags
    (config,) = TrlParser((DROConfig,)).parse_args_and_config(args=[
        *PIPELINE_FLAGS, "--output_dir", str(tmp_path / "dro"), "--num_generations", "2",
        "--per_device_train_batch_size", "6", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
    ])
    selector, _ = load_model("tiny:minilm", seed=0)
    generator, _ = load_model("tiny:minilm", seed=1)
    trainer = DROTrainer(model=selector, generator=generator, args=config, processing_class=tok,
                         generator_processing_class=tok,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("question", "answers", "passages", "gold")}
                                                          for r in rows]))
    trained = capture(monkeypatch, trainer_module, "sample_rankings", 2)
    trainer._generate_and_score_completions([dict(trainer.train_dataset[q]) for q in range(3) for _ in range(2)])
    assert len(trained) == 3 and all(len(p) <= SELECTOR_CAP for p in trained)
    uncapped = SelectorPrompt(K, 64, use_chat_template=False, repeat_ids=True)(tok, rows[0]["question"],
                                                                              rows[0]["passages"])
    assert len(uncapped) > SELECTOR_CAP  # the cap really binds

    def trainer_generator_prompt(row, picks):
        return trainer.generator_prompt(tok, row["question"], [row["passages"][i] for i in picks])

    # the warm-up script (its SFT run replaced by a capture of the rows it would train on)
    examples = []
    monkeypatch.setattr(warmup_sft, "run_sft", lambda model, tokenizer, sft_rows, args: examples.append(sft_rows)
                        or types.SimpleNamespace(save_model=lambda path: None))
    for role in ("selector", "generator"):
        warmup_sft.main(*warmup_sft.make_parser().parse_args_and_config(args=[
            *PIPELINE_FLAGS, "--data", str(data), "--role", role, "--model", "tiny:minilm",
            "--shuffle_candidates", "false", "--output_dir", str(tmp_path / role), "--use_cpu", "true",
            "--bf16", "false", "--report_to", "none",
        ]))
    prompt_part = [[e["input_ids"][: e["completion_mask"].index(1)] for e in sft_rows] for sft_rows in examples]
    assert prompt_part[0] == trained
    for row, ids in zip(rows, prompt_part[1]):  # two gold passages, in a shuffled order
        assert ids in (trainer_generator_prompt(row, [0, 1]), trainer_generator_prompt(row, [1, 0]))
        assert len(ids) <= GENERATOR_CAP
    assert len(GeneratorPrompt(64, use_chat_template=False)(tok, rows[0]["question"], rows[0]["passages"][:2])) \
        > GENERATOR_CAP

    # the evaluation script
    evaluated = capture(monkeypatch, evaluation_module, "sample_rankings", 2)
    answered = capture(monkeypatch, evaluation_module, "generate_answers", 2)
    evaluate.main(*evaluate.make_parser().parse_args_and_config(args=[
        *PIPELINE_FLAGS, "--datasets", str(data), "--selector", "tiny:minilm", "--generator", "tiny:minilm",
        "--output_dir", str(tmp_path / "eval"), "--max_answer_tokens", "2",
    ]))
    assert evaluated == trained
    retrieval_top_k = answered[: len(rows)]  # the first strategy scored: the retrieval order's top K
    assert retrieval_top_k == [trainer_generator_prompt(row, [0, 1]) for row in rows]



def test_prompt_defaults_are_the_pipeline_defaults():
    """Code that builds a prompt without a config (score_picks' fallback) gets the pipeline's default prompt."""
    config = PipelineConfig()
    assert GeneratorPrompt() == config.generator_prompt()
    assert SelectorPrompt(config.num_docs_selected) == config.selector_prompt()


def test_prompt_pieces_render_as_documented(bpe_tok):
    chat = copy.deepcopy(bpe_tok)
    chat.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<a>{% endif %}")
    plain = bpe_tok("hi there", add_special_tokens=False)["input_ids"]
    assert apply_template(chat, "hi there", True) == chat("<u>hi there<a>", add_special_tokens=False)["input_ids"]
    assert apply_template(chat, "hi there", False) == plain
    assert apply_template(bpe_tok, "hi there", True) == plain  # no template to apply
    _, minilm = load_model("tiny:minilm")  # BERT-style: would add [CLS] ... [SEP]
    assert apply_template(minilm, "hi there", False) == minilm("hi there", add_special_tokens=False)["input_ids"]
    assert IdGrammar(minilm, 3).first[0] == tuple(minilm("[1]", add_special_tokens=False)["input_ids"])
    assert passage_text({"title": " T ", "text": " x "}) == "T: x"
    assert passage_text({"title": None, "text": "x"}) == "x"
