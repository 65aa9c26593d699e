"""The compiled backend's KV cache: preallocated, written in place, never reallocated.

Every LLM layer gets keys and values of `(1, kv_heads, max_len, head_dim)`. A pass writes
its new positions with `index_copy_` and attends over the whole buffer under a mask that
hides the positions not yet written, so every pass of a given width sees tensors of the
same shapes at the same addresses: what torch.compile needs to reuse a graph, and what a
CUDA graph needs to replay at all. Stale entries past the current length (from padded
passes, or an earlier instruction on the frame) are masked, then overwritten.

The stock Qwen3-VL attention asks its cache only for `update(keys, values, layer_idx)`
when it is given a 4-D mask, so a small writer object stands in for transformers' Cache
classes (whose constructors differ across the versions we support).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class StaticKVCache:
    """Keys and values of every layer, `(1, kv_heads, max_len, head_dim)` each.

    Arguments:
        text_config: the Qwen3-VL text config (layers, KV heads, head size).
        max_len: tokens the cache holds.
        device, dtype: where and in what precision.
    """

    def __init__(self, text_config, max_len: int, device: torch.device, dtype: torch.dtype):
        heads = text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        shape = (1, heads, max_len, head_dim)
        self.text_config = text_config
        self.max_len = max_len
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)]
        for t in self.keys + self.values:
            # A fixed address: compiled graphs and CUDA graphs treat it as state, not as an input to copy.
            torch._dynamo.mark_static_address(t)

    def writer(self, index: torch.Tensor) -> "_CacheWriter":
        """What one pass hands the attention layers: writes its tokens at `index` `(Q,)`."""
        return _CacheWriter(self.keys, self.values, index)

    def snapshot(self, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first `length` positions of every layer (a frame's prompt prefix)."""
        return ([k[:, :, :length].clone() for k in self.keys], [v[:, :, :length].clone() for v in self.values])

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write a snapshot back at positions 0.. (the cache then holds that prefix)."""
        for dst, src in zip(self.keys + self.values, keys + values):
            dst[:, :, :src.shape[2]].copy_(src)

    def to_dynamic(self, length: int) -> DynamicCache:
        """A transformers `DynamicCache` holding the first `length` positions: the eager
        fall-back of an answer that outgrows this cache."""
        cache = DynamicCache(config=self.text_config)
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[:, :, :length].clone(), v[:, :, :length].clone(), layer)
        return cache


class _CacheWriter:
    """The `past_key_values` of one pass: the stock attention's `update` writes there."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor):
        self.keys, self.values, self.index = keys, values, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.index, key_states.to(keys.dtype))
        values.index_copy_(2, self.index, value_states.to(values.dtype))
        return keys, values
