"""Qwen3-VL's 3-D rotary positions (M-RoPE) for sequences with one image per row.

Written here rather than borrowed from `Qwen3VLModel.get_rope_index`, whose signature has
changed across transformers releases; the rule is small: text tokens advance all three
axes together, an image's merged tokens take (t, row, col) offsets from the position where
the image starts, and the text after an image resumes at start + max(rows, cols).
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_grids: list[tuple[int, int, int] | None],
    spatial_merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions for a (possibly padded) batch.

    Arguments:
        input_ids: `(B, L)`.
        attention_mask: `(B, L)` 1/True for real tokens; padding gets position 0.
        image_token_id: id of the image placeholder token.
        image_grids: per row, the image's patch grid `(t, h, w)` before merging, or None.
        spatial_merge_size: Qwen3-VL's patch merge factor (2).

    Returns:
        positions: `(3, B, L)` long.
        next_position: `(B,)` the text position the next generated token takes.
    """
    B, L = input_ids.shape
    positions = torch.zeros(3, B, L, dtype=torch.long, device=input_ids.device)
    next_position = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    for b in range(B):
        valid = attention_mask[b].bool()
        ids = input_ids[b][valid]
        is_image = ids == image_token_id
        n_image = int(is_image.sum())
        grid = image_grids[b] if b < len(image_grids) else None
        row = torch.arange(ids.shape[0], device=ids.device).expand(3, -1).clone()
        if n_image:
            if grid is None:
                raise ValueError(f"row {b} has {n_image} image tokens but no image grid was given")
            t, h, w = (int(v) for v in grid)
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if n_image != t * gh * gw:
                raise ValueError(f"row {b}: {n_image} image tokens but the image grid {grid} "
                                 f"gives {t * gh * gw}")
            first = int(is_image.nonzero()[0])
            if not bool(is_image[first:first + n_image].all()):
                raise ValueError(f"row {b}: image tokens must be contiguous")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            image_pos = torch.stack([tt, hh, ww]).reshape(3, -1).to(ids.device) + first
            row[:, first:first + n_image] = image_pos
            after = first + max(gh, gw)
            rest = ids.shape[0] - (first + n_image)
            row[:, first + n_image:] = torch.arange(after, after + rest, device=ids.device).expand(3, -1)
        positions[:, b, valid] = row
        next_position[b] = int(row.max()) + 1 if row.numel() else 0
    return positions, next_position
