"""Re-initialisation of a model that trains from random weights.

transformers initialises every linear and convolution layer of Qwen3-VL and SAM3 from
N(0, 0.02): right for a 2B model that is only ever loaded, wrong for a small one trained
from scratch. At widths 32-128 a 0.02 layer shrinks its input's scale 5-10 times, so a
stack of MLPs and convolutions without normalisation between them (SAM3's FPN neck, mask
embedder, box head, the projections) starts with almost no signal or gradient, and the
first thousands of steps go to growing the weights. `fan_in_init` draws them from
N(0, 1/fan_in) instead (variance-preserving, "LeCun normal"), biases zero; embeddings and
norms keep their initialisation. The query bank is drawn from N(0, 1), as DETR draws its
queries, so the K slots leave the LLM clearly apart. That alone does not keep them apart:
trained from scratch, SAM3's decoder still learns to overwrite the slots' content and
all K predict the same mask (docs/training.md, "The default model").
"""

from __future__ import annotations

import math

import torch
from torch import nn

INIT_SCHEMES = ("transformers", "fan_in")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


@torch.no_grad()
def fan_in_init(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Redraw every linear and convolution weight of `model` from N(0, 1/fan_in), biases 0,
    and its query bank (`mask_queries`) from N(0, 1).

    A weight shared with an embedding (a tied lm_head) is left alone. Returns the number of
    layers redrawn."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    bank = getattr(model, "mask_queries", None)
    if bank is not None:
        bank.normal_(0.0, 1.0, generator=generator)
    count = 0
    for module in model.modules():
        if not isinstance(module, _LAYERS) or id(module.weight) in embeddings:
            continue
        weight = module.weight
        if isinstance(module, nn.ConvTranspose2d):  # (in, out, kh, kw): each output sums in x kh x kw / stride^2
            fan_in = weight.shape[0] * weight[0, 0].numel() / math.prod(module.stride)
        else:
            fan_in = weight[0].numel()
        weight.normal_(0.0, 1.0 / math.sqrt(max(1.0, fan_in)), generator=generator)
        if module.bias is not None:
            module.bias.zero_()
        count += 1
    return count
