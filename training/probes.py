"""Where a model loses the phrase: probes of its features, stage by stage.

`training.slot_diagnostics` says *whether* the slots' scores follow the phrase. This
report says *where* the information they need is lost. It runs a model over the
instructions of two splits written by `training.tabletop` (one to fit the probes on, one
to measure them on), taps the SAM3 head's tensors with forward hooks, and fits small
logistic probes on them (here, on the CPU; the model is not changed):

- **image tokens** (the vision encoder's tokens the fusion encoder reads), pooled over
  each scene object's mask: do they know the object's colour and kind?
- **prompt** (the prompt tokens the scoring pools): does it know the colour the
  instruction names?
- **fusion tokens** (the fusion encoder's output, after its cross-attention to the
  prompt), pooled likewise: do they still know the colour, and do they mark the
  instruction's targets among the scene's objects?
- **slot states** (the decoder's last states, what the scoring reads), for slots whose
  mask covers an object: do they know that object's colour, and can "on target" be read
  from them? Beside them, the model's own scores.

"Is target" and "on target" are measured on colour instructions ("the red one"), whose
targets are exactly the scene's objects of the named colour: a matching the image side
(object colour) and the prompt side (named colour) must both hold. Each is read three
ways: linearly from the feature alone (what a head reading only it can do), bilinearly
with the prompt (`bilinear_probe`, the form of SAM3's dot-product scoring), and
bilinearly with the named colour given (one-hot: a perfect prompt). A property read
well at one stage and not at the next is lost between them.

Colour and kind are accuracies over classes (chance about 1/8 and 1/10); "is target"
and "on target" are within-sample AUCs (`slot_diagnostics.within_sample_auc`, averaged
over the measured split's samples with both; 0.5 = chance).

    python -m training.probes MODEL_DIR FIT_SPLIT TEST_SPLIT [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from instructsam_core.sample_images import COLOURS, KINDS
from training.slot_diagnostics import ON_TARGET_SHARE, within_sample_auc

MIN_OBJECT_TOKENS = 0.5  # an object covering less of the token grid than this is not pooled
OBJECT_IOU = 0.5  # a slot's mask "covers" the object it overlaps at least this much
COLOUR_NAMES = tuple(COLOURS)  # the renderer's colours, in its order: the colour probes' classes


@dataclass
class HeadTap:
    """The SAM3 head's tensors of each head call made while it is attached (forward hooks)."""

    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def attach(self, sam3: torch.nn.Module) -> list:
        def encoder_hook(module, args, kwargs, output):
            self.calls.append({"image_tokens": kwargs["vision_features"][0].detach().flatten(2).transpose(1, 2),
                               "fusion_tokens": output.last_hidden_state.detach()})

        def scoring_hook(module, args, kwargs, output):
            mask = kwargs["text_mask"]
            prompt = kwargs["text_features"].detach()
            valid = mask.to(prompt.dtype)[..., None] if mask is not None else torch.ones_like(prompt[..., :1])
            self.calls[-1].update(slot_states=kwargs["decoder_hidden_states"][0].detach(),
                                  prompt=(prompt * valid).sum(1) / valid.sum(1).clamp_min(1))

        return [sam3.detr_encoder.register_forward_hook(encoder_hook, with_kwargs=True),
                sam3.dot_product_scoring.register_forward_hook(scoring_hook, with_kwargs=True)]


