"""DRO under real settings: the E-step scores what the M-step trains, the weights are per question, one update
moves the right way, gradient accumulation and fp16 change nothing, and the settings the trainer cannot honour
(DeepSpeed, m = 1 with a trained selector, overflowing parameters) stop it with a message."""

import math

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import make_model
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file
from test_trainer import changed, make_trainer, snapshot, tiny_args
from tiny_run import as_dataset

from dro_rl import DROConfig, DROTrainer
from dro_rl import trainer as trainer_module
from dro_rl.evaluation import support_recall
from dro_rl.generator import target_logprobs
from dro_rl.models import GENERATOR, SELECTOR, shared_base_model
from dro_rl.selector import ranking_logprobs, selector_logprobs


class Spy:
    """Wraps ``owner.name`` (on the real code path) and records each call's arguments and result."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls: list[tuple[tuple, object]] = []
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.append((args, result))
            return result

        monkeypatch.setattr(owner, name, wrapper)


def dropout_lora() -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters (and their dropout) change every forward from step 0
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")


def lora_trainer(tmp_path, demo_rows, word_tok, shared: bool = False, eval_rows=None, **overrides) -> DROTrainer:
    """Selector and generator with LoRA dropout 0.5: separate models, or two adapters on one base."""
    torch.manual_seed(0)
    args = tiny_args(tmp_path, share_base_model=shared, **overrides)
    if shared:
        models = dict(model=shared_base_model(make_model(word_tok), dropout_lora(), dropout_lora()))
    else:
        models = dict(model=make_model(word_tok), generator=make_model(word_tok, seed=100),
                      peft_config=dropout_lora(), generator_peft_config=dropout_lora())
    return DROTrainer(**models, args=args, train_dataset=as_dataset(demo_rows), processing_class=word_tok,
                      generator_processing_class=word_tok, eval_dataset=eval_rows and as_dataset(eval_rows))


def teacher_forced(trainer: DROTrainer, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(z | x) of each sampled ranking and log p(y | x, d_z) of each row, recomputed by the shipped scorers."""
    with torch.no_grad():
        logp = ranking_logprobs(trainer.model, out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                out["completion_mask"], out["allowed"], trainer.temperature)
        answer = target_logprobs(trainer.generator, out["gen_prompt_ids"], out["gen_prompt_mask"],
                                 out["gen_target_ids"], out["gen_target_mask"]).sum(-1)
    return logp, answer


def generation_batch(trainer: DROTrainer, questions: int) -> list[dict]:
    """The first questions of the training set, each repeated m times in a row (as GRPO's RepeatSampler groups)."""
    rows = [dict(trainer.train_dataset[i]) for i in range(questions)]
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); read by the M-step
    return [r for r in rows for _ in range(trainer.num_generations)]


