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


def _halton(index: int, base: int) -> float:
    """The `index`-th element (from 1) of the van der Corput sequence in `base`."""
    value, scale = 0.0, 1.0
    while index:
        scale /= base
        index, digit = divmod(index, base)
        value += digit * scale
    return value


@torch.no_grad()
def box_attention_prior(model: nn.Module, strength: float, box_size: float = 0.3) -> int:
    """Start SAM3's decoder slots looking at different places, each inside its own box.

    Two things make a from-scratch decoder's K slots alike, and both are set here:
    - its learned reference boxes start from N(0, 0.02) in logit space, so every slot
      starts from the same box, (0.5, 0.5, 0.5, 0.5): they are spread over the image
      instead (centres on a Halton sequence, `box_size` wide and high);
    - its box relative-position bias (per head, `box_rpb_embed_x(dx) + box_rpb_embed_y(dy)`
      added to the image cross-attention logits, dx the log-scaled offsets of each column
      from the box's left and right edges) starts near 0, so every slot reads the same
      image summary. Two ReLU units measure how far a column lies outside the box,
      `relu(-(x - x0))` and `relu(x - x1)`; the output layer weighs both by `-strength` for
      every head and every other unit by 0: the bias is 0 inside the box, about
      -strength/4 just outside, -strength far away. The other units keep their random
      first layer, so training can reshape the bias.

    A remedy tried against the slots' collapse (docs/training.md, "Where it stands"): in
    the measured runs the slots still came to predict one mask, so it is off in the recipe.
    Returns the number of modules set (3 for SAM3's DETR decoder: its reference boxes and
    both bias embeddings; 0 for a model without one)."""
    count = 0
    for module in model.modules():
        refs = getattr(module, "reference_points", None)
        if isinstance(refs, nn.Embedding) and refs.embedding_dim == 4 and hasattr(module, "box_rpb_embed_x"):
            boxes = torch.tensor([[_halton(i + 1, 2), _halton(i + 1, 3), box_size, box_size]
                                  for i in range(refs.num_embeddings)])
            boxes[:, :2] = boxes[:, :2] * (1 - box_size) + box_size / 2  # whole boxes inside the image
            refs.weight.copy_(torch.logit(boxes))
            count += 1
        for name in ("box_rpb_embed_x", "box_rpb_embed_y"):
            mlp = getattr(module, name, None)
            if mlp is None:
                continue
            first, last = mlp.layer1, mlp.layer2
            if mlp.layer3 is not None or first.in_features != 2 or first.out_features < 2:
                raise ValueError(f"{name}: expected a 2-layer MLP from 2 offsets, got {mlp}")
            first.weight[:2] = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # outside left/top, outside right/bottom
            first.bias[:2] = 0.0
            last.weight.zero_()
            last.weight[:, :2] = -strength
            last.bias.zero_()
            count += 1
    return count
