"""The synthetic tabletop world's referring data: scenes from the core's renderer and
instructions of nine kinds with their target instances, written as gRefCOCO JSON (so
training and evaluation read them with their real code paths).

    write_split(root, "train", seeds=range(0, 4000), kinds=STAGE1_KINDS)
    write_split(root, "heldout", seeds=range(1_000_000, 1_000_200))

Every instruction names its targets exactly (0..N instances of the scene): category ("the
bowls"), colour ("the red object"), attribute ("the small red block"), spatial ("the mug
left of the plate", "the leftmost can"), superlative and counting ("the two largest
balls"), exclusion ("every cup except the blue one"), intent ("something to pour water
into"), multi-target ("the apple and the banana"), and no target ("the purple giraffe"
style: a colour and kind absent from the scene). The colour/kind pairs in
`HELD_OUT_COMBINATIONS` never appear in training scenes or instructions (not even as a
no-target phrase); the held-out split shows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instructsam_core.sample_images import COLOURS, KINDS, Scene, random_scene
from instructsam_core.world import PLURAL
from training.eval.masks import rle_encode

INSTRUCTION_KINDS = ("category", "colour", "attribute", "spatial", "superlative", "exclusion", "intent", "multi",
                     "no_target")
STAGE1_KINDS = ("category", "colour", "attribute", "no_target")  # referring data: stage 1
# Never drawn in training scenes: the held-out split tests them (a committed list; a test
# checks the training split never contains one).
HELD_OUT_COMBINATIONS = frozenset({("purple", "banana"), ("orange", "bowl"), ("white", "ball"), ("black", "cup"),
                                   ("green", "plate"), ("red", "bottle")})
INTENTS = {
    "something to drink from": ("cup", "mug"),
    "something to pour water into": ("cup", "mug", "bowl"),
    "something to eat": ("apple", "banana"),
    "something to roll": ("ball",),
    "something to stack": ("block",),
    "something to serve food on": ("plate",),
    "something that holds soup": ("bowl",),
    "something to carry water in": ("bottle",),
    "a drink in a can": ("can",),
}
IMAGE_SIZE = (120, 160)  # (H, W) of the world's scenes


@dataclass
class Expression:
    """An instruction's referring expression, its kind, and the indices of its targets."""

    text: str
    kind: str
    targets: list[int]


def _centre_x(scene: Scene, i: int) -> float:
    return float(np.nonzero(scene.objects[i].mask)[1].mean())


def _area(scene: Scene, i: int) -> int:
    return int(scene.objects[i].mask.sum())