# ------------------------------------------------------------------------------------------------------------------
# 1. The E-step is deterministic given the parameters and scores exactly what the M-step trains
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_base"])
def test_the_loss_scores_exactly_what_the_e_step_sampled_with_lora_dropout_on(
    tmp_path, demo_rows, word_tok, monkeypatch, shared
):
    """Catches: dropout live while sampling or scoring; the loss at T = 1 while sampling at T = 0.7; a per-token
    mean instead of the summed answer log-likelihood in the generator loss."""
    trainer = lora_trainer(tmp_path, demo_rows, word_tok, shared, temperature=0.7, generator_scoring="separate")
    sampled = Spy(monkeypatch, trainer_module, "sample_rankings")
    scored = Spy(monkeypatch, trainer_module, "batch_answer_logprobs")
    select = Spy(monkeypatch, trainer_module.E, "selector_loss")
    generate = Spy(monkeypatch, trainer_module.E, "generator_loss")
    trainer.model.train()  # Trainer.training_step puts the model in train mode before the E-step runs
    out = trainer._generate_and_score_completions(generation_batch(trainer, 3))
    trainer._compute_loss(trainer.model, out)
    assert trainer.model.training and trainer.generator.training  # the E-step gave the modes back
    assert not trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing  # not asked for

    (_, samples), = sampled.calls
    (_, answer_logp), = scored.calls
    (loss_args, _), = select.calls
    (gen_args, _), = generate.calls
    torch.testing.assert_close(loss_args[1].detach(), samples.logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(gen_args[1].detach(), answer_logp, atol=1e-4, rtol=0)


def test_the_e_step_is_deterministic_even_when_training_keeps_dropout(tmp_path, demo_rows, word_tok, monkeypatch):
    """With ``disable_dropout: false`` the M-step keeps its dropout, but sampling and scoring do not see it: the
    E-step's log-probabilities are those of the parameters alone (recomputed with every dropout off)."""
    trainer = lora_trainer(tmp_path, demo_rows, word_tok, disable_dropout=False)
    sampled = Spy(monkeypatch, trainer_module, "sample_rankings")
    scored = Spy(monkeypatch, trainer_module, "batch_answer_logprobs")
    trainer.model.train()
    out = trainer._generate_and_score_completions(generation_batch(trainer, 3))
    (_, samples), = sampled.calls
    (_, answer_logp), = scored.calls
    trainer.model.eval()
    trainer.generator.eval()
    logp, answer = teacher_forced(trainer, out)
    torch.testing.assert_close(logp, samples.logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(answer, answer_logp, atol=1e-4, rtol=0)
    # The user's dropout is honoured where it belongs, in the training forwards, the generator's included even when
    # it arrives in eval mode (as from_pretrained leaves a model; eval mode would also skip gradient checkpointing).
    trainer.model.train()
    select = Spy(monkeypatch, trainer_module.E, "selector_loss")
    generate = Spy(monkeypatch, trainer_module.E, "generator_loss")
    for _ in range(2):
        trainer._compute_loss(trainer.model, out)
    assert trainer.generator.training
    for spy in (select, generate):
        assert not torch.equal(spy.calls[0][0][1], spy.calls[1][0][1])


# ------------------------------------------------------------------------------------------------------------------
# The weights, the direction of one step, and gradient accumulation
# ------------------------------------------------------------------------------------------------------------------


def sharpen(generator) -> None:
    """Larger weights make the tiny generator's answer depend on the passages, so that the m samples of a question
    get clearly different weights (a random 32-wide model gives them all ≈ 1/m)."""
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if "proj" in name:
                p.mul_(10.0)


def per_row_answer_logprob(generator, prompt: list[int], target: list[int]) -> float:
    """log p(y | x, d_z) of one row, unpadded, straight from the logits."""
    with torch.no_grad():
        logits = generator(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(target)), target].sum().item()


@pytest.mark.parametrize("estimator, importance_logits, generator_update",
                         [("dro", "sum", "weighted"), ("dro_baseline", "mean", "weighted"), ("dro", "sum", "uniform"),
                          ("dro", "mean", "best")])
def test_weights_are_a_per_question_softmax_of_the_generator_scores(
    tmp_path, demo_rows, word_tok, monkeypatch, estimator, importance_logits, generator_update
):
    """Recomputed outside the trainer, one row at a time. Catches: weights normalised across questions, advantages
    or generator coefficients shifted to another question, ``importance_logits`` or ``generator_update`` ignored (the
    trainer passing "weighted" whatever was set passed every test before)."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, estimator=estimator, importance_logits=importance_logits,
                           generator_scoring="separate", generator_update=generator_update)
    sharpen(trainer.generator)
    sampled = Spy(monkeypatch, trainer_module, "sample_rankings")
    batch, m = generation_batch(trainer, 3), trainer.num_generations
    out = trainer._generate_and_score_completions(batch)
    (_, samples), = sampled.calls

    prompt = trainer.args.generator_prompt()
    logits = []
    for row, picks in zip(batch, samples.picks):
        target = prompt.target(word_tok, row["answers"][0])
        ids = prompt(word_tok, row["question"], [row["passages"][i] for i in picks])
        logp = per_row_answer_logprob(trainer.generator, ids, target)
        logits.append(logp / len(target) if importance_logits == "mean" else logp)
    weights = []
    for q in range(len(batch) // m):
        group = logits[q * m : (q + 1) * m]
        e = [math.exp(x - max(group)) for x in group]
        weights += [x / sum(e) for x in e]
    weights = torch.tensor(weights)
    spread = weights.view(-1, m).max(-1).values - weights.view(-1, m).min(-1).values
    assert (spread > 0.005).all()  # far above the tolerance: weights from another question could not pass
    expected = weights - 1 / m if estimator == "dro_baseline" else weights
    torch.testing.assert_close(out["advantages"], expected.float(), atol=1e-5, rtol=0)
    coef = {"weighted": weights, "uniform": torch.full_like(weights, 1 / m),  # the paper; plain SFT on each sample
            "best": torch.nn.functional.one_hot(weights.view(-1, m).argmax(-1), m).flatten().to(weights.dtype)}
    torch.testing.assert_close(out["gen_coef"], coef[generator_update].float(), atol=1e-5, rtol=0)


def test_reward_advantages_use_each_rows_weighted_rewards_and_decode_answers_only_when_needed(
    tmp_path, demo_rows, word_tok, monkeypatch
):
    """`reinforce` on 0.5 · log p(y | x, d_z) + 2 · p(y | x, d_z): each row's own rewards, weighted and summed."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, estimator="reinforce", generator_scoring="separate",
                           reward_funcs=["log_likelihood", "likelihood"], reward_weights=[0.5, 2.0])
    scored = Spy(monkeypatch, trainer_module, "batch_answer_logprobs")
    decoded = Spy(monkeypatch, trainer_module, "generate_answers")
    out = trainer._generate_and_score_completions(generation_batch(trainer, 2))
    (_, answer_logp), = scored.calls
    torch.testing.assert_close(out["advantages"], 0.5 * answer_logp + 2.0 * answer_logp.exp(), atol=1e-5, rtol=0)
    assert not decoded.calls  # neither reward reads a generated answer: no greedy decoding was paid for

    for scale_rewards in ("group", "none"):  # grpo: (r − mean) / (std + 1e-4) per question, or only centred
        trainer = make_trainer(tmp_path / scale_rewards, demo_rows, word_tok, estimator="grpo",
                               scale_rewards=scale_rewards, generator_scoring="separate")
        out = trainer._generate_and_score_completions(generation_batch(trainer, 2))
        rewards = scored.calls[-1][1].view(2, -1)
        expected = rewards - rewards.mean(-1, keepdim=True)
        if scale_rewards == "group":
            expected = expected / (rewards.std(-1, keepdim=True) + 1e-4)
        torch.testing.assert_close(out["advantages"], expected.reshape(-1), atol=1e-4, rtol=1e-4)

    trainer = make_trainer(tmp_path / "em", demo_rows, word_tok, estimator="reinforce", reward_funcs=["answer_em"],
                           generator_scoring="separate")
    out = trainer._generate_and_score_completions(generation_batch(trainer, 2))
    assert len(decoded.calls) == 1 and set(out["advantages"].tolist()) <= {0.0, 1.0}


