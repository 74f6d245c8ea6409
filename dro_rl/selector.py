"""The selector: a list-wise policy that writes an ordered pick of K of N passage ids, ``[3] > [1] > [7]``.

Three pieces live here, in the order a step uses them:

1. the list-wise prompt (RankGPT-style), with a per-passage token budget so that all N candidates always fit;
2. the id grammar and the constrained sampler (§5.1–5.2): every sample is K distinct in-range ids by construction,
   each id is written with fixed token sequences, and the same masks that sampled a token score it in the loss;
3. a lenient parser with rank_llm-style repair, for free-form rankings written by unconstrained models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from .estimators import priority_sample
from .packed_attention import ATTENTION, left_padded, packing, use_packed_attention

INSTRUCTION = (
    "I will give you {n} passages, each numbered [1] to [{n}], and a question. Pick the {k} passages that best help "
    "answer the question, most useful first."
)
OUTPUT_FORMAT = "Answer with {k} distinct identifiers in order, like {example}, and nothing else."
SEPARATOR = " > "


def format_id(i: int) -> str:
    """Display form of the 0-based passage index ``i``: ``[i + 1]``."""
    return f"[{i + 1}]"


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """Keep the first ``max_tokens`` tokens of ``text`` (by this tokenizer) so every passage fits its budget."""
    if max_tokens <= 0:
        return ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def passage_text(passage: dict) -> str:
    """``title: text`` when a title exists, else the text alone."""
    title, text = (passage.get("title") or "").strip(), (passage.get("text") or "").strip()
    return f"{title}: {text}" if title else text


def apply_template(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    """Token ids of a user turn (chat template with the generation prompt) or of the plain text.

    One function for the selector and the generator so sampling, training and evaluation see one prompt (§5.3).
    """
    if use_chat_template and tokenizer.chat_template is not None:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_to_length(build, n: int, budget: int, max_length: int | None, what: str) -> list[int]:
    """``build(b)`` for the largest per-passage budget b <= ``budget`` whose prompt fits ``max_length`` tokens.

    The budget is shared evenly by the n passages, so every passage stays in the prompt; too small a
    ``max_length`` for the fixed text is an error, never a silently dropped passage.
    """
    if max_length is None:
        return build(budget)
    overhead = len(build(0))
    fitted = min(budget, (max_length - overhead) // max(n, 1))  # if every passage took exactly its budget
    while fitted >= 1:
        ids = build(fitted)
        if len(ids) <= max_length:
            break
        fitted -= max(1, (len(ids) - max_length) // max(n, 1))
    else:
        raise ValueError(
            f"the {what} prompt needs {overhead} tokens before any passage text, leaving no room for {n} passages in "
            f"max length {max_length}"
        )
    # A cut passage can take fewer tokens than its budget (tokens re-merge at its edges): grow while it still fits.
    while fitted < budget and len(larger := build(fitted + 1)) <= max_length:
        fitted, ids = fitted + 1, larger
    return ids


@dataclass(frozen=True)
class SelectorPrompt:
    """RankGPT-style list-wise prompt, one definition for sampling, training and evaluation.

    Layout: instruction, question, the N passages each prefixed ``[i]``, the question again, the output-format line.
    Each passage is cut to ``max_passage_tokens`` tokens — fewer when ``max_prompt_length`` requires — so that all N
    candidates stay in the prompt. With ``repeat_ids`` the id also follows its passage, so a causal model reads the
    id after the content it names (small models learn to pick ids much faster that way; see docs/demo.md).
    """

    k: int
    max_passage_tokens: int = 128
    use_chat_template: bool = True
    repeat_ids: bool = False
    max_prompt_length: int | None = None

    def __call__(self, tokenizer, question: str, passages: Sequence[dict]) -> list[int]:
        n = len(passages)
        k = min(self.k, n)

        def build(budget: int) -> list[int]:
            lines = [INSTRUCTION.format(n=n, k=k), f"Question: {question}"]
            for i, passage in enumerate(passages):
                text = truncate_to_tokens(tokenizer, passage_text(passage), budget)
                lines.append(f"{format_id(i)} {text} {format_id(i)}" if self.repeat_ids else f"{format_id(i)} {text}")
            example = SEPARATOR.join(format_id(i) for i in range(k))
            lines += [f"Question: {question}", OUTPUT_FORMAT.format(k=k, example=example)]
            return apply_template(tokenizer, "\n".join(lines), self.use_chat_template)

        return fit_to_length(build, n, self.max_passage_tokens, self.max_prompt_length, "selector")


# ----------------------------------------------------------------------------------------------------------------
# The id grammar: canonical token sequences and the allowed next tokens of a partial ranking (README)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Where one sample is in the grammar: ids picked so far and the tokens of the id being written."""

    picked: list[int]
    prefix: tuple[int, ...] = ()
    done: bool = False


