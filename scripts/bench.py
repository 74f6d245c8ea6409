"""Time one DRO step, ours against a naive reference doing the same math, on identical models and data.

    python scripts/bench.py --preset cpu-tiny            # N = 20 passages of ~100 words, K = 5, m = 4

Naive, the way the released DRO scripts run it: the N-passage prompt is prefilled once per sample (m times per
question) for sampling, and the selector loss runs a full forward and backward per sampled row. Ours: one prefill per
question shared by its m samples (`sample_rankings`), and one prompt forward/backward per question in the loss
(`ranking_logprobs_shared`). Generator scoring and loss are the same code in both. The script checks that both
compute the same loss, then prints step time, questions/s, tokens/s and the ratio naive/ours.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from dro_rl import estimators as E
from dro_rl.demo import WorldConfig, demo_tokenizer, make_split, tiny_llama
from dro_rl.generator import GeneratorPrompt, batch_answer_logprobs, target_logprobs
from dro_rl.selector import (
    IdGrammar,
    SelectorPrompt,
    left_pad,
    ranking_logprobs,
    ranking_logprobs_shared,
    right_pad,
    sample_rankings,
)


@dataclass
class BenchArguments:
    preset: str = field(default="cpu-tiny", metadata={"help": "cpu-tiny (GPU presets: open issue)."})
    questions: int = field(default=4, metadata={"help": "Questions per step (Q)."})
    repeats: int = field(default=3, metadata={"help": "Timed steps per path (after one warm-up step)."})
    passage_words: int = field(default=100, metadata={"help": "Words per passage."})


def make_batch(args: BenchArguments, n: int = 20, k: int = 5, m: int = 4):
    rng = random.Random(0)
    rows = make_split(WorldConfig(num_candidates=n, seed=0), args.questions, 1)
    words = sorted({w for r in rows for p in r["passages"] for w in p["text"].split()})
    for r in rows:  # pad every fact to ~100 words so the prompt has the paper's shape (N = 20 x ~100 words)
        for p in r["passages"]:
            p["text"] += " " + " ".join(rng.choice(words) for _ in range(args.passage_words - len(p["text"].split())))
    tok = demo_tokenizer(rows, n, k)
    torch.manual_seed(0)
    selector = tiny_llama(len(tok), 128, 2, 4, 0, tok.pad_token_id, tok.eos_token_id)
    generator = tiny_llama(len(tok), 128, 2, 4, 1, tok.pad_token_id, tok.eos_token_id)
    return rows, tok, selector, generator, k, m


def step(rows, tok, selector, generator, k, m, shared: bool, seed: int) -> tuple[float, int]:
    """One DRO step (E-step + both losses + backward); returns (loss, prompt tokens processed)."""
    grammar = IdGrammar(tok, len(rows[0]["passages"]))
    sprompt, gprompt = SelectorPrompt(k, 128, False), GeneratorPrompt(128, False)
    prompts = [sprompt(tok, r["question"], r["passages"]) for r in rows]
    sizes = [len(r["passages"]) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    if shared:
        s = sample_rankings(selector, grammar, prompts, sizes, k, m, pad_token_id=tok.pad_token_id, generator=gen)
    else:  # every sample prefills its own copy of the prompt
        s = sample_rankings(selector, grammar, [p for p in prompts for _ in range(m)], [n for n in sizes for _ in
                            range(m)], k, 1, pad_token_id=tok.pad_token_id, generator=gen)
    rows_m = [r for r in rows for _ in range(m)]
    g_prompts = [gprompt(tok, r["question"], [r["passages"][i] for i in p]) for r, p in zip(rows_m, s.picks)]
    targets = [gprompt.target(tok, r["answers"][0]) for r in rows_m]
    answer_logp = batch_answer_logprobs(generator, g_prompts, targets, tok.pad_token_id)
    weights = E.importance_weights(answer_logp.view(-1, m))
    adv = E.advantages("dro_baseline", weights, answer_logp.view(-1, m)).reshape(-1)
    p_ids, p_mask = left_pad([p for p in prompts for _ in range(m)], tok.pad_token_id)
    completion = (s.completion_ids, s.completion_mask, s.allowed)
    if shared:
        group = torch.arange(len(rows)).repeat_interleave(m)
        logp = ranking_logprobs_shared(selector, p_ids, p_mask, group, *completion)
    else:
        logp = ranking_logprobs(selector, p_ids, p_mask, *completion)
    g_ids, g_mask = left_pad(g_prompts, tok.pad_token_id)
    y_ids, y_mask = right_pad(targets, tok.pad_token_id)
    gen_logp = target_logprobs(generator, g_ids, g_mask, y_ids, y_mask).sum(-1)
    loss = E.selector_loss(adv, logp, m) + E.generator_loss(weights.reshape(-1), gen_logp, m)
    loss.backward()
    selector.zero_grad(set_to_none=True)
    generator.zero_grad(set_to_none=True)
    return loss.item(), sum(len(p) for p in prompts)


def main(args: BenchArguments) -> dict:
    torch.set_num_threads(1)
    rows, tok, selector, generator, k, m = make_batch(args)
    losses = {name: step(rows, tok, selector, generator, k, m, name == "ours", seed=1)[0] for name in ("naive", "ours")}
    if abs(losses["naive"] - losses["ours"]) > 1e-4 * max(1.0, abs(losses["naive"])):
        raise SystemExit(f"the two paths disagree: {losses}")
    times: dict[str, list[float]] = {"naive": [], "ours": []}
    tokens = 0
    for r in range(args.repeats):
        for name in ("naive", "ours"):  # interleaved, so drift in machine load hits both alike
            start = time.perf_counter()
            _, tokens = step(rows, tok, selector, generator, k, m, name == "ours", seed=2 + r)
            times[name].append(time.perf_counter() - start)
    out = {"loss": losses}
    print(f"preset {args.preset}: Q = {args.questions} questions, N = 20 x ~{args.passage_words} words, K = {k}, "
          f"m = {m}; prompt tokens per question ≈ {tokens // len(rows)}; loss naive {losses['naive']:.6f} "
          f"ours {losses['ours']:.6f}")
    for name, ts in times.items():
        t = statistics.median(ts)
        out[name] = t
        print(f"  {name:5s}  step {t:7.2f} s   {len(rows) / t:6.2f} questions/s   {tokens * m / t:8.0f} prompt tokens/s")
    print(f"  ratio naive/ours (median step time): {out['naive'] / out['ours']:.2f}x")
    return out


if __name__ == "__main__":
    main(*TrlParser((BenchArguments,)).parse_args_and_config())