def test_a_nonfinite_loss_becomes_a_zero_that_keeps_the_graph(tmp_path, demo_rows, word_tok, monkeypatch):
    """A detached zero would skip this process's backward, and with it DDP's gradient all-reduce: the other processes
    would wait forever (tests/test_distributed.py runs that case). The zero stays attached to the forward."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok)
    out = trainer._generate_and_score_completions(generation_batch(trainer, 2))  # the loss scores the generator
    for count, bad in enumerate((float("nan"), float("inf")), 1):
        monkeypatch.setattr(trainer_module.E, "selector_loss", lambda adv, logp, m: logp.sum() * 0 + bad)
        loss = trainer._compute_loss(trainer.model, out)
        assert loss.item() == 0.0 and loss.grad_fn is not None and trainer._nonfinite_losses == count


def weighted_objectives(trainer: DROTrainer, out: dict) -> tuple[float, float]:
    """(Σ A_i log p(z_i | x), Σ c_i log p(y | x, d_{z_i})) of a generation batch under the current parameters."""
    logp, answer = teacher_forced(trainer, out)
    return (out["advantages"] * logp).sum().item(), (out["gen_coef"] * answer).sum().item()


@pytest.mark.parametrize("estimator", ["dro", "dro_baseline"])
def test_one_step_raises_the_weighted_log_probabilities(tmp_path, demo_rows, word_tok, estimator):
    """One small SGD step is a descent step on both losses: Σ w̃ log p(z) and Σ w̃ log p(y | z) rise.
    Catches a flipped sign in either loss."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, estimator=estimator, optim="sgd", learning_rate=1e-3,
                           generator_learning_rate=1e-3, weight_decay=0.0, max_steps=1, max_grad_norm=1e6,
                           generator_scoring="separate")
    sharpen(trainer.generator)
    seen = []
    estep = trainer._generate_and_score_completions

    def capture(inputs):
        out = estep(inputs)
        seen.append((out, weighted_objectives(trainer, out)))
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    (out, before), = seen
    after = weighted_objectives(trainer, out)
    assert after[0] > before[0] + 1e-5 and after[1] > before[1] + 1e-5


def test_gradient_accumulation_gives_the_update_of_one_big_batch(tmp_path, demo_rows, word_tok):
    """8 rows in one micro-batch, or 2 × 4 accumulated: the same E-step samples and, with SGD (whose step is
    proportional to the gradient, unlike Adam's first step), the same parameters. Catches a missing division by the
    accumulation steps."""
    runs = []
    for accumulation, rows in ((1, 8), (2, 4)):
        trainer = make_trainer(tmp_path / str(accumulation), demo_rows, word_tok, optim="sgd", max_steps=1,
                               per_device_train_batch_size=rows, gradient_accumulation_steps=accumulation,
                               max_grad_norm=1e6)
        before = snapshot(trainer.model)
        trainer.train()
        assert changed(before, trainer.model) == set(before)
        runs.append((snapshot(trainer.model), snapshot(trainer.generator)))
    for one, accumulated in zip(*runs):
        for name, value in one.items():
            torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("shared", [False, True], ids=["separate_models", "shared_base_checkpointing"])
