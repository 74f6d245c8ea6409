"""Attention for the packed selector loss forward, at the cost of causal attention.

A packed sequence holds a question's prompt and then its m completions, each of which may see the prompt and itself
(``selector.pack_rows``). Given that layout as one 4-D block mask, SDPA computes every query-key pair, although the
prompt's own attention is plain causal: twice the attention work of the prompt, which at SmolLM2's width is about a
fifth of the prompt's forward. This attention runs two calls per layer instead, each over all sequences at once:
the prompts, moved to start at position 0, under ``is_causal`` with no mask (the kernel skips the masked half; on a
GPU, flash attention), and the completion blocks' few queries against every key under their slice of the mask.
Same values as the 4-D mask. Batched, because on a GPU a small model's step is bound by the operations the host
dispatches, not by its FLOPs: the first version ran two calls per sequence, which made ~12,600 of the ~56,000
operations of the GPU recipe's step (docs/real_model.md). The sampler's prefill of left-padded prompts uses it too
(``left_padded``: prompts without blocks), instead of the dense 4-D padding mask that sdpa would otherwise get.

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
    """Where the packed sequences' prompts are, as indices for two batched attention calls.

    Columns before ``split`` hold only left padding and prompt tokens in every sequence (the completion blocks, and
    the end of a prompt with fewer blocks after it, come later). The prompt call runs them right-padded, each prompt
    moved to start at 0, so that ``is_causal`` is exact; the block call runs the columns from ``split`` on under
    their rows of the mask.
    """

    split: int
    gather: torch.Tensor  # [G, P]: the column of each sequence's j-th prompt token (clamped past its end)
    scatter: torch.Tensor  # [G, split]: for each column before split, its row in the prompt call (padding: row 0)
    block_mask: torch.Tensor | None  # [G, 1, L - split, L]: what the columns from split on may see; None if none


def _packing(start: torch.Tensor, split: int, block_mask: torch.Tensor | None) -> Packing:
    """Indices of sequences whose prompts start at ``start`` [G] (after left padding), with columns from ``split``
    on left to the block call."""
    columns = torch.arange(split, device=start.device)
    width = split - int(start.min())
    gather = (start[:, None] + columns[:width]).clamp(max=split - 1)
    return Packing(split, gather, (columns - start[:, None]).clamp(min=0), block_mask)


def packing(segment: torch.Tensor, mask: torch.Tensor) -> Packing:
    """The prompts and block mask of packed sequences from their segments (-1 padding, 0 prompt, s + 1 the s-th
    completion block; prompts contiguous, blocks after them) and their [G, 1, L, L] block mask."""
    start = (segment < 0).sum(-1)  # left padding only: the prompt starts after it
    split = int((start + (segment == 0).sum(-1)).min())  # where the first prompt ends
    return _packing(start, split, mask[:, :, split:] if split < segment.shape[1] else None)


def left_padded(mask: torch.Tensor) -> Packing:
    """Rows of left-padded prompts (a 2-D mask) as packed sequences with no completion blocks: each prompt causal."""
    return _packing(mask.shape[1] - mask.sum(-1), mask.shape[1], None)


def packed_sdpa_attention(module, query, key, value, attention_mask, packing: Packing | None = None, **kwargs):
    """``sdpa`` in two batched calls, the prompts causal and the completion blocks under their slice of the mask;
    plain ``sdpa`` without ``packing``. Padding positions get a copy of a prompt position's output (nothing reads
    them: the mask hides them as keys, and no logit is taken there)."""
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = packing.gather[:, None, :, None]  # [G, 1, P, 1]: broadcast over heads and head_dim
    prompts, _ = sdpa_attention_forward(module, query.take_along_dim(rows, 2), key.take_along_dim(rows, 2),
                                        value.take_along_dim(rows, 2), None, is_causal=True, **kwargs)  # [G, P, H, D]
    outputs = [prompts.take_along_dim(packing.scatter[:, :, None, None], 1)]  # [G, split, H, D]
    if packing.block_mask is not None:
        blocks, _ = sdpa_attention_forward(module, query[:, :, packing.split:], key, value, packing.block_mask,
                                           is_causal=False, **kwargs)
        outputs.append(blocks)
    return torch.cat(outputs, 1), None


AttentionInterface.register(ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # other calls' 2-D padding masks become sdpa's 4-D ones


def use_packed_attention(config) -> None:
    """Switch a model (by its config) from ``sdpa`` to ``ATTENTION``, which is ``sdpa`` unless given ``packing``."""
    if config._attn_implementation == "sdpa":
        config._attn_implementation = ATTENTION
