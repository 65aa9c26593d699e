"""The benchmark loop shared by every benchmark: select, resume, run, score, log.

For each selected sample: read the image and the GT, run the predictor, score the
union mask (and, for instance mAP, each instance against each GT instance), and append
one JSON line to the per-sample log as soon as the sample is done. A rerun reads the log
and skips what is done, so an interrupted run resumes. Bad data (missing or unreadable
image or mask, a mask of the wrong size) and engine errors fail that sample only: it is
logged with the reason and scores IoU 0, as in the official protocol.

Every record carries `logged_ns`, a write stamp (wall-clock nanoseconds, strictly
increasing within a process). Where a split's logs (unsharded and shard logs) hold several
records of one id, the newest stamp wins, whatever file it is in: a `--retry-failed` rerun
supersedes the failure it retried. Records of older logs, without the stamp, count as
older than any stamped one; among them a non-failed record beats a failed one, then the
later (file name, line) wins.

The predictor is anything with ``segment_image(rgb, instruction, key=..., score_threshold=...)``
returning an `instructsam_core.result.Result` (the real `Segmenter`, or a stub in tests).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
from tqdm import tqdm

from instructsam_core.fileio import atomic_file
from instructsam_core.result import Result
from training.eval.masks import DataError, read_rgb, write_label_png
from training.eval.samples import GroundTruth, Sample
from training.metrics import INSTRUCTSAM_IOU, IouFormula, failed_sample, pairwise_mask_iou, score_sample

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_PREDICT_ONLY = "predict_only"


class Predictor(Protocol):
    """What the runner needs from an engine."""

    def segment_image(self, image: np.ndarray, instruction: str, key: Any = None, *,
                      score_threshold: float = ..., output_size: tuple[int, int] | None = None) -> Result: ...


@dataclass
class RunConfig:
    """How one split is run.

    Attributes:
        split_dir: output folder of the split (per-sample logs, summary, masks).
        score_threshold: slots kept when sigmoid(score) > this.
        limit: only the first `limit` samples of the split (applied before sharding).
        shard: `(k, n)`: run the k-th (0-based) of n contiguous parts.
        save_masks: write each prediction as a label PNG under `split_dir/masks/`.
        warmup: the first `warmup` samples this process runs are left out of latency.
        retry_failed: rerun samples logged as failed instead of skipping them.
        progress: show a progress bar.
        iou: the benchmark's per-sample IoU formula (`training.metrics.IouFormula`).
        instance_ious: log each instance's IoU with each GT instance (for mAP).
    """

    split_dir: Path
    score_threshold: float = 0.5
    limit: int | None = None
    shard: tuple[int, int] | None = None
    save_masks: bool = False
    warmup: int = 1
    retry_failed: bool = False
    progress: bool = True
    iou: IouFormula = INSTRUCTSAM_IOU
    instance_ious: bool = False


@dataclass
class RunStats:
    """Counts of one `run_split` call."""

    selected: int
    skipped: int
    ran: int
    failed: int


def parse_shard(text: str) -> tuple[int, int]:
    """'k/n' -> (k, n) with 0 <= k < n.

    Raises:
        ValueError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard must look like k/n (e.g. 0/4), got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= k < n (k is 0-based)")
    return k, n