def test_scoring_the_generator_in_the_loss_gives_the_reference_update(tmp_path, demo_rows, word_tok, monkeypatch,
                                                                     shared):
    """``generator_scoring: in_loss`` (what ``auto`` picks here) against ``separate`` (a no-grad scoring pass before
    the loss, the reference): two SGD steps over two accumulated micro-batches each give the same losses, metrics and
    parameters, and the in-loss run never calls the separate scorer. Catches: weights computed over rows of different
    questions (a micro-batch cut across a group, or shuffled), a row's log-likelihood attached to another row,
    gradients flowing through the weights (they must be detached), an E-step metric logged from the wrong rows, the
    two paths drawing different random numbers (a run that differs from its second step on)."""
    runs = {}
    for scoring in ("separate", "in_loss"):
        torch.manual_seed(0)
        args = tiny_args(tmp_path / scoring, generator_scoring=scoring, optim="sgd", max_steps=2, max_grad_norm=1e6,
                         per_device_train_batch_size=8, gradient_accumulation_steps=2, share_base_model=shared,
                         gradient_checkpointing=shared)
        if shared:
            lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                              task_type="CAUSAL_LM")
            models = dict(model=shared_base_model(make_model(word_tok), lora, lora))
        else:
            models = dict(model=make_model(word_tok), generator=make_model(word_tok, seed=100))
        trainer = DROTrainer(**models, args=args, train_dataset=as_dataset(demo_rows), processing_class=word_tok,
                             generator_processing_class=word_tok)
        sharpen(trainer.accelerator.unwrap_model(trainer.generator))  # weights far from uniform
        scored = Spy(monkeypatch, trainer_module, "batch_answer_logprobs")
        trainer.train()
        assert trainer.args.scores_in_loss == (scoring == "in_loss")
        assert bool(scored.calls) == (scoring == "separate")
        logged = [h for h in trainer.state.log_history if "selector/loss" in h]
        runs[scoring] = logged, snapshot(trainer.model), snapshot(trainer.generator)
    (ref_logs, *ref_models), (logs, *models) = runs["separate"], runs["in_loss"]
    assert len(logs) == len(ref_logs) == 2  # the second step samples alike too: both paths draw the same numbers
    for log, ref_log in zip(logs, ref_logs):
        for key in ("selector/loss", "generator/loss", "reward", "weights/ess", "weights/entropy",
                    "generator/answer_logprob", "selector/ranking_logprob", "selector/support_recall"):
            assert log[key] == pytest.approx(ref_log[key], rel=1e-5, abs=1e-6), key
        assert ref_log["reward_std"] > 0.01  # a question's samples score differently: misassigned weights would show
    for reference, model in zip(ref_models, models):
        for name, value in reference.items():
            torch.testing.assert_close(model[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_in_loss_scoring_is_refused_where_it_cannot_hold():
    base = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
                num_generations=4)
    for overrides, reason in ((dict(generator_update="none"), "generator_update"),
                              (dict(disable_dropout=False), "disable_dropout"),
                              (dict(per_device_train_batch_size=6, num_generations=3,
                                    gradient_accumulation_steps=2, steps_per_generation=2), None),
                              (dict(per_device_train_batch_size=2, gradient_accumulation_steps=2), "whole question")):
        config = {**base, **overrides}
        assert not DROConfig(**config).scores_in_loss or reason is None  # "auto" falls back to the reference
        if reason is None:
            assert DROConfig(**config, generator_scoring="in_loss").scores_in_loss
            continue
        with pytest.raises(ValueError, match=f"generator_scoring='in_loss' needs.*{reason}"):
            DROConfig(**config, generator_scoring="in_loss")
    assert not DROConfig(**base, generator_scoring="separate").scores_in_loss


@pytest.mark.parametrize("generator_scoring", ["auto", "separate"])
def test_a_generation_batch_spanning_two_optimizer_steps_is_refused(generator_scoring):
    """With separate scoring, steps_per_generation 2 and gradient_accumulation_steps 1 were accepted: the batch's
    second half trained after an optimizer step on rankings and weights of the old parameters (an outside review
    measured 0.71 nats between its sampled and its loss log-probs), with no correction."""
    base = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
                num_generations=4, generator_scoring=generator_scoring)
    for ga, spg in ((1, 2), (2, 4), (2, 3)):
        with pytest.raises(ValueError, match=rf"steps_per_generation \({spg}\) must divide gradient_accumulation_"
                                             rf"steps \({ga}\)"):
            DROConfig(**base, gradient_accumulation_steps=ga, steps_per_generation=spg)
    with pytest.raises(ValueError, match=r"steps_per_generation \(2\) must divide"):  # set through its other name
        DROConfig(**base, generation_batch_size=8)
    assert DROConfig(**base, gradient_accumulation_steps=4, steps_per_generation=2).steps_per_generation == 2