def expressions(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = INSTRUCTION_KINDS,
                exclude: frozenset[tuple[str, str]] = frozenset()) -> list[Expression]:
    """At most one expression of each requested kind the scene allows; a no-target
    expression never names an `exclude`d (colour, kind) pair."""
    objs = scene.objects
    by_kind: dict[str, list[int]] = {}
    by_colour: dict[str, list[int]] = {}
    for i, o in enumerate(objs):
        by_kind.setdefault(o.kind, []).append(i)
        by_colour.setdefault(o.colour, []).append(i)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out: list[Expression] = []
    for kind in kinds:
        made = None
        if kind == "category" and by_kind:
            k = pick(sorted(by_kind))
            word = PLURAL[k] if len(by_kind[k]) > 1 else k
            made = Expression(f"the {word}", kind, by_kind[k])
        elif kind == "colour" and by_colour:
            c = pick(sorted(by_colour))
            many = len(by_colour[c]) > 1
            template = pick(["the {c} objects", "the {c} ones", "everything {c}"] if many else
                            ["the {c} object", "the {c} one", "the {c} thing"])
            made = Expression(template.format(c=c), kind, by_colour[c])
        elif kind == "attribute" and objs:
            o = objs[int(rng.integers(len(objs)))]
            targets = [i for i, p in enumerate(objs) if (p.kind, p.colour, p.size) == (o.kind, o.colour, o.size)]
            word = PLURAL[o.kind] if len(targets) > 1 else o.kind
            made = Expression(f"the {o.size} {o.colour} {word}", kind, targets)
        elif kind == "spatial":
            several = sorted(k for k, v in by_kind.items() if len(v) > 1)
            unique = sorted(k for k, v in by_kind.items() if len(v) == 1)
            options = []
            if several:
                k = pick(several)
                side = pick(["leftmost", "rightmost"])
                xs = [_centre_x(scene, i) for i in by_kind[k]]
                target = by_kind[k][int(np.argmin(xs) if side == "leftmost" else np.argmax(xs))]
                options.append(Expression(f"the {side} {k}", kind, [target]))
            if unique and len(by_kind) > 1:
                anchor = pick(unique)
                k = pick(sorted(x for x in by_kind if x != anchor))
                side = pick(["left", "right"])
                ax = _centre_x(scene, by_kind[anchor][0])
                targets = [i for i in by_kind[k] if (_centre_x(scene, i) < ax) == (side == "left")]
                word = PLURAL[k] if len(targets) > 1 else k
                options.append(Expression(f"the {word} {side} of the {anchor}", kind, targets))
            made = pick(options) if options else None
        elif kind == "superlative":
            several = sorted(k for k, v in by_kind.items() if len(v) > 1)
            if several:
                k = pick(several)
                areas = [_area(scene, i) for i in by_kind[k]]
                order = [by_kind[k][j] for j in np.argsort(areas, kind="stable")]
                if len(order) > 2 and rng.random() < 0.5:
                    made = Expression(f"the two largest {PLURAL[k]}", kind, order[-2:])
                else:
                    size = pick(["largest", "smallest"])
                    made = Expression(f"the {size} {k}", kind, [order[-1] if size == "largest" else order[0]])
        elif kind == "exclusion":
            options = [(k, c) for k, idx in sorted(by_kind.items()) if len(idx) > 1
                       for c in sorted({objs[i].colour for i in idx})
                       if 0 < sum(objs[i].colour == c for i in idx) < len(idx)]
            if options:
                k, c = pick(options)
                made = Expression(f"every {k} except the {c} one", kind,
                                  [i for i in by_kind[k] if objs[i].colour != c])
        elif kind == "intent":
            present = [t for t, ks in INTENTS.items() if any(k in by_kind for k in ks)]
            if present:
                t = pick(sorted(present))
                made = Expression(t, kind, [i for i, o in enumerate(objs) if o.kind in INTENTS[t]])
        elif kind == "multi" and len(by_kind) > 1:
            a, b = rng.choice(sorted(by_kind), size=2, replace=False)
            made = Expression(f"the {a} and the {b}", kind, sorted(by_kind[a] + by_kind[b]))
        elif kind == "no_target":
            absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in exclude
                      and not any((o.colour, o.kind) == (c, k) for o in objs)]
            c, k = pick(absent)
            made = Expression(f"the {c} {k}", kind, [])
        if made is not None:
            out.append(made)
    return out


def make_scene(seed: int, held_out: bool) -> Scene:
    """The scene of one seed: training scenes never draw a held-out combination; a
    held-out scene draws one of them in every other seed."""
    h, w = IMAGE_SIZE
    if held_out and seed % 2 == 0:
        return random_scene(seed, w, h, only=HELD_OUT_COMBINATIONS)
    return random_scene(seed, w, h, exclude=frozenset() if held_out else HELD_OUT_COMBINATIONS)