def pool_over_mask(tokens: torch.Tensor, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray | None:
    """`tokens` `(h*w, D)` averaged with each token's share of `mask` (`(H, W)` bool, the
    image stretched to the token grid as SAM3's input is); None when the mask covers less
    than `MIN_OBJECT_TOKENS` tokens."""
    share = F.interpolate(torch.from_numpy(mask).float()[None, None], size=grid, mode="area").flatten()
    if float(share.sum()) < MIN_OBJECT_TOKENS:
        return None
    return ((share[:, None] * tokens.float()).sum(0) / share.sum()).numpy()


def scene_of(image_path: Path, pixels: np.ndarray):
    """The renderer's scene of a written sample, object masks included (a split stores
    only the targets' masks): the seed is the file name's last 8 digits, and whether it
    was drawn as a held-out scene is told by rendering it."""
    from training.tabletop import make_scene

    digits = re.search(r"(\d{8})$", Path(image_path).stem)
    if digits is None:
        raise ValueError(f"{image_path}: not a scene written by training.tabletop (no seed in its name)")
    for held_out in (False, True):
        scene = make_scene(int(digits.group(1)), held_out)
        if np.array_equal(scene.image, pixels):
            return scene
    raise ValueError(f"{image_path}: its pixels match no scene of its seed")


def sample_features(call: dict[str, torch.Tensor], result, scene, gt_instances: np.ndarray,
                    grid: tuple[int, int]) -> dict[str, Any]:
    """One instruction's probe rows from one head call (batch of one phrase)."""
    masks = np.stack([o.mask for o in scene.objects])
    is_target = [bool(any((m == g).all() for g in gt_instances)) for m in masks]
    objects = []
    for i, obj in enumerate(scene.objects):
        image = pool_over_mask(call["image_tokens"][0], obj.mask, grid)
        if image is not None:
            objects.append({"colour": COLOUR_NAMES.index(obj.colour), "kind": KINDS.index(obj.kind),
                            "target": is_target[i], "image": image,
                            "fusion": pool_over_mask(call["fusion_tokens"][0], obj.mask, grid)})
    union = gt_instances.any(0) if len(gt_instances) else np.zeros(masks.shape[1:], bool)
    areas = masks.reshape(len(masks), -1).sum(1)
    slots = []
    for mask, slot, score in zip(result.masks, result.slots, result.scores):
        inter = (masks & mask).reshape(len(masks), -1).sum(1)
        iou = inter / (areas + mask.sum() - inter)
        covered = int(np.argmax(iou)) if iou.max() >= OBJECT_IOU else -1
        slots.append({"state": call["slot_states"][0, int(slot)].float().numpy(), "score": float(score),
                      "on_target": bool((mask & union).sum() >= ON_TARGET_SHARE * max(mask.sum(), 1)),
                      "colour": COLOUR_NAMES.index(scene.objects[covered].colour) if covered >= 0 else -1})
    return {"prompt": call["prompt"][0].float().numpy(), "objects": objects, "slots": slots}


def named_colour(instruction: str) -> int:
    """The index of the one colour word `instruction` names, or -1 (none, or several)."""
    named = {c for c in COLOUR_NAMES if re.search(rf"\b{c}\b", instruction)}
    return COLOUR_NAMES.index(named.pop()) if len(named) == 1 else -1


def collect(segmenter, split_file: Path, limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Probe rows of every instruction of a split whose answer named one phrase (the others,
    and those answered with no phrase, are counted in `skipped`), run with no score
    threshold and no mask NMS (one row per slot with a non-empty mask)."""
    from tqdm import tqdm

    from instructsam_core.processing import load_rgb
    from training.tabletop import split_samples

    model = segmenter.model
    grid = None
    tap = HeadTap()
    handles = tap.attach(model.grounding_model)
    saved_nms = segmenter.config.mask_nms_iou
    segmenter.update_config(mask_nms_iou=None)
    rows, skipped = [], 0
    try:
        for sample, kind in tqdm(split_samples(split_file, limit), desc=f"probe {Path(split_file).stem}",
                                 disable=not progress):
            pixels = load_rgb(sample.image)
            tap.calls.clear()
            result = segmenter.segment_image(pixels, sample.instruction, key=str(sample.image), score_threshold=0.0)
            if len(tap.calls) != 1 or tap.calls[0]["fusion_tokens"].shape[0] != 1:
                skipped += 1
                continue
            if grid is None:
                tokens = tap.calls[0]["image_tokens"].shape[1]
                side = int(round(tokens ** 0.5))
                if side * side != tokens:
                    raise ValueError(f"the head's image tokens ({tokens}) are not a square grid")
                grid = (side, side)
            scene = scene_of(sample.image, pixels)
            row = sample_features(tap.calls[0], result, scene, sample.load_gt().instances, grid)
            rows.append({**row, "kind": kind, "named_colour": named_colour(sample.instruction)})
    finally:
        for h in handles:
            h.remove()
        segmenter.update_config(mask_nms_iou=saved_nms)
    return {"rows": rows, "skipped": skipped}


# ---- the probes ---------------------------------------------------------------------------------

def _standardise(fit: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = fit.mean(0), fit.std(0) + 1e-6
    return torch.from_numpy((fit - mean) / std).float(), torch.from_numpy((test - mean) / std).float()


def linear_probe(fit_x: np.ndarray, fit_y: np.ndarray, test_x: np.ndarray, classes: int,
                 weight_decay: float = 1e-3, steps: int = 200) -> np.ndarray:
    """A multinomial logistic regression (L2 `weight_decay`, L-BFGS) fitted on `fit_x`
    `(N, D)` / `fit_y` `(N,)` ints; the test rows' class logits `(M, classes)`."""
    x, tx = _standardise(fit_x, test_x)
    y = torch.from_numpy(np.asarray(fit_y)).long()
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return layer(tx).numpy()


def bilinear_probe(fit_a: np.ndarray, fit_b: np.ndarray, fit_y: np.ndarray, test_a: np.ndarray,
                   test_b: np.ndarray, rank: int = 16, weight_decay: float = 1e-3, steps: int = 400,
                   seed: int = 0) -> np.ndarray:
    """A binary logistic probe of a pair of features: `(U a) . (V b) + w . a + c`, as
    SAM3's dot-product scoring reads a slot and the prompt; the test rows' logits `(M,)`."""
    a, ta = _standardise(fit_a, test_a)
    b, tb = _standardise(fit_b, test_b)
    y = torch.from_numpy(np.asarray(fit_y, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    u = (torch.randn(a.shape[1], rank, generator=gen) / a.shape[1] ** 0.5).requires_grad_()
    v = (torch.randn(b.shape[1], rank, generator=gen) / b.shape[1] ** 0.5).requires_grad_()
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    params = [u, v, w, c]

    def logits(a_, b_):
        return ((a_ @ u) * (b_ @ v)).sum(-1) + a_ @ w + c

    opt = torch.optim.Adam(params, lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(logits(a, b), y)
            loss = loss + weight_decay * sum(p.pow(2).sum() for p in (u, v, w))
            loss.backward()
            opt.step()
    with torch.no_grad():
        return logits(ta, tb).numpy()


def grouped_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """`within_sample_auc` of each group (sample) with both labels, averaged; and how many."""
    aucs = [within_sample_auc(scores[(groups == g) & labels], scores[(groups == g) & ~labels])
            for g in np.unique(groups)]
    aucs = [a for a in aucs if not np.isnan(a)]
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def _items(rows: list[dict], part: str | None, keys: tuple[str, ...], kinds: tuple[str, ...] | None,
           where: Callable[[dict], bool]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every item of `part` (None: the row itself) of the rows of `kinds` (None: all) that
    has `keys` and passes `where`: their rows' indices and one stacked array per key."""
    items = [(i, item) for i, row in enumerate(rows) if kinds is None or row["kind"] in kinds
             for item in (row[part] if part else [row]) if all(item.get(k) is not None for k in keys) and where(item)]
    groups = np.array([i for i, _ in items], dtype=np.int64)
    return groups, [np.stack([np.asarray(it[k]) for _, it in items]) if items else np.zeros((0,)) for k in keys]


@dataclass(frozen=True)
class Probe:
    """One probe: `label` of the items of `part` read from `feature` (with `paired`:
    from the pair `feature`, `paired` of the item's instruction, by `bilinear_probe`)."""

    name: str
    part: str | None  # "objects", "slots", or None: the instruction's own row
    feature: str
    label: str
    measure: str  # "accuracy" (a class label) or "AUC" (a boolean one, within each sample)
    kinds: tuple[str, ...] | None = None  # only instructions of these kinds
    paired: str | None = None  # "prompt", or "named_colour" (the colour the instruction names, one-hot)


COLOUR_ONLY = ("colour",)  # their targets are exactly the scene's objects of the named colour
PROBES = (
    Probe("object colour from image tokens", "objects", "image", "colour", "accuracy"),
    Probe("object kind from image tokens", "objects", "image", "kind", "accuracy"),
    Probe("object colour from fusion tokens", "objects", "fusion", "colour", "accuracy"),
    Probe("named colour from prompt", None, "prompt", "named_colour", "accuracy"),
    Probe("colour instr.: object is target, fusion tokens", "objects", "fusion", "target", "AUC", COLOUR_ONLY),
    Probe("colour instr.: object is target, fusion x prompt", "objects", "fusion", "target", "AUC", COLOUR_ONLY,
          "prompt"),
    Probe("colour instr.: object is target, image x prompt", "objects", "image", "target", "AUC", COLOUR_ONLY,
          "prompt"),
    Probe("colour instr.: object is target, image x named", "objects", "image", "target", "AUC", COLOUR_ONLY,
          "named_colour"),
    Probe("slot's object colour from slot state", "slots", "state", "colour", "accuracy"),
    Probe("colour instr.: slot on target, slot state", "slots", "state", "on_target", "AUC", COLOUR_ONLY),
    Probe("colour instr.: slot on target, state x prompt", "slots", "state", "on_target", "AUC", COLOUR_ONLY,
          "prompt"),
    Probe("colour instr.: slot on target, state x named", "slots", "state", "on_target", "AUC", COLOUR_ONLY,
          "named_colour"),
)


def _paired(rows: list[dict], groups: np.ndarray, paired: str) -> np.ndarray:
    if paired == "named_colour":
        if any(rows[i]["named_colour"] < 0 for i in groups):
            raise ValueError("a probe paired with the named colour needs instructions that name one colour")
        return np.eye(len(COLOUR_NAMES))[[rows[i]["named_colour"] for i in groups]].reshape(len(groups), -1)
    return np.stack([rows[i][paired] for i in groups]) if len(groups) else np.zeros((0, 1))


def run_probe(probe: Probe, fit_rows: list[dict], test_rows: list[dict]) -> dict[str, Any]:
    """`probe` fitted on `fit_rows` and measured on `test_rows` (value nan when either
    lacks what it needs, e.g. a collapsed model has no sample with slots on and off target)."""
    keep = (lambda item: item[probe.label] >= 0) if probe.measure == "accuracy" else (lambda item: True)
    fg, (fx, fy) = _items(fit_rows, probe.part, (probe.feature, probe.label), probe.kinds, keep)
    tg, (tx, ty) = _items(test_rows, probe.part, (probe.feature, probe.label), probe.kinds, keep)
    row = {"probe": probe.name, "measure": probe.measure, "fit_n": int(len(fg)), "test_n": int(len(tg)),
           "value": float("nan"), "samples": 0}
    if not len(tg) or len(np.unique(fy)) < 2:
        return row
    if probe.measure == "accuracy":
        classes = len(KINDS) if probe.label == "kind" else len(COLOUR_NAMES)
        row["value"] = float((linear_probe(fx, fy, tx, classes).argmax(1) == ty).mean())
        row["samples"] = int(len(np.unique(tg)))
        return row
    if probe.paired is None:
        logits = linear_probe(fx, fy.astype(np.int64), tx, 2)
        scores = logits[:, 1] - logits[:, 0]
    else:
        scores = bilinear_probe(fx, _paired(fit_rows, fg, probe.paired), fy, tx,
                                _paired(test_rows, tg, probe.paired))
    row["value"], row["samples"] = grouped_auc(scores, ty.astype(bool), tg)
    return row


def run_probes(fit: dict, test: dict) -> list[dict[str, Any]]:
    """Every probe of `PROBES` fitted on `fit`'s rows and measured on `test`'s, then the
    model's own slot scores measured likewise (no fit), on colour instructions and on all."""
    report = [run_probe(probe, fit["rows"], test["rows"]) for probe in PROBES]
    for kinds, name in ((COLOUR_ONLY, "colour instr.: slot on target, model's score"),
                        (None, "all instr.: slot on target, model's score")):
        tg, (scores, on) = _items(test["rows"], "slots", ("score", "on_target"), kinds, lambda item: True)
        auc, samples = grouped_auc(scores.astype(np.float64), on.astype(bool), tg) if len(tg) else (float("nan"), 0)
        report.append({"probe": name, "measure": "AUC", "fit_n": 0, "test_n": int(len(tg)), "value": auc,
                       "samples": samples})
    return report


def format_probes(report: list[dict[str, Any]]) -> str:
    """A plain-text table of `run_probes`' rows."""
    lines = [f"{'probe':50s} {'measure':>8s} {'value':>6s} {'fit n':>7s} {'test n':>7s} {'samples':>8s}"]
    for r in report:
        lines.append(f"{r['probe']:50s} {r['measure']:>8s} {r['value']:6.3f} {r['fit_n']:7d} {r['test_n']:7d} "
                     f"{r['samples']:8d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.probes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (or 'default')")
    p.add_argument("fit_split", type=Path, help="a split written by training.tabletop to fit the probes on")
    p.add_argument("test_split", type=Path, help="a split to measure them on (e.g. heldout.json)")
    p.add_argument("--limit", type=int, default=None, help="only the first N instructions of each split")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for split in (args.fit_split, args.test_split):
        if not split.is_file():
            p.error(f"{split} not found: give a split written by training.tabletop "
                    "(python -m training.default_model writes them under <out>/full/data/)")
    from instructsam_core.engine import Segmenter
    from training.eval.summary import write_json_atomic

    segmenter = Segmenter.from_pretrained(args.model, device=args.device, dtype="float32")
    fit = collect(segmenter, args.fit_split, args.limit, progress=True)
    test = collect(segmenter, args.test_split, args.limit, progress=True)
    report = run_probes(fit, test)
    print(format_probes(report))
    print(f"instructions probed: {len(fit['rows'])} to fit, {len(test['rows'])} to measure "
          f"(skipped, not one phrase: {fit['skipped']}, {test['skipped']})")
    if args.json:
        write_json_atomic(args.json, {"probes": report, "fit_instructions": len(fit["rows"]),
                                      "test_instructions": len(test["rows"]),
                                      "skipped": [fit["skipped"], test["skipped"]]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