def test_shuffled_candidates_one_order_per_group_labels_kept_and_read_by_both_models(tmp_path, demo_rows, word_tok):
    """shuffle_candidates: each question's m samples share one order (the weights compare them), its gold labels
    move with the passages (or support recall scores the wrong ones), the selector's prompt and the generator's
    picks use that order, a new step draws a new one, and evaluation keeps the retrieval order."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, shuffle_candidates=True)
    m, questions = trainer.num_generations, 6
    trainer.model.train()
    batch = generation_batch(trainer, questions)
    out = trainer._generate_and_score_completions(batch)
    orders = []
    for q, original in enumerate(batch[::m]):
        group = out["rows"][q * m:(q + 1) * m]
        shown = group[0]["passages"]
        assert all(r["passages"] == shown for r in group)
        label = {p["text"]: g for p, g in zip(original["passages"], original["gold"])}
        assert sorted(p["text"] for p in shown) == sorted(label)
        assert group[0]["gold"] == [label[p["text"]] for p in shown]
        prompt = out["prompt_ids"][q * m][out["prompt_mask"][q * m].bool()].tolist()
        assert prompt == trainer.selector_prompt(word_tok, original["question"], shown)
        for i, r in enumerate(group, q * m):
            read = out["gen_prompt_ids"][i][out["gen_prompt_mask"][i].bool()].tolist()
            assert read == trainer.generator_prompt(word_tok, r["question"], [shown[j] for j in r["picks"]])
        orders.append([p["text"] for p in shown])
    assert any(o != [p["text"] for p in r["passages"]] for o, r in zip(orders, batch[::m]))
    trainer.state.global_step = 1
    again = trainer._generate_and_score_completions(batch)
    assert [[p["text"] for p in r["passages"]] for r in again["rows"][::m]] != orders
    trainer.model.eval()
    evaluated = trainer._generate_and_score_completions(batch)
    assert [r["passages"] for r in evaluated["rows"]] == [r["passages"] for r in batch]


def test_the_entropy_bonus_raises_the_selector_s_entropy_where_the_advantages_vanish(tmp_path, demo_rows, word_tok):
    """entropy_coef: with every advantage 0 (as when a question's m samples agree) the selector still gets a
    gradient, and a step along it makes the policy less peaked — a wrong sign would sharpen it; the bonus is
    logged as selector/entropy. A frozen selector has nothing to regularise: refused."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, entropy_coef=0.5, generator_update="none",
                           generator_scoring="separate")
    trainer.model.train()
    out = trainer._generate_and_score_completions(generation_batch(trainer, 3))
    out["advantages"] = torch.zeros_like(out["advantages"])
    args = ("packed", trainer.model, out["prompt_ids"], out["prompt_mask"], out["group"], out["completion_ids"],
            out["completion_mask"], out["allowed"], trainer.temperature, word_tok.pad_token_id)

    def entropy() -> float:
        with torch.no_grad():
            return selector_logprobs(*args, entropy=True)[1].mean().item()

    before = entropy()
    loss = trainer._compute_loss(trainer.model, out)
    assert loss.item() == pytest.approx(-0.5 * before, rel=1e-4)
    loss.backward()
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    assert params and any(p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p -= 0.05 * p.grad
    assert entropy() > before
    assert trainer._metrics["train"]["selector/entropy"] == [pytest.approx(before, rel=1e-4)]
    with pytest.raises(ValueError, match="entropy_coef=0.1 is a bonus for the selector"):
        tiny_args(tmp_path, entropy_coef=0.1, freeze_selector=True)


@pytest.mark.parametrize("scoring", ["separate", "in_loss"])
def test_without_replacement_at_m_equal_n_weighs_by_the_exact_posterior(tmp_path, demo_rows, word_tok, monkeypatch,
                                                                        scoring):
    """sample_without_replacement, K = 1, m = N = 4: each question's four samples are its four candidates, the
    generator's weights are the posterior p(z | x, y) ∝ p(z | x) p(y | x, d_z) and dro_baseline's advantages are
    posterior − prior (recomputed with the shipped scorers, outside the trainer) — whether the generator is scored
    before the loss or in it. A question with 3 candidates: those 3, and a spare sample of weight 0. Catches the
    sampler's ratios dropped on the way to the weights."""
    rows = [dict(r) for r in demo_rows]
    rows[1] = {**rows[1], "passages": rows[1]["passages"][:3], "gold": rows[1]["gold"][:3]}
    trainer = make_trainer(tmp_path, rows, word_tok, num_docs_selected=1, estimator="dro_baseline",
                           sample_without_replacement=True, generator_scoring=scoring)
    sharpen(trainer.generator)
    sharpen(trainer.model)
    trainer.model.train()
    m = trainer.num_generations
    out = trainer._generate_and_score_completions(generation_batch(trainer, 3))
    for q, n in enumerate([4, 3, 4]):
        assert sorted(r["picks"][0] for r in out["rows"][q * m:q * m + n]) == list(range(n))
    if scoring == "in_loss":
        assert "advantages" not in out
        weighed = Spy(monkeypatch, trainer, "_weigh")
        trainer._compute_loss(trainer.model, out)  # weighs the rows with its own generator forward
        (_, (out["advantages"], out["gen_coef"])), = weighed.calls
    prior, answer = (x.view(-1, m) for x in teacher_forced(trainer, out))
    prior[1, 3] = float("-inf")  # the spare sample
    posterior = torch.softmax(prior + answer, -1)
    assert (posterior - torch.softmax(answer, -1)).abs().max() > 0.02  # the prior matters: the test can fail
    torch.testing.assert_close(out["gen_coef"].view(-1, m), posterior, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["advantages"].view(-1, m), posterior - prior.exp(), atol=1e-4, rtol=0)
    # The logged metrics describe the policy, not the proposal (which reads every candidate once)
    recall = torch.tensor([support_recall(r["picks"], r["gold"]) for r in out["rows"]]).view(-1, m)
    expected = (prior.exp() * recall).sum(-1).mean().item()
    assert abs(expected - recall.mean().item()) > 0.01
    assert trainer._metrics["train"]["selector/support_recall"][-1] == pytest.approx(expected, abs=1e-4)
    logp = teacher_forced(trainer, out)[0].view(-1, m)
    assert trainer._metrics["train"]["selector/ranking_logprob"][-1] == pytest.approx(
        (prior.exp() * logp).sum(-1).mean().item(), abs=1e-4)
    spread = [answer[0].std(), answer[1, :3].std(), answer[2].std()]  # the reward: log p(y | x, d_z); no spare
    assert trainer._metrics["train"]["reward_std"][-1] == pytest.approx(torch.stack(spread).mean().item(), rel=1e-4)


def test_without_replacement_below_n_weighs_by_the_normalised_ratios(tmp_path, demo_rows, word_tok, monkeypatch):
    """m = 2 of N = 4 (K = 1): the ratios ρ_i = p_i / q_i no longer sum to one, so the weights and dro_baseline's
    subtracted proposal weights must use their normalisation ρ̃ — ρ itself in place of ρ̃ passed every test at m = N,
    where ρ = p. The recorded ratios are checked against the policy's teacher-forced p_i: both samples of a question
    imply one threshold κ (q_i = 1 − exp(−p_i e^−κ))."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, num_docs_selected=1, num_generations=2,
                           estimator="dro_baseline", sample_without_replacement=True, generator_scoring="separate")
    sharpen(trainer.generator)
    sharpen(trainer.model)
    trainer.model.train()
    m = trainer.num_generations
    weighed = Spy(monkeypatch, trainer_module.E, "importance_weights")
    out = trainer._generate_and_score_completions(generation_batch(trainer, 4))
    (_, log_ratio), _ = weighed.calls[0]
    prior, answer = (x.view(-1, m) for x in teacher_forced(trainer, out))
    assert all(len({r["picks"][0] for r in out["rows"][q * m:(q + 1) * m]}) == m for q in range(4))  # distinct
    assert (log_ratio.exp().sum(-1) - 1).abs().max() > 0.05  # ρ and ρ̃ differ: the test can tell them apart
    kappa = prior - torch.log(-torch.log1p(-torch.exp(prior - log_ratio)))  # from q_i = p_i / ρ_i
    torch.testing.assert_close(kappa[:, 0], kappa[:, 1], atol=1e-3, rtol=0)
    weights = torch.softmax(answer + log_ratio, -1)
    torch.testing.assert_close(out["gen_coef"].view(-1, m), weights, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["advantages"].view(-1, m), weights - torch.softmax(log_ratio, -1), atol=1e-4,
                               rtol=0)


def test_without_replacement_the_entropy_bonus_is_the_policys_expected_entropy(tmp_path, demo_rows, word_tok):
    """K = 2, m = N = 4 without replacement: each question's rows start with its four candidates once each, so the
    plain mean of their entropies weighs each first pick 1/4 where the policy weighs it p(first) — the bonus and its
    metric count each row by ρ̃ (an outside review found the plain mean)."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, estimator="dro", sample_without_replacement=True,
                           generator_scoring="separate", entropy_coef=0.1)
    with torch.no_grad():  # a peaked selector, whose entropy after the first pick depends on that pick
        trainer.model.lm_head.weight.mul_(8.0)
    trainer.model.train()
    m = trainer.num_generations
    out = trainer._generate_and_score_completions(generation_batch(trainer, 2))
    trainer._compute_loss(trainer.model, out)
    with torch.no_grad():
        _, entropy = ranking_logprobs(trainer.model, out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                      out["completion_mask"], out["allowed"], trainer.temperature, entropy=True)
    share = torch.softmax(out["sample_log_ratio"].view(-1, m), -1).reshape(-1) * m  # ρ̃ = p(first) at m = N
    expected = (entropy * share).mean().item()
    assert abs(expected - entropy.mean().item()) > 0.01  # the plain mean differs: the test can fail
    assert trainer._metrics["train"]["selector/entropy"][-1] == pytest.approx(expected, abs=1e-4)