def write_split(root: Path, name: str, seeds, kinds: tuple[str, ...] = INSTRUCTION_KINDS,
                held_out: bool = False) -> Path:
    """Scenes of `seeds` and their expressions as `root/<name>.json` (gRefCOCO's format:
    per image `cat` (expressions), `masks` (RLE lists, [] = no target), plus our `kinds`
    and `objects` (colour, kind, size of each object) for per-kind reports and checks);
    images under `root/coco/train2017/`. Deterministic: the same seeds give the same files."""
    root = Path(root)
    images = root / "coco" / "train2017"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in seeds:
        scene = make_scene(seed, held_out)
        rng = np.random.default_rng([seed, 7])
        exprs = expressions(scene, rng, kinds, exclude=frozenset() if held_out else HELD_OUT_COMBINATIONS)
        if not exprs:
            continue
        image = f"COCO_{name}{seed:08d}.png"  # found as coco/train2017/<after the last _>, as gRefCOCO's are
        Image.fromarray(scene.image).save(images / image.split("_")[-1])
        h, w = scene.image.shape[:2]
        records.append({
            "image": image, "height": h, "width": w,
            "cat": [e.text for e in exprs],
            "masks": [[rle_encode(scene.objects[i].mask) for i in e.targets] for e in exprs],
            "kinds": [e.kind for e in exprs],
            "objects": [{"colour": o.colour, "kind": o.kind, "size": o.size} for o in scene.objects],
        })
    path = root / f"{name}.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ---- evaluation per instruction kind ------------------------------------------------------

def evaluate(segmenter, split_file: Path, score_threshold: float = 0.5, limit: int | None = None,
             force_phrase: bool = False, progress: bool = False) -> dict:
    """The project's metrics on a written split, per instruction kind and overall.

    Per kind: `n`, `miou` (mean IoU of the union masks, RoboRefIt's protocol: I / (U + 1e-12),
    0 for two empty masks), `ciou`, `map` (instance mAP, InstructSAM's protocol). Overall:
    `n_acc` and `t_acc` (GRES: an empty prediction means "no target"), `multi_map` (instance
    mAP over the instructions with two or more targets). `force_phrase` gives the
    expression as the phrase (no generation), e.g. for an untrained model.
    """
    from tqdm import tqdm

    from instructsam_core.processing import load_rgb
    from training.eval.grefcoco import read_grefcoco
    from training.metrics import INSTRUCTSAM_IOU, InstanceAPAccumulator, SegmentationAccumulator

    split_file = Path(split_file)
    records = json.loads(split_file.read_text(encoding="utf-8"))
    kinds = [k for r in records for k in r["kinds"]]
    samples = read_grefcoco(split_file, split_file.parent)
    if len(samples) != len(kinds):
        raise ValueError(f"{split_file}: {len(samples)} samples but {len(kinds)} kinds")
    pairs = list(zip(samples, kinds))[:limit]
    seg_acc: dict[str, SegmentationAccumulator] = {}
    ap_acc: dict[str, InstanceAPAccumulator] = {}
    overall, multi = SegmentationAccumulator(INSTRUCTSAM_IOU), InstanceAPAccumulator()
    for sample, kind in tqdm(pairs, desc=f"eval {split_file.stem}", disable=not progress):
        gt = sample.load_gt()
        result = segmenter.segment_image(load_rgb(sample.image), sample.instruction, key=str(sample.image),
                                         score_threshold=score_threshold,
                                         phrase=sample.text if force_phrase else None)
        seg_acc.setdefault(kind, SegmentationAccumulator(INSTRUCTSAM_IOU)).add(result.union_mask(), gt.union)
        overall.add(result.union_mask(), gt.union)
        ap_acc.setdefault(kind, InstanceAPAccumulator()).add(result.masks, result.scores, gt.instances)
        if len(gt.instances) >= 2:
            multi.add(result.masks, result.scores, gt.instances)
    table = {}
    for kind in INSTRUCTION_KINDS:
        if kind not in seg_acc:
            continue
        s = seg_acc[kind].summary()
        row = {"n": s["n"], "miou": s["mean_iou"], "ciou": s["ciou"]}
        if kind != "no_target":
            row["map"] = ap_acc[kind].compute()["mAP"]
        table[kind] = row
    s = overall.summary()
    return {"kinds": table, "n": s["n"], "n_acc": s["n_acc"], "t_acc": s["t_acc"],
            "multi_map": multi.compute()["mAP"] if len(multi) else float("nan")}
