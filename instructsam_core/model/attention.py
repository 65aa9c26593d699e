"""InstructSAM's hybrid attention mask for the LLM.

Text is causal. Each contiguous run of `[SEG]` query tokens is a block that is fully open
inside: a query sees every token before the run and every other query of its run, so the
K slots can divide the targets among themselves. Tokens after a run see it causally.
"""

from __future__ import annotations

import torch


def seg_run_ids(is_seg: torch.Tensor) -> torch.Tensor:
    """`(B, L)` int: 0 for non-query tokens, r >= 1 for tokens of the r-th [SEG] run of a row."""
    starts = is_seg & ~torch.nn.functional.pad(is_seg, (1, 0), value=False)[:, :-1]
    return torch.where(is_seg, starts.long().cumsum(dim=1), torch.zeros_like(is_seg, dtype=torch.long))


def hybrid_attention_mask(
    is_seg: torch.Tensor,
    key_valid: torch.Tensor,
    past_is_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean 4-D mask, True = may attend.

    Arguments:
        is_seg: `(B, Q)` True at the [SEG] query positions of the new tokens.
        key_valid: `(B, P + Q)` True for non-padding keys (P cached tokens, then the Q new ones).
        past_is_seg: `(B, P)` [SEG] flags of the cached tokens (needed only to keep a run
            that straddles the cache boundary open; None when there is no cache).

    Returns:
        `(B, 1, Q, P + Q)` bool. No row sees a padding key, except that a padded query row
        also sees itself, so that attention never normalises over an empty set (the
        outputs of padded rows are ignored anyway).
    """
    B, Q = is_seg.shape
    P = key_valid.shape[1] - Q
    device = is_seg.device
    q_pos = torch.arange(P, P + Q, device=device)
    k_pos = torch.arange(P + Q, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Q, P+Q)

    all_seg = is_seg if P == 0 else torch.cat(
        [past_is_seg if past_is_seg is not None else is_seg.new_zeros(B, P), is_seg], dim=1)
    runs = seg_run_ids(all_seg)  # (B, P+Q)
    q_runs = runs[:, P:]
    same_run = (q_runs[:, :, None] == runs[:, None, :]) & (q_runs[:, :, None] > 0)  # (B, Q, P+Q)

    allowed = (causal[None] | same_run) & key_valid[:, None, :]
    own = k_pos[None, :] == q_pos[:, None]
    allowed = allowed | (own[None] & ~key_valid[:, P:, None])
    return allowed[:, None]


def as_attention_bias(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask in the form the attention implementation takes: bool for SDPA, additive otherwise."""
    if attn_implementation == "sdpa":
        return mask
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)