def test_without_replacement_trains_with_the_ratios_through_micro_batches(tmp_path, demo_rows, word_tok, monkeypatch):
    """A real step (K = 2, generator scored in the loss, two micro-batches per generation batch): every weighing sees
    the ratios of its own rows, and the selector moves."""
    trainer = make_trainer(tmp_path, demo_rows, word_tok, sample_without_replacement=True, max_steps=1,
                           gradient_accumulation_steps=2)
    weights = Spy(monkeypatch, trainer_module.E, "importance_weights")
    sel = snapshot(trainer.model)
    trainer.train()
    assert len(weights.calls) == 2 and all(args[1] is not None and args[1].shape == args[0].shape
                                            for args, _ in weights.calls)
    assert changed(sel, trainer.model)


def test_without_replacement_is_refused_with_the_reward_estimators(tmp_path):
    """Only the DRO estimators are corrected for it."""
    with pytest.raises(ValueError, match="estimator='rloo' assumes samples drawn with replacement"):
        tiny_args(tmp_path, sample_without_replacement=True, estimator="rloo")


# ------------------------------------------------------------------------------------------------------------------
# 2. fp16: the grad scaler unscales the one optimizer once
# ------------------------------------------------------------------------------------------------------------------


def test_fp16_grad_scaler_unscales_once_and_clips_each_model(tmp_path, demo_rows, word_tok, monkeypatch):
    """accelerate gives no GradScaler on CPU, so the test installs torch's CPU GradScaler where accelerate would
    (fp16 mixed precision, native AMP) and trains: one unscale per step, and the logged norms are the true ones."""
    logs = {}
    from dro_rl import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "refuse_fp16_on_cpu", lambda *_: None)  # a CPU stands in for the GPU here
    for scaled in (False, True):
        trainer = make_trainer(tmp_path / str(scaled), demo_rows, word_tok, fp16=scaled, max_steps=1)
        if scaled:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            trainer.accelerator.native_amp = True
        sel, gen = snapshot(trainer.model), snapshot(trainer.generator)
        trainer.train()
        assert changed(sel, trainer.model) and changed(gen, trainer.generator)
        logs[scaled] = trainer.state.log_history[0]
    for key in ("grad_norm", "generator/grad_norm"):  # unscaled, not 1024 × larger (fp16 autocast: ~1e-3 apart)
        assert logs[True][key] == pytest.approx(logs[False][key], rel=0.05), key