def select(samples: list[Sample], limit: int | None = None, shard: tuple[int, int] | None = None) -> list[Sample]:
    """The first `limit` samples, then the k-th of n balanced contiguous shards."""
    if limit is not None:
        if limit < 0:
            raise ValueError(f"--limit must be >= 0, got {limit}")
        samples = samples[:limit]
    if shard is not None:
        k, n = shard
        samples = samples[len(samples) * k // n: len(samples) * (k + 1) // n]
    return samples


def log_name(shard: tuple[int, int] | None) -> str:
    """Per-sample log file name of a (possibly sharded) run."""
    return "samples.jsonl" if shard is None else f"samples.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_log(path: Path, repair: bool = False) -> list[dict]:
    """Records of a per-sample log.

    A torn last line (a crash mid-write: no final newline) is skipped; with `repair`
    (only for the log this process appends to: another shard may be writing its own)
    the file is rewritten without it, so appending can go on. A corrupt line elsewhere
    raises.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    *complete, tail = raw.split(b"\n")
    records = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: corrupt line in the per-sample log: {e}") from e
    if tail.strip():
        keep = b"".join(line + b"\n" for line in complete)
        try:
            records.append(json.loads(tail))
            keep += tail + b"\n"
        except json.JSONDecodeError:
            pass  # torn write: drop it, the sample reruns
        if not repair:
            return records
        with atomic_file(path) as tmp:
            tmp.write_bytes(keep)
    return records


_last_stamp = 0


def _stamp() -> int:
    """Wall-clock nanoseconds, strictly increasing within this process (a per-process
    counter breaks ties of a coarse clock)."""
    global _last_stamp
    _last_stamp = max(time.time_ns(), _last_stamp + 1)
    return _last_stamp


def _record_age(rec: dict, position: tuple[int, int]) -> tuple:
    """Sort key, larger = newer: stamped records by stamp; unstamped (older logs) before
    all stamped ones, a non-failed one beating a failed one, then by (file, line)."""
    stamp = rec.get("logged_ns")
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        return (1, stamp, 0, position)
    return (0, 0, int(rec.get("status") != STATUS_FAILED), position)


def read_split_logs(split_dir: Path) -> dict[str, dict]:
    """All per-sample records of a split (every shard's log), the newest per id (see the
    module docstring: by `logged_ns`, not by file name)."""
    out: dict[str, dict] = {}
    age: dict[str, tuple] = {}
    for fi, f in enumerate(sorted(Path(split_dir).glob("samples*.jsonl"))):
        for li, rec in enumerate(read_log(f)):
            key = str(rec["id"])
            a = _record_age(rec, (fi, li))
            if key not in age or a > age[key]:
                out[key], age[key] = rec, a
    return out


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)


def _base_record(sample: Sample) -> dict:
    rec = {"id": sample.sample_id, "image": str(sample.image), "text": sample.text,
           "instruction": sample.instruction, "group": sample.group}
    rec.update({k: v for k, v in sample.meta.items() if v is not None})
    return rec


def run_sample(predictor: Predictor, sample: Sample, cfg: RunConfig) -> tuple[dict, Result | None]:
    """Run and score one sample; never raises for bad data or engine errors."""
    rec = _base_record(sample)
    gt: GroundTruth | None = None
    gt_error: DataError | None = None
    if sample.load_gt is not None:
        try:
            gt = sample.load_gt()
        except DataError as e:
            gt_error = e
    try:
        if sample.error is not None:  # found while reading the question file (empty expression)
            raise DataError(sample.error)
        rgb = read_rgb(sample.image)  # turned upright by its EXIF orientation, as the release reads it
        if gt_error is not None:
            raise gt_error
    except DataError as e:
        return _failure(rec, f"bad data: {e}", gt), None
    # The release upsamples the mask logits straight to the GT's size; when the (upright)
    # image is sized otherwise (an EXIF-rotated photo, a mislabelled file) we do the
    # same, and say so in the record (summary.json counts them).
    hw = tuple(rgb.shape[:2])
    if gt is not None and tuple(gt.size) != hw:
        rec["resized_to_gt"] = {"image": list(hw), "gt": list(gt.size)}
        hw = tuple(gt.size)
    try:
        t0 = time.perf_counter()
        # key: consecutive queries on one image reuse its encoding (Inst2Seg, gRefCOCO)
        res = predictor.segment_image(rgb, sample.instruction, key=str(sample.image),
                                      score_threshold=cfg.score_threshold,
                                      output_size=hw if "resized_to_gt" in rec else None)
        latency = time.perf_counter() - t0
        if tuple(res.image_size) != hw or res.masks.shape[1:] != hw:
            raise RuntimeError(f"result is {res.masks.shape[1:]} for an expected size of {hw}")
    except Exception as e:  # noqa: BLE001 - the official protocol scores any failure as 0
        return _failure(rec, f"engine error: {type(e).__name__}: {e}", gt), None
    rec.update({
        "latency_s": latency,
        "timings": {k: float(v) for k, v in res.timings.items()},
        "generated_text": res.generated_text,
        "pred_scores": [float(s) for s in res.scores],
        "pred_boxes": [[int(v) for v in b] for b in res.boxes],
        "pred_phrases": list(res.phrases),
        "n_pred": len(res),
        "answer_status": res.status,
    })
    if gt is None:
        rec["status"] = STATUS_PREDICT_ONLY
        return rec, res
    s = score_sample(res.union_mask(), gt.union, gt_box=gt.box, ignore=gt.ignore,
                     formula=cfg.iou)
    rec.update({"status": STATUS_OK, "scores": s.to_dict(), "gt_count": int(len(gt.instances))})
    if cfg.instance_ious:
        if len(res) and len(gt.instances):
            ious = pairwise_mask_iou(res.masks, gt.instances)
        else:
            ious = np.zeros((len(res), len(gt.instances)))
        rec["instance_ious"] = ious.tolist()
    return rec, res


def _failure(rec: dict, reason: str, gt: GroundTruth | None) -> dict:
    gt_area = int(gt.union.sum()) if gt is not None else 0
    rec.update({
        "status": STATUS_FAILED, "reason": reason,
        "scores": failed_sample(gt_area, gt_empty=gt is not None and gt_area == 0).to_dict(),
        "gt_count": int(len(gt.instances)) if gt is not None else None,  # None: GT unreadable
        "pred_scores": [], "n_pred": 0, "instance_ious": [],
    })
    return rec


def _append(fh: Any, rec: dict) -> None:
    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def run_split(predictor: Predictor, samples: Iterable[Sample], cfg: RunConfig, desc: str = "eval") -> RunStats:
    """Run the selected samples of one split, appending to its per-sample log.

    `samples` is the whole split: `cfg.limit` and `cfg.shard` select from it here.
    """
    chosen = select(list(samples), cfg.limit, cfg.shard)
    split_dir = Path(cfg.split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    log = split_dir / log_name(cfg.shard)
    read_log(log, repair=True)  # our own log: drop a line torn by a crash before appending
    done = {
        str(r["id"]) for r in read_split_logs(split_dir).values()
        if not (cfg.retry_failed and r.get("status") == STATUS_FAILED)
    }
    todo = [s for s in chosen if s.sample_id not in done]
    ran = failed = timed = 0
    with open(log, "a", encoding="utf-8") as fh:
        for sample in tqdm(todo, desc=desc, unit="sample", disable=not cfg.progress, dynamic_ncols=True):
            rec, res = run_sample(predictor, sample, cfg)
            if "latency_s" in rec:  # the first inferences of this process warm up
                rec["warmup"] = timed < cfg.warmup
                timed += 1
            if res is not None and cfg.save_masks:
                path = split_dir / "masks" / f"{_safe_name(sample.sample_id)}.png"
                write_label_png(path, res.masks)
                rec["mask_png"] = str(path.relative_to(split_dir))
            rec["logged_ns"] = _stamp()
            _append(fh, rec)
            ran += 1
            failed += rec["status"] == STATUS_FAILED
    return RunStats(selected=len(chosen), skipped=len(chosen) - len(todo), ran=ran, failed=failed)
