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
from pathlib import Path

import numpy as np
from PIL import Image

from instructsam_core.sample_images import Scene, random_scene
from instructsam_core.world import INSTRUCTION_KINDS, expressions
from training.eval.masks import rle_encode
from training.metrics import GRES_IOU, INSTRUCTSAM_IOU, InstanceAPAccumulator, SegmentationAccumulator

STAGE1_KINDS = ("category", "colour", "attribute", "no_target")  # referring data: stage 1
# Never drawn in training scenes: the held-out split tests them (a committed list; a test
# checks the training split never contains one).
HELD_OUT_COMBINATIONS = frozenset({("purple", "banana"), ("orange", "bowl"), ("white", "ball"), ("black", "cup"),
                                   ("green", "plate"), ("red", "bottle")})
IMAGE_SIZE = (120, 160)  # (H, W) of the world's scenes


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
    and `objects` (colour, kind, size and RLE mask of each object) for per-kind reports,
    checks and the object-colour target, `training.object_colour`);
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
            "objects": [{"colour": o.colour, "kind": o.kind, "size": o.size, "mask": rle_encode(o.mask)}
                        for o in scene.objects],
        })
    path = root / f"{name}.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ---- evaluation per instruction kind ------------------------------------------------------

def split_samples(split_file: Path, limit: int | None = None) -> list[tuple]:
    """The first `limit` samples of a split `write_split` wrote, each with its instruction
    kind, read by the gRefCOCO reader (what evaluation and training read)."""
    from training.eval.grefcoco import read_grefcoco

    split_file = Path(split_file)
    records = json.loads(split_file.read_text(encoding="utf-8"))
    kinds = [k for r in records for k in r["kinds"]]
    samples = read_grefcoco(split_file, split_file.parent)
    if len(samples) != len(kinds):
        raise ValueError(f"{split_file}: {len(samples)} samples but {len(kinds)} kinds")
    return list(zip(samples, kinds))[:limit]


def evaluate(segmenter, split_file: Path, score_threshold: float | None = None, limit: int | None = None,
             force_phrase: bool = False, progress: bool = False) -> dict:
    """The project's metrics on a written split, per instruction kind and overall.

    Per kind: `n`, `miou` (mean IoU of the union masks, RoboRefIt's protocol: I / (U + 1e-12),
    0 for two empty masks), `ciou`, `map` (instance mAP, InstructSAM's protocol). Overall:
    `n_acc` and `t_acc` (GRES: an empty prediction means "no target"), `giou` (GRES's: the
    mean per-instruction IoU with an empty answer to a no-target instruction scoring 1),
    `multi_map` (instance mAP over the instructions with two or more targets).
    `force_phrase` gives the expression as the phrase (no generation), e.g. for an
    untrained model. `score_threshold` None: the segmenter's own (EngineConfig's 0.5, or
    what its checkpoint's engine_config.json sets).
    """
    threshold = segmenter.config.score_threshold if score_threshold is None else float(score_threshold)
    return evaluate_thresholds(segmenter, split_file, [threshold], limit, force_phrase, progress)[threshold]


def evaluate_thresholds(segmenter, split_file: Path, thresholds, limit: int | None = None,
                        force_phrase: bool = False, progress: bool = False) -> dict[float, dict]:
    """`evaluate`'s metrics at each of several score thresholds, from one pass of the engine.

    The engine runs once at the lowest threshold; the answer at a higher one is the
    instances scoring above it. That is what the engine itself answers there: its mask NMS
    is greedy by score, so an instance is only ever suppressed by a better-scoring one,
    which a higher threshold keeps too. Returns {threshold: metrics}, as `evaluate`'s.
    """
    from tqdm import tqdm

    from instructsam_core.processing import load_rgb

    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"evaluate_thresholds needs score thresholds in [0, 1], got {thresholds}")
    split_file = Path(split_file)
    pairs = split_samples(split_file, limit)
    tallies = {t: _KindTally() for t in thresholds}
    for sample, kind in tqdm(pairs, desc=f"eval {split_file.stem}", disable=not progress):
        gt = sample.load_gt()
        result = segmenter.segment_image(load_rgb(sample.image), sample.instruction, key=str(sample.image),
                                         score_threshold=thresholds[0],
                                         phrase=sample.text if force_phrase else None)
        for t, tally in tallies.items():
            keep = result.scores > t
            tally.add(kind, result.masks[keep], result.scores[keep], gt)
    return {t: tally.summary() for t, tally in tallies.items()}


class _KindTally:
    """The accumulators of `evaluate`'s metrics: per instruction kind, overall, and over
    the instructions with two or more targets."""

    def __init__(self) -> None:
        self.seg_by_kind: dict[str, SegmentationAccumulator] = {}
        self.ap_by_kind: dict[str, InstanceAPAccumulator] = {}
        self.overall = SegmentationAccumulator(INSTRUCTSAM_IOU)
        self.gres = SegmentationAccumulator(GRES_IOU)  # gIoU: two empty masks score 1
        self.multi = InstanceAPAccumulator()

    def add(self, kind: str, masks: np.ndarray, scores: np.ndarray, gt) -> None:
        union = masks.any(axis=0) if len(masks) else np.zeros(gt.union.shape, dtype=bool)
        self.seg_by_kind.setdefault(kind, SegmentationAccumulator(INSTRUCTSAM_IOU)).add(union, gt.union)
        self.overall.add(union, gt.union)
        self.gres.add(union, gt.union)
        self.ap_by_kind.setdefault(kind, InstanceAPAccumulator()).add(masks, scores, gt.instances)
        if len(gt.instances) >= 2:
            self.multi.add(masks, scores, gt.instances)

    def summary(self) -> dict:
        table = {}
        for kind in INSTRUCTION_KINDS:
            if kind not in self.seg_by_kind:
                continue
            s = self.seg_by_kind[kind].summary()
            row = {"n": s["n"], "miou": s["mean_iou"], "ciou": s["ciou"]}
            if kind != "no_target":
                row["map"] = self.ap_by_kind[kind].compute()["mAP"]
            table[kind] = row
        s = self.overall.summary()
        multi_map = self.multi.compute()["mAP"] if len(self.multi) else float("nan")
        return {"kinds": table, "n": s["n"], "n_acc": s["n_acc"], "t_acc": s["t_acc"],
                "giou": self.gres.summary()["mean_iou"], "multi_map": multi_map}