# ------------------------------------------------------------------------------------------------------------------
# 4. load_best_model_at_end restores both models
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_base"])
def test_load_best_model_at_end_restores_both_models_from_the_best_checkpoint(
    tmp_path, demo_rows, word_tok, shared
):
    trainer = lora_trainer(
        tmp_path, demo_rows, word_tok, shared, demo_rows[:4], max_steps=3, eval_strategy="steps", eval_steps=1,
        save_strategy="steps", save_steps=1, load_best_model_at_end=True, metric_for_best_model="answer_em",
    )
    scores = {1: 0.2, 2: 0.9, 3: 0.1}  # scripted, so that the best checkpoint is not the last one

    def scripted_evaluate(eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        return {f"{metric_key_prefix}_answer_em": scores[trainer.state.global_step]}

    trainer.evaluate = scripted_evaluate
    trainer.train()
    best, last = (tmp_path / "out" / f"checkpoint-{step}" for step in (2, 3))
    assert trainer.state.best_model_checkpoint == str(best)
    for name in (SELECTOR, GENERATOR):
        model = trainer.model if shared or name == SELECTOR else trainer.generator
        adapter = name if shared else "default"
        current = get_peft_model_state_dict(model, adapter_name=adapter)
        saved, final = (load_file(str(c / name / "adapter_model.safetensors")) for c in (best, last))
        assert set(saved) == set(current)
        for key, value in saved.items():
            torch.testing.assert_close(current[key], value, atol=0, rtol=0, msg=f"{name} {key}")
        assert any(not torch.equal(final[key], saved[key]) for key in saved), name  # the last one was different


# ------------------------------------------------------------------------------------------------------------------
# 6, 7, 8: DeepSpeed refused, one weight-decay rule, m = 1 refused when the selector trains
# ------------------------------------------------------------------------------------------------------------------


def test_deepspeed_is_refused_at_start_up(tmp_path, demo_rows, word_tok, monkeypatch):
    """accelerate launch with a DeepSpeed config sets the process state's distributed type; deepspeed itself is not
    installed here, so the test sets that type where accelerate would."""
    args = tiny_args(tmp_path)
    monkeypatch.setattr(args.distributed_state, "distributed_type", DistributedType.DEEPSPEED)
    for shared in (False, True):
        models = dict(model=make_model(word_tok), generator=make_model(word_tok, seed=1))
        if shared:
            args.share_base_model = True
            models = dict(model=shared_base_model(make_model(word_tok), dropout_lora(), dropout_lora()))
        with pytest.raises(ValueError, match="DeepSpeed is not supported.*ddp.yaml"):
            DROTrainer(**models, args=args, train_dataset=as_dataset(demo_rows), processing_class=word_tok,
                       generator_processing_class=word_tok)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_base"])
def test_generator_weight_decay_follows_the_selectors_rule(tmp_path, demo_rows, word_tok, shared):
    """Trainer.get_decay_parameter_names decides for both models: no decay on norm weights and biases."""
    if shared:
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"], task_type="CAUSAL_LM")
        trainer = DROTrainer(model=shared_base_model(make_model(word_tok), lora, lora),
                             args=tiny_args(tmp_path, share_base_model=True, generator_learning_rate=3e-3),
                             train_dataset=as_dataset(demo_rows), processing_class=word_tok)
    else:
        trainer = make_trainer(tmp_path, demo_rows, word_tok, generator_learning_rate=3e-3)
    optimizer = trainer.create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    decay = set(trainer.get_decay_parameter_names(trainer.generator))
    generator_params = [(n, p) for n, p in trainer.generator.named_parameters()
                        if p.requires_grad and (not shared or f".{GENERATOR}." in n)]
    assert {n in decay for n, _ in generator_params} == {True, False}  # both kinds are present
    for name, p in generator_params:
        assert group_of[id(p)]["weight_decay"] == (0.01 if name in decay else 0.0), name
        assert group_of[id(p)]["lr"] == 3e-3, name


def test_one_sample_per_question_is_refused_when_the_selector_trains():
    common = dict(output_dir="x", per_device_train_batch_size=4, num_generations=1, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="m = 1.*docs/estimator.md"):
        DROConfig(**common)
    assert DROConfig(**common, freeze_selector=True).num_generations == 1  # generator-only training is fine


# ------------------------------------------------------------------------------------------------------------------
# Issue 15, item 11: an update that overflows the parameters stops training with a message
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        # SGD at lr 1e30: finite weights whose activations overflow; every later gradient is NaN (without the guard on
        # every step the NaN update went through and the next sampling step crashed inside torch.multinomial)
        (dict(learning_rate=1e30, generator_learning_rate=1e30, max_grad_norm=0.0),
         r"10 optimizer steps in a row had a non-finite loss or gradient.*learning_rate \(1e\+30\)"),
        # a finite gradient times a huge learning rate: the generator's weights themselves overflow
        (dict(generator_learning_rate=1e36, generator_loss_coef=1e4, max_grad_norm=1e9),
         r"the generator's parameters are non-finite after optimizer step 1.*generator_learning_rate \(1e\+36\)"),
    ],
    ids=["activations_overflow", "parameters_overflow"],
)
def test_an_overflowing_update_stops_training_with_a_clear_message(tmp_path, demo_rows, word_tok, overrides, message):
    trainer = make_trainer(tmp_path, demo_rows, word_tok, optim="sgd", max_steps=30, **overrides)
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()


def test_non_finite_selector_logits_stop_sampling_with_a_clear_message(tmp_path, demo_rows, word_tok):
    trainer = make_trainer(tmp_path, demo_rows, word_tok)
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"logits are non-finite.*after optimizer step 0.*learning_rate"):
        trainer._generate_and_score_completions(generation_batch(trainer, 1))