class IdGrammar:
    """Token-level grammar of ``[a] > [b] > ... <eos>`` with K distinct ids among the first ``n`` passages.

    The first id is written with the tokens of ``"[i]"``, every later one with those of ``" > [i]"``: fixed token
    sequences, tokenised once, used for sampling, scoring and training alike and never re-tokenised from decoded
    text. Works for any tokenizer, including ids that take several tokens.
    """

    def __init__(self, tokenizer, max_candidates: int, eos_token_id: int | None = None):
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the selector tokenizer has no eos_token_id; set one (it ends every ranking)")

        def encode(s: str) -> tuple[int, ...]:
            return tuple(tokenizer(s, add_special_tokens=False)["input_ids"])

        self.first = [encode(format_id(i)) for i in range(max_candidates)]
        self.later = [encode(SEPARATOR + format_id(i)) for i in range(max_candidates)]
        unknown = [i for i in range(max_candidates)
                   if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in self.first[i] + self.later[i]]
        if unknown:  # a word-level vocabulary (the demo's) holds only the ids it was built with
            raise ValueError(f"the selector's tokenizer has no token for the id {format_id(unknown[0])}, so it can "
                             f"rank at most {unknown[0]} candidates per question and these have up to "
                             f"{max_candidates}: give at most {unknown[0]} (--top_n cuts retrieved candidates only)")
        for pieces in (self.first, self.later):
            for a in range(max_candidates):
                for b in range(max_candidates):
                    if a != b and pieces[b][: len(pieces[a])] == pieces[a]:
                        raise ValueError(
                            f"ambiguous id tokens: {tokenizer.decode(pieces[a])!r} is a prefix of "
                            f"{tokenizer.decode(pieces[b])!r} for this tokenizer"
                        )
        self.max_candidates = max_candidates

    def allowed(self, state: _State, n: int, k: int) -> list[int]:
        """Token ids that may come next; the constrained policy renormalises over exactly these."""
        if len(state.picked) == k:
            return [self.eos_token_id]
        pieces = self.first if not state.picked else self.later
        depth = len(state.prefix)
        nxt = {
            pieces[i][depth]
            for i in range(n)
            if i not in state.picked and pieces[i][:depth] == state.prefix
        }
        return sorted(nxt)

    def advance(self, state: _State, token: int, n: int, k: int) -> None:
        """Move ``state`` past ``token`` (which must be allowed)."""
        if len(state.picked) == k:
            state.done = True
            return
        pieces = self.first if not state.picked else self.later
        state.prefix = state.prefix + (token,)
        for i in range(n):
            if i not in state.picked and pieces[i] == state.prefix:
                state.picked.append(i)
                state.prefix = ()
                return

    def encode_ranking(self, ranking: Sequence[int]) -> list[int]:
        """Canonical completion ids of a ranking of 0-based indices (used to build warm-up targets)."""
        ids: list[int] = []
        for t, i in enumerate(ranking):
            ids += (self.first if t == 0 else self.later)[i]
        return ids + [self.eos_token_id]

    def replay(self, completion: Sequence[int], n: int, k: int) -> tuple[list[list[int]], list[int]]:
        """Allowed sets at every position of a grammatical completion, and the ids it picks."""
        state, allowed = _State(picked=[]), []
        for token in completion:
            options = self.allowed(state, n, k)
            if token not in options:
                raise ValueError(f"token {token} is not allowed at position {len(allowed)} of this ranking")
            allowed.append(options)
            self.advance(state, token, n, k)
            if state.done:
                break
        return allowed, state.picked


