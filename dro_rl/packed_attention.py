"""Attention for the packed selector loss forward, at the cost of causal attention.

A packed sequence holds a question's prompt and then its m completions, each of which may see the prompt and itself
(``selector.pack_rows``). Given that layout as one 4-D block mask, SDPA computes every query-key pair, although the
prompt's own attention is plain causal: twice the attention work of the prompt, which at SmolLM2's width is about a
fifth of the prompt's forward. This attention runs each sequence in two calls instead: the prompt under
``is_causal`` with no mask (the kernel skips the masked half; on a GPU, flash attention), and the completion blocks'
few queries against the prompt and the blocks under their slice of the mask. Same values as the 4-D mask. The
sampler's prefill of left-padded prompts uses it too (``left_padded``: prompts without blocks), instead of the dense
4-D padding mask that sdpa would otherwise get.

It is registered with transformers' ``AttentionInterface`` as ``ATTENTION`` and is plain ``sdpa`` for every call
that does not pass ``packing`` (sampling, generation, the generator's forwards): ``use_packed_attention`` switches a
model from ``sdpa`` to it, once. A persistent switch, because gradient checkpointing recomputes the forward during
backward, outside any context the loss could open; the name is not saved with the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "dro_rl_packed_sdpa"


@dataclass(frozen=True)
class Packing:
    """Where each packed sequence's prompt is, and what its completion blocks may see."""

    prompts: list[tuple[int, int]]  # per sequence, [start, end) of its prompt (left padding before start)
    block_masks: list[torch.Tensor]  # per sequence, [1, 1, L - end, L - start]: block queries x keys from the prompt on


def packing(segment: torch.Tensor, mask: torch.Tensor) -> Packing:
    """The prompt spans and block masks of packed sequences from their segments (-1 padding, 0 prompt, s + 1 the
    s-th completion block; prompts contiguous, blocks after them) and their [G, 1, L, L] block mask."""
    in_prompt = (segment == 0).long()
    start = (segment < 0).long().sum(-1).tolist()  # left padding only: the prompt starts after it
    end = [s + n for s, n in zip(start, in_prompt.sum(-1).tolist())]
    return Packing(list(zip(start, end)), [mask[g : g + 1, :, e:, s:] for g, (s, e) in enumerate(zip(start, end))])


def left_padded(mask: torch.Tensor) -> Packing:
    """Rows of left-padded prompts (a 2-D mask) as packed sequences with no completion blocks: each prompt causal."""
    length = mask.shape[1]
    return Packing([(length - n, length) for n in mask.sum(-1).tolist()], [mask.new_empty(0)] * mask.shape[0])


def packed_sdpa_attention(module, query, key, value, attention_mask, packing: Packing | None = None, **kwargs):
    """``sdpa`` split per packed sequence into its causal prompt and its masked completion blocks; plain ``sdpa``
    without ``packing``. Padding positions get zeros (nothing reads them)."""
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    length, outputs = query.shape[2], []
    for g, ((start, end), block_mask) in enumerate(zip(packing.prompts, packing.block_masks)):
        q, k, v = query[g : g + 1], key[g : g + 1], value[g : g + 1]
        prompt, _ = sdpa_attention_forward(module, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], None,
                                           is_causal=True, **kwargs)  # [1, end - start, heads, head_dim]
        parts = [prompt.new_zeros(1, start, *prompt.shape[2:]), prompt]
        if end < length:
            blocks, _ = sdpa_attention_forward(module, q[:, :, end:], k[:, :, start:], v[:, :, start:], block_mask,
                                               is_causal=False, **kwargs)
            parts.append(blocks)
        outputs.append(torch.cat(parts, 1))
    return torch.cat(outputs, 0), None


AttentionInterface.register(ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # other calls' 2-D padding masks become sdpa's 4-D ones


def use_packed_attention(config) -> None:
    """Switch a model (by its config) from ``sdpa`` to ``ATTENTION``, which is ``sdpa`` unless given ``packing``."""
    if config._attn_implementation == "sdpa":
        config._attn_implementation = ATTENTION
