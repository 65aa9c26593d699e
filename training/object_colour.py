"""The object-colour target: each object's colour, read from the image tokens pooled over it.

A colour instruction ("the red one") needs the image tokens the decoders read to tell the
scene's objects' colours apart. Trained from random weights, whether they come to is a
matter of the run's draw (docs/training.md, the thirteenth round): the only colour signal
is the match of an instruction's colour with the objects', through the masks and the
semantic head, and the fine colours (red, orange, purple, black) may never come apart.
This target gives the colour from the first step. Every object of the synthetic world has
a known colour and mask (`training.tabletop` writes them beside the expressions); the
tokens pooled over each object must name its colour by the nearest class mean of the
*other* objects of the micro-batch (a prototype classifier: cosine to each colour's mean,
at a temperature, cross-entropy over the colours present).

The classifier's weights are the batch's own class means, so the target adds no
parameters (nothing to checkpoint, shard or leave out of the release): it asks that
colour be readable by a linear head from the tokens, not that colour be all they hold.

    loss.object_colour: 1.0          # its weight (0: off, the default)
    loss.object_colour_tokens: fusion  # "fusion": what the DETR decoder reads; "image": its input
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructsam_core.sample_images import COLOURS
from training.eval.grefcoco import grefcoco_image_path
from training.eval.masks import rle_decode
from training.eval.readers import FormatError, field_of, load_json_records

OBJECT_COLOURS = tuple(COLOURS)  # the renderer's colours, in its order: the target's classes
TOKEN_SOURCES = ("fusion", "image")
MIN_OBJECT_TOKENS = 0.5  # an object covering less of the token grid than this is not pooled


@dataclass
class ObjectLabels:
    """The objects of one image: colour class ids and RLE masks, decoded when loaded."""

    colours: list[int]
    masks: list[dict]

    def load(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """`(n,)` int64 colour ids and `(n, H, W)` bool masks; raises ValueError when a
        mask is not of the image's `shape`."""
        masks = np.stack([rle_decode(m) for m in self.masks]) if self.masks else np.zeros((0, *shape), dtype=bool)
        if masks.shape[1:] != tuple(shape):
            raise ValueError(f"an object mask is {masks.shape[1]}x{masks.shape[2]} but the image is "
                             f"{shape[0]}x{shape[1]}")
        return np.asarray(self.colours, dtype=np.int64), masks.astype(bool)


def read_object_labels(json_path: Path, data_root: Path | None = None) -> dict[Path, ObjectLabels]:
    """Per image of a gRefCOCO file written by `training.tabletop`, its objects' colours
    and masks (`objects: [{colour, mask}]`), keyed by the image path the gRefCOCO reader
    resolves (so a training question finds its image's objects).

    Raises:
        FormatError: a record without its objects' colours and masks, or a colour the
            renderer does not draw.
    """
    json_path = Path(json_path)
    root = Path(data_root) if data_root else json_path.parent
    out: dict[Path, ObjectLabels] = {}
    for i, rec in enumerate(load_json_records(json_path)):
        where = f"{json_path}[{i}]"
        objects = rec.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, dict) and "mask" in o for o in objects):
            raise FormatError(f"{where}: the object-colour target needs each image's objects with their colour "
                              "and mask ('objects': [{colour, mask}], as training.tabletop writes them)")
        unknown = sorted({str(o.get("colour")) for o in objects} - set(OBJECT_COLOURS))
        if unknown:
            raise FormatError(f"{where}: object colour(s) {unknown} are not the renderer's {list(OBJECT_COLOURS)}")
        image = grefcoco_image_path(root, field_of(rec, "image", where=where))
        out[image] = ObjectLabels([OBJECT_COLOURS.index(o["colour"]) for o in objects], [o["mask"] for o in objects])
    return out


def pooled_objects(tokens: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` `(h*w, D)` averaged over each object, weighted by each token's share of its
    mask (`masks` `(n, m, m)` bool, the image stretched to a square as SAM3's input is).
    Returns `(n', D)` for the objects covering at least `MIN_OBJECT_TOKENS` tokens, and
    the `(n,)` bool of which those are."""
    if len(masks) == 0:
        return tokens.new_zeros(0, tokens.shape[-1]), torch.zeros(0, dtype=torch.bool, device=tokens.device)
    shares = F.adaptive_avg_pool2d(masks[:, None].to(tokens.dtype), grid)[:, 0].flatten(1)  # (n, h*w)
    area = shares.sum(1)
    keep = area >= MIN_OBJECT_TOKENS
    return shares[keep] @ tokens / area[keep, None], keep


def object_colour_loss(tokens: torch.Tensor, grid: tuple[int, int], colours: list[torch.Tensor],
                       masks: list[torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototype classifier's cross-entropy over the objects of a micro-batch, and its
    accuracy (both 0 when no object has another of its colour to be compared with).

    Arguments:
        tokens: `(R, h*w, D)` image tokens, one row per image.
        grid: `(h, w)`, the token grid.
        colours, masks: per row, `(n,)` colour ids and `(n, m, m)` bool masks.
        temperature: the cosines' divisor (smaller: sharper).
    """
    feats, labels = [], []
    for row, (c, m) in enumerate(zip(colours, masks)):
        pooled, keep = pooled_objects(tokens[row].float(), grid, m)
        feats.append(pooled)
        labels.append(c[keep])
    zero = tokens.sum() * 0.0
    if not feats or sum(len(y) for y in labels) < 2:
        return zero, zero.detach()
    f = F.normalize(torch.cat(feats), dim=-1)  # (N, D)
    y = torch.cat(labels)
    n = len(y)
    one_hot = F.one_hot(y, len(OBJECT_COLOURS)).to(f.dtype)  # (N, C)
    sums = (one_hot.T @ f)[None].repeat(n, 1, 1)  # (N, C, D): each object's view of the class sums
    counts = one_hot.sum(0)[None].repeat(n, 1)  # (N, C)
    rows = torch.arange(n, device=f.device)
    sums[rows, y] -= f  # leave the object itself out of its own class's mean
    counts[rows, y] -= 1
    usable = counts[rows, y] > 0  # an object alone in its colour has no mean to be near
    if not usable.any():
        return zero, zero.detach()
    cosines = torch.einsum("ncd,nd->nc", F.normalize(sums, dim=-1), f) / temperature
    logits = cosines.masked_fill(counts == 0, float("-inf"))[usable]
    loss = F.cross_entropy(logits, y[usable])
    accuracy = (logits.argmax(-1) == y[usable]).float().mean()
    return loss, accuracy.detach()