# ----------------------------------------------------------------------------------------------------------------
# Constrained sampling with one shared prefill, and the constrained log-probability used in the loss
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """m sampled rankings per question, flattened question-major: row ``q * m + j``."""

    completion_ids: torch.Tensor  # [B, C] right-padded with 0
    completion_mask: torch.Tensor  # [B, C]
    allowed: torch.Tensor  # [B, C, A] allowed token ids per position, -1 padded
    logps: torch.Tensor  # [B] constrained log-probability of each sample, as sampled
    picks: list[list[int]]  # [B][K] 0-based passage indices, in order
    log_ratio: torch.Tensor | None = None  # [B] log ρ of each sample's first id when drawn without replacement


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, so padded and unpadded rows see the same positions."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under DDP / FSDP / DeepSpeed wrappers, which keep it as ``.module``."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def allowed_mask(allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Boolean [B, C, V] mask from -1-padded allowed ids [B, C, A]; positions with no entry allow everything."""
    b, c, _ = allowed.shape
    mask = torch.zeros(b, c, vocab_size + 1, dtype=torch.bool, device=allowed.device)
    mask.scatter_(2, torch.where(allowed < 0, vocab_size, allowed), True)
    mask = mask[..., :vocab_size]
    empty = ~mask.any(-1, keepdim=True)
    return mask | empty


def constrained_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) restricted to the allowed set (-inf elsewhere).  [B, C, V]"""
    logits = logits.float() / temperature
    return torch.log_softmax(logits.masked_fill(~allowed_mask(allowed, logits.shape[-1]), float("-inf")), dim=-1)


def constrained_logprobs(logits: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor, temperature: float):
    """Per-token log-probability of ``tokens`` under softmax(logits / T) restricted to the allowed set.  [B, C]"""
    return constrained_log_softmax(logits, allowed, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def ranking_scores(
    logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor, allowed: torch.Tensor,
    temperature: float, entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(z | x, d) of each ranking from its completion positions' logits [B, C, V]; with ``entropy`` also the
    entropy of the constrained distribution at each of its steps, summed along the ranking ([B] each).

    Forced tokens (one allowed id) have entropy 0, so the sum runs over the choices; for K = 1 it is the entropy of
    the policy's pick. It is what ``entropy_coef`` rewards: unlike the sampled rankings' advantages, it has a gradient
    when all m samples of a question agree, the state in which DRO's selector otherwise stops learning.
    """
    logp = constrained_log_softmax(logits, allowed, temperature)  # [B, C, V]
    mask = completion_mask.to(logp.dtype)
    chosen = (logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    if not entropy:
        return chosen
    finite = logp.masked_fill(torch.isinf(logp), 0.0)  # 0 · log 0 = 0, and no NaN gradient through the -inf entries
    per_step = -(logp.exp() * finite).sum(-1)  # [B, C]
    return chosen, (per_step * mask).sum(-1)


@torch.no_grad()
def sample_rankings(
    model: nn.Module,
    grammar: IdGrammar,
    prompts: Sequence[Sequence[int]],
    num_candidates: Sequence[int],
    k: int,
    m: int,
    temperature: float = 1.0,
    greedy: bool = False,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    without_replacement: bool = False,
) -> Samples:
    """E-step proposal: m valid rankings of K ids for each of Q prompts (README 'How DRO is implemented').

    The prompt is prefilled once per question and its KV cache repeated m times, so the N-passage prompt costs one
    forward however many samples are drawn (on an sdpa model, under ``dro_rl.packed_attention``: causal attention
    without the padding mask). Each token is drawn from softmax(logits / T) renormalised over the
    grammar's allowed tokens; ``logps`` are the log-probabilities of exactly that distribution.

    A step where every live row has one allowed token (``[``, ``]``, `` >``, the end) needs no logits: that token
    has probability 1. So tokens wait in ``pending`` and go through the model together, in one forward, only when
    a row has a choice to make — 2–4 forwards for two ids instead of one per token (a small model's step is bound by
    the number of operations it launches, docs/real_model.md). A forced step still draws from a [B, V]
    distribution, which consumes the random numbers any such draw does: every later sample is the one the
    token-by-token loop drew.

    ``without_replacement``: a question's m rankings start with m different ids. Every candidate first writes its
    own id (one row each, on the same cache), which gives the exact log-probability of each first pick; m of them
    are then kept by ``priority_sample`` (Gumbel-top-m), whose log ratios log ρ come back in ``log_ratio``, and the
    kept rows go on sampling the rest of their ranking as usual. A question with m candidates or fewer gets each
    once (its E-step exact) and spare rows that repeat one of them with log ρ = −∞ (weight 0).
    """
    if without_replacement and greedy:
        raise ValueError("without_replacement draws at random; greedy decoding has one ranking per question")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id, device)
    config, extra = _unwrap(model).config, {}
    if config._attn_implementation in ("sdpa", ATTENTION):  # each prompt causal, at causal attention's cost
        use_packed_attention(config)
        extra["packing"] = left_padded(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1,
                **extra)
    cache = out.cache
    sizes = [min(n, grammar.max_candidates) for n in num_candidates]
    rows = max(sizes) if without_replacement else m  # per question while the first id is written
    cache.batch_repeat_interleave(rows)
    mask = mask.repeat_interleave(rows, 0)
    next_logits = out.logits[:, -1].repeat_interleave(rows, 0)  # [B, V]
    sizes = [n for n in sizes for _ in range(rows)]
    ks = [min(k, n) for n in sizes]
    # Without replacement, row j of a question writes first id j (rows past its N are empty from the start).
    first = [j % rows if without_replacement else None for j in range(len(sizes))]
    states = [_State(picked=[], done=f is not None and f >= n) for f, n in zip(first, sizes)]
    first_logp = torch.full((len(states),), float("-inf"), device=device)
    log_ratio, selecting = None, without_replacement
    tokens, allowed_log, logps = [], [], torch.zeros(len(states), device=device)
    pending: list[torch.Tensor] = []  # drawn tokens not yet through the model
    vocab_size = next_logits.shape[-1]
    while not all(s.done for s in states):
        options = [grammar.allowed(s, n, kk) if not s.done else [] for s, n, kk in zip(states, sizes, ks)]
        forced = all(len(o) == 1 for s, o in zip(states, options) if not s.done)
        if pending and not forced:  # a choice: the logits after every token drawn so far, in one forward
            out = model(input_ids=torch.stack(pending, 1), attention_mask=mask,
                        position_ids=positions(mask)[:, -len(pending):], cache=cache, use_cache=True, logits_to_keep=1)
            cache, next_logits, pending = out.cache, out.logits[:, -1], []
        width = max(len(o) for o in options)
        allowed = torch.tensor([[o + [-1] * (width - len(o))] for o in options], dtype=torch.long, device=device)
        if forced:  # probability 1 for each live row's one token (log-probability 0): no logits needed
            logprobs, probs = None, allowed_mask(allowed, vocab_size)[:, 0].float()
        else:
            if not torch.isfinite(next_logits).all():  # multinomial would fail with an obscure message
                raise FloatingPointError("the selector's next-token logits are non-finite (NaN or inf): its "
                                         "parameters or activations overflowed")
            logits = next_logits.float() / temperature
            logits = logits.masked_fill(~allowed_mask(allowed, vocab_size)[:, 0], float("-inf"))
            logprobs = torch.log_softmax(logits, -1)
            probs = logprobs.exp()
        if greedy:
            token = probs.argmax(-1)
        else:
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        writing_first = [f is not None and not s.done and not s.picked for f, s in zip(first, states)]
        if any(writing_first):  # the next token of the row's own first id, whatever was drawn
            token = torch.tensor([grammar.first[f][len(s.prefix)] if w else int(t)
                                  for f, s, w, t in zip(first, states, writing_first, token.tolist())], device=device)
        live = torch.tensor([not s.done for s in states], device=device)
        if logprobs is not None:
            logps += torch.where(live, logprobs.gather(-1, token[:, None]).squeeze(-1), 0.0)
        token = torch.where(live, token, pad_token_id)
        first_written = []  # rows whose first id is now complete, with its log-probability
        for r, (s, t) in enumerate(zip(states, token.tolist())):  # one transfer from the device per token
            if not s.done:
                grammar.advance(s, t, sizes[r], ks[r])
                if writing_first[r] and s.picked:
                    first_written.append(r)
        if first_written:
            rows_written = torch.tensor(first_written, device=device)
            first_logp[rows_written] = logps[rows_written]
        tokens.append(torch.where(live, token, -1))
        allowed_log.append(torch.where(live[:, None], allowed[:, 0], -1))
        if all(s.done for s in states):
            break
        mask = torch.cat([mask, live[:, None].long()], dim=1)
        pending.append(token)
        if selecting and all(s.done or s.picked for s in states):  # every first id written: keep m of them
            index, log_ratio = priority_sample(first_logp.view(-1, rows), m, generator)
            keep = (index + rows * torch.arange(index.shape[0], device=device)[:, None]).reshape(-1)
            cache.batch_select_indices(keep)
            mask, next_logits, logps, log_ratio = mask[keep], next_logits[keep], logps[keep], log_ratio.reshape(-1)
            pending, tokens, allowed_log = ([t[keep] for t in ts] for ts in (pending, tokens, allowed_log))
            kept = keep.tolist()
            states = [replace(states[r], picked=list(states[r].picked)) for r in kept]  # spare slots repeat a row
            sizes, ks = [sizes[r] for r in kept], [ks[r] for r in kept]
            first, selecting = [None] * len(states), False
    completion = torch.stack(tokens, 1)  # [B, C], -1 after the end
    width = max(a.shape[1] for a in allowed_log)
    allowed = torch.stack([nn.functional.pad(a, (0, width - a.shape[1]), value=-1) for a in allowed_log], 1)
    completion_mask = (completion >= 0).long()
    return Samples(
        completion_ids=completion.clamp(min=0) * completion_mask + pad_token_id * (1 - completion_mask),
        completion_mask=completion_mask,
        allowed=allowed,
        logps=logps,
        picks=[s.picked for s in states],
        log_ratio=log_ratio,
    )


def ranking_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(z | x, d; θ_s) under the constrained distribution that sampled z, with grad.  [B]
    (With ``entropy``, also each ranking's summed step entropies: :func:`ranking_scores`.)

    One teacher-forced forward over prompt + completion; only the completion positions' logits are materialised.
    """
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    c = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=c + 1).logits
    return ranking_scores(logits[:, :-1], completion_ids, completion_mask, allowed, temperature, entropy)


def ranking_logprobs_shared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`ranking_logprobs`, computing each distinct prompt once.  [B]

    Rows with equal ``group`` share a prompt (the m samples of a question). The prompt forward runs once per group
    with its KV cache kept in the autograd graph; the cache is indexed out to the rows and only the completion tokens
    run per row, so the N-passage prompt costs one forward and one backward per question instead of m. Not for
    gradient checkpointing, which re-runs forwards without a cache.
    """
    _, first, inverse = _groups(group)
    out = model(
        input_ids=prompt_ids[first], attention_mask=prompt_mask[first], position_ids=positions(prompt_mask[first]),
        use_cache=True, logits_to_keep=1,
    )
    cache = out.cache
    cache.batch_select_indices(inverse)
    first_logits = out.logits[inverse]  # [B, 1, V]: predicts the first completion token
    mask = torch.cat([prompt_mask, completion_mask], 1)
    length = prompt_ids.shape[1]
    rest = model(
        input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions(mask)[:, length:-1],
        cache=cache, use_cache=True,
    ).logits  # [B, C - 1, V]
    logits = torch.cat([first_logits, rest], 1)
    return ranking_scores(logits, completion_ids, completion_mask, allowed, temperature, entropy)


@dataclass
class Packed:
    """One sequence per prompt group: the prompt, then one block per row of the group holding that row's completion.

    Sequences are left-padded to a common length, so every group's completion blocks end at the last position and
    the model materialises logits for only the last ``keep`` positions (the vocabulary projection is the dearest
    part of a short completion).
    """

    input_ids: torch.Tensor  # [G, L]
    position_ids: torch.Tensor  # [G, L]: the prompt's own positions; each block continues from the prompt's length
    segment: torch.Tensor  # [G, L]: -1 padding, 0 the prompt, s + 1 the group's s-th completion block
    valid: torch.Tensor  # [G, L]: a real token (not padding), which later tokens of its segment may attend to
    sequence: torch.Tensor  # [B]: the packed sequence that holds each row
    logit_index: torch.Tensor  # [B, C]: among the last ``keep`` positions, the one whose logits predict each token
    keep: int


def pack_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int = 0,
) -> Packed:
    """Lay out rows (left-padded prompts, right-padded completions) as one packed sequence per prompt group.

    A row's completion enters its block without its last token, which is only a target; the prompt's last position
    predicts the first completion token of every block, and block position t predicts token t + 1.
    """
    _, first, inverse = _groups(group)
    device, width, length = prompt_ids.device, completion_ids.shape[1], prompt_ids.shape[1]
    width -= 1
    counts = torch.bincount(inverse)  # rows per group
    slot = (inverse[:, None] == inverse[None, :]).tril(-1).sum(-1)  # each row's rank within its group
    blocks = int(counts.max()) * width
    total, keep = length + blocks, blocks + 1
    offset = total - length - counts * width  # [G] left padding that aligns every sequence's end

    prompt_cols = offset[:, None] + torch.arange(length, device=device)  # [G, P]
    block_cols = (offset[inverse] + length + slot * width)[:, None] + torch.arange(width, device=device)  # [B, W]
    prompt_len = prompt_mask[first].sum(-1)  # [G]
    g, rows_g = len(first), inverse[:, None].expand(-1, width)

    def layout(fill, prompt_part, block_part) -> torch.Tensor:
        out = torch.full((g, total), fill, dtype=prompt_part.dtype, device=device)
        out.scatter_(1, prompt_cols, prompt_part)
        out[rows_g, block_cols] = block_part.to(out.dtype)
        return out

    steps = torch.arange(width, device=device)
    packed = Packed(
        input_ids=layout(pad_token_id, prompt_ids[first], completion_ids[:, :width]),
        position_ids=layout(0, positions(prompt_mask[first]), prompt_len[inverse][:, None] + steps),
        segment=layout(-1, torch.where(prompt_mask[first].bool(), 0, -1), (slot + 1)[:, None].expand(-1, width)),
        valid=layout(False, prompt_mask[first].bool(), completion_mask[:, :width].bool()),
        sequence=inverse,
        logit_index=torch.cat([(offset[inverse] + length - 1)[:, None], block_cols], 1) - (total - keep),
        keep=keep,
    )
    return packed


def block_attention_mask(segment: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Boolean [G, 1, L, L] mask, True where a query may attend to a key: causal, over real tokens, and only
    within the prompt or the query's own completion block (the mask each row sees in the per-row forward).

    Every position also attends to itself, so no row of the mask is empty: an all-masked row gives NaN outputs on
    padding, and NaN times a zero gradient is still NaN in the weights' gradients.
    """
    length = segment.shape[1]
    index = torch.arange(length, device=segment.device)
    causal = index[None, :] <= index[:, None]  # [L, L]
    key_segment = segment[:, None, :]
    visible = (key_segment == 0) | (key_segment == segment[:, :, None])  # [G, L, L]
    mask = (causal & visible & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=segment.device)
    return mask[:, None]


def ranking_logprobs_packed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`ranking_logprobs`, with each distinct prompt run once.  [B]

    Rows with equal ``group`` share a prompt (the m samples of a question). Each group becomes one packed sequence
    (:func:`pack_rows`) under a block attention mask (:func:`block_attention_mask`) with per-block position ids, so
    every completion attends to the prompt and to itself exactly as in the per-row forward, while the N-passage prompt
    is computed once per question instead of once per row. It is one ordinary forward: valid under gradient
    checkpointing, DDP, FSDP and a shared base's adapters.

    The mask is passed as a 4-D tensor, which transformers' Llama / Mistral / Qwen2 (and other decoders built on
    ``create_causal_mask``) use as given: boolean for ``sdpa``, additive float for ``eager``. An ``sdpa`` model is
    switched to ``dro_rl.packed_attention`` (sdpa that runs a packed prompt causally, at causal attention's cost; plain
    sdpa for every other call). Flash-attention kernels take no such mask and are refused; so is a sliding window
    shorter than a row, which the mask would not apply.
    """
    inner = _unwrap(model)
    config = inner.config
    implementation = config._attn_implementation
    if implementation not in ("sdpa", "eager", ATTENTION):
        raise ValueError(
            f"selector_loss_forward='packed' needs attn_implementation 'sdpa' or 'eager' (a 4-D block mask), not "
            f"{implementation!r}; use selector_loss_forward='per_row' with this attention"
        )
    packed = pack_rows(prompt_ids, prompt_mask, group, completion_ids, completion_mask, pad_token_id)
    window = getattr(config, "sliding_window", None)
    longest = int(packed.position_ids.max()) + 2  # the last row's prompt and completion, its last token included
    if window is not None and longest > window:
        raise ValueError(
            f"selector_loss_forward='packed': a row of {longest} tokens exceeds the model's sliding window ({window}), "
            f"which the block mask does not apply; use selector_loss_forward='per_row'"
        )
    mask, extra = block_attention_mask(packed.segment, packed.valid), {}
    if implementation == "eager":  # eager attention adds the mask to the scores
        dtype = inner.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    else:
        use_packed_attention(config)
        extra["packing"] = packing(packed.segment, mask)
    logits = model(
        input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
        logits_to_keep=packed.keep, use_cache=False, **extra,
    ).logits  # [G, keep, V]
    logits = logits[packed.sequence[:, None], packed.logit_index]  # [B, C, V]
    return ranking_scores(logits, completion_ids, completion_mask, allowed, temperature, entropy)


LOSS_FORWARDS = ("packed", "per_row", "kv_cache")


def selector_logprobs(
    forward: str,
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(z | x, d; θ_s) of each row with grad, by the loss forward ``forward`` (one of ``LOSS_FORWARDS``).  [B]
    With ``entropy``, also each ranking's summed step entropies (:func:`ranking_scores`).

    ``packed`` (the default in training) and ``kv_cache`` run each prompt once per group; ``per_row`` is the
    reference, one prompt per row. All three give the same values and gradients (tests/test_packed.py).
    """
    completion = (completion_ids, completion_mask, allowed, temperature)
    if forward == "per_row":
        return ranking_logprobs(model, prompt_ids, prompt_mask, *completion, entropy=entropy)
    if forward == "kv_cache":
        return ranking_logprobs_shared(model, prompt_ids, prompt_mask, group, *completion, entropy=entropy)
    if forward == "packed":
        return ranking_logprobs_packed(model, prompt_ids, prompt_mask, group, *completion, pad_token_id,
                                       entropy=entropy)
    raise ValueError(f"selector loss forward {forward!r} is not one of {LOSS_FORWARDS}")


def _groups(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct groups, a row index of each, each row's position among the distinct groups)."""
    uniq, inverse = torch.unique(group, return_inverse=True)
    first = torch.full((len(uniq),), -1, dtype=torch.long, device=group.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(group), device=group.device), reduce="amax", include_self=True)
    return uniq, first, inverse


# ----------------------------------------------------------------------------------------------------------------
# Lenient parsing of free-form rankings (evaluation of unconstrained models)
# ----------------------------------------------------------------------------------------------------------------

_ID = re.compile(r"\[\s*(\d+)\s*\]")


def parse_ranking(text: str, n: int, k: int, fallback: Sequence[int] | None = None) -> tuple[list[int], bool]:
    """0-based picks from a free-form ranking, repaired rank_llm-style, and whether it needed no repair.

    Repair: keep ``[i]`` ids in order of appearance, drop duplicates and ids outside 1..n, then fill up to K from
    ``fallback`` (the retrieval order by default).
    """
    seen: list[int] = []
    raw = [int(x) - 1 for x in _ID.findall(text)]
    for i in raw:
        if 0 <= i < n and i not in seen:
            seen.append(i)
    k = min(k, n)
    clean = len(raw) == len(seen) and len(seen) >= k
    picks = seen[:k]
    for i in fallback if fallback is not None else range(n):
        if len(picks) == k:
            break
        if i not in picks:
            picks.append(i)
    return picks, clean
