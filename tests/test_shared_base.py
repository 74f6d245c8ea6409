"""One frozen base with two LoRA adapters (selector, generator): correct gradients under checkpointing, and training
that matches two separate copies of the base step for step."""

import os

import pytest
import torch
from conftest import make_model
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from tiny_run import as_dataset, tiny_config

from dro_rl import DROTrainer, models
from dro_rl.models import (
    GENERATOR,
    SELECTOR,
    enable_adapter_checkpointing,
    shared_base_model,
    use_adapter,
)
from dro_rl.trainer import load_weights

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{**LORA, **overrides})


def two_adapter_model(word_tok):
    # init_lora_weights=False: B is random too, so every LoRA weight gets a non-zero gradient at once
    torch.manual_seed(0)
    return shared_base_model(make_model(word_tok), lora(init_lora_weights=False), lora(init_lora_weights=False))


def summed_loss(model, ids):
    """A loss that runs the selector adapter, then the generator adapter, and is backpropagated once."""
    with use_adapter(model, SELECTOR):
        a = model(input_ids=ids).logits.logsumexp(-1).mean()
    with use_adapter(model, GENERATOR):
        b = model(input_ids=ids).logits.logsumexp(-1).mean()
    return a + 2 * b


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    summed_loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_adapter_switching_keeps_both_adapters_trainable(word_tok):
    model = two_adapter_model(word_tok)
    for name in (GENERATOR, SELECTOR, GENERATOR):
        with use_adapter(model, name):
            assert model.active_adapter == name
            assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert model.active_adapter == SELECTOR
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_checkpointing_recomputes_each_layer_with_its_own_adapter(word_tok, monkeypatch):
    activate = models._activate
    model = two_adapter_model(word_tok).train()
    model.enable_input_require_grads()
    ids = torch.randint(3, len(word_tok), (3, 10), generator=torch.Generator().manual_seed(0))
    reference = lora_grads(model, ids)  # no checkpointing
    assert all(g.abs().sum() > 0 for g in reference.values())

    # The pitfall: plain checkpointing recomputes the selector's layers with the generator adapter active.
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    plain = lora_grads(model, ids)
    assert max((plain[n] - reference[n]).abs().max().item() for n in reference) > 1e-3

    enable_adapter_checkpointing(model, {"use_reentrant": False})
    switches = []
    monkeypatch.setattr(models, "_activate", lambda m, name: (switches.append(name), activate(m, name)))
    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, ids)
    forward_switches = len(switches)
    loss.backward()
    fixed = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    for n in reference:
        torch.testing.assert_close(fixed[n], reference[n], rtol=1e-5, atol=1e-6)
    # Recomputation switches once per adapter, not once per checkpointed layer.
    assert len(switches) - forward_switches <= 2

    with pytest.raises(ValueError, match="non-reentrant"):
        enable_adapter_checkpointing(model, {"use_reentrant": True})


def adapter_state(model, name):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def train_pair(tmp_path, demo_rows, word_tok, shared: bool, **overrides):
    """Two steps from identical starting weights: one shared base, or two copies of it."""
    start = two_adapter_model(word_tok)
    args = tiny_config(str(tmp_path / ("shared" if shared else "separate")), gradient_checkpointing=True,
                       share_base_model=shared, **overrides)
    if shared:
        models = dict(model=start)
    else:
        models = {}
        for key, name in (("model", SELECTOR), ("generator", GENERATOR)):
            models[key] = get_peft_model(make_model(word_tok), lora())  # the same base weights, seed 0
            set_peft_model_state_dict(models[key], adapter_state(start, name))
    trainer = DROTrainer(**models, args=args, train_dataset=as_dataset(demo_rows), processing_class=word_tok,
                         generator_processing_class=word_tok)
    initial = {name: adapter_state(start, name) for name in (SELECTOR, GENERATOR)}
    trainer.train()
    return trainer, initial


def test_shared_base_trains_like_two_separate_bases(tmp_path, demo_rows, word_tok):
    separate, initial = train_pair(tmp_path, demo_rows, word_tok, shared=False)
    shared, _ = train_pair(tmp_path, demo_rows, word_tok, shared=True)
    assert shared.generator is shared.model
    final = {SELECTOR: adapter_state(shared.model, SELECTOR), GENERATOR: adapter_state(shared.model, GENERATOR)}
    for name, model in ((SELECTOR, separate.model), (GENERATOR, separate.generator)):
        expected = adapter_state(model, "default")
        before = initial[name]
        for key, value in final[name].items():
            assert not torch.equal(value, before[key]), f"{name} {key} did not train"
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)
    base = {n: p for n, p in shared.model.named_parameters() if "lora_" not in n}
    assert base and not any(p.requires_grad for p in base.values())
    log = [h for h in shared.state.log_history if "selector/loss" in h]
    log_sep = [h for h in separate.state.log_history if "selector/loss" in h]
    assert [h["selector/loss"] for h in log] == pytest.approx([h["selector/loss"] for h in log_sep], rel=1e-4)
    assert "generator/grad_norm" in log[0]
    # The optimizer holds each adapter once, the generator's at its own learning rate.
    groups = shared.optimizer.param_groups
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in shared.model.parameters())


def test_shared_base_checkpoint_holds_both_adapters_and_restores_them(tmp_path, demo_rows, word_tok):
    trainer, _ = train_pair(tmp_path, demo_rows, word_tok, shared=True)
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    for name in (SELECTOR, GENERATOR):
        assert os.path.exists(os.path.join(out, name, "adapter_model.safetensors"))
        assert os.path.exists(os.path.join(out, name, "tokenizer_config.json"))
    fresh = two_adapter_model(word_tok)
    for name in (SELECTOR, GENERATOR):
        load_weights(fresh, os.path.join(out, name), adapter_name=name)
        expected = adapter_state(trainer.model, name)
        for key, value in adapter_state(fresh, name).items():
            torch.testing.assert_close(value, expected[key])


def test_shared_base_freezing_and_errors(tmp_path, demo_rows, word_tok):
    trainer, initial = train_pair(tmp_path, demo_rows, word_tok, shared=True, freeze_selector=True)
    torch.testing.assert_close(adapter_state(trainer.model, SELECTOR), initial[SELECTOR])
    generator = adapter_state(trainer.model, GENERATOR)
    assert all(not torch.equal(v, initial[GENERATOR][k]) for k, v in generator.items())

    args = tiny_config(str(tmp_path / "err"), share_base_model=True)
    with pytest.raises(ValueError, match="LoRA config"):
        DROTrainer(model=make_model(word_tok), args=args, train_dataset=as_dataset(demo_rows),
                   processing_class=word_tok)
    with pytest.raises(ValueError, match="adapters named"):
        DROTrainer(model=get_peft_model(make_model(word_tok), lora()), args=args,
                   train_dataset=as_dataset(demo_rows), processing_class=word_tok)
    with pytest.raises(ValueError, match="do not pass"):
        DROTrainer(model=make_model(word_tok), generator=make_model(word_tok), args=args, peft_config=lora(),
                   train_dataset=as_dataset(demo_rows), processing_class=word_tok)
