"""Summaries of per-sample logs: metrics, groups, latency, run info, Markdown table."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from instructsam_core.fileio import write_text_atomic
from training.eval.runner import STATUS_FAILED, STATUS_OK, STATUS_PREDICT_ONLY
from training.metrics import IouFormula, InstanceAPAccumulator, SampleScores, SegmentationAccumulator


@dataclass(frozen=True)
class BenchmarkSpec:
    """How a benchmark runs and reports.

    Attributes:
        name: benchmark name (summary, table).
        title: name in the Markdown table.
        score_threshold: default slot threshold of the paper's evaluation.
        iou: the per-sample IoU and cIoU formula (`training.metrics.IouFormula`).
        instance_ious: whether instance mAP is computed (logs per-instance IoUs).
        mean_iou_name: what the mean per-sample IoU is called ('miou' or 'giou').
        group_by: 'group' (the reader's group: scene, short/long) or 'targets'
            (no-target / single / multi from the GT instance count).
        paper: split (or '*' for any) -> metric key -> the paper's number, in percent.
        headline: (metric key, label) rows of the Markdown table, in order.
        table_groups: also list each group's headline metrics in the table (strata);
            otherwise groups appear in summary.json only (RoboRefIt's scenes).
    """

    name: str
    title: str
    score_threshold: float
    iou: IouFormula
    instance_ious: bool
    mean_iou_name: str
    group_by: str
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    headline: tuple[tuple[str, str], ...] = ()
    table_groups: bool = False


# --------------------------------------------------------------------------- files, run info


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON atomically (`fileio.write_text_atomic`); NaN becomes null."""
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)  # NaN (undefined) -> null
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def git_revision(path: Path | None = None) -> dict | None:
    """{commit, dirty} of the git checkout holding this package, or None outside one."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def run_info(predictor: Any) -> dict:
    """Device, dtype, checkpoint, untrained flag and engine settings of the predictor
    (when it has them)."""
    dtype = getattr(predictor, "dtype", None)
    config = getattr(predictor, "config", None)
    return {
        "engine_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "device": str(getattr(predictor, "device", "unknown")),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "unknown",
        "checkpoint": str(getattr(predictor, "checkpoint", "unknown")),
        "untrained": bool(getattr(predictor, "is_untrained", False)),
    }


# --------------------------------------------------------------------------- metrics


def _stats(values: list[float]) -> dict | None:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"n_timed": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99)}


def latency_stats(records: Iterable[dict]) -> dict | None:
    """Latency in seconds over run samples, warm-up excluded: mean/p50/p90/p99 of the wall
    time of each query (`latency_s`), and apart, from the engine's timings, the image
    encoding (queries that encoded a new image) and the per-instruction rest."""
    timed = [r for r in records if "latency_s" in r and not r.get("warmup")]
    out = _stats([r["latency_s"] for r in timed])
    if out is None:
        return None
    enc = [r["timings"]["image_encode"] for r in timed if r.get("timings", {}).get("image_encode", 0) > 0]
    instr = [r["timings"]["total"] - r["timings"].get("image_encode", 0.0) for r in timed
             if "total" in r.get("timings", {})]
    out["image_encode"] = _stats(enc)
    out["per_instruction"] = _stats(instr)
    return out


def _scored(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("status") in (STATUS_OK, STATUS_FAILED)]


def segmentation_metrics(records: list[dict], spec: BenchmarkSpec) -> dict | None:
    """Referring-segmentation metrics (and instance mAP if the spec has it); None if no
    sample has GT."""
    scored = _scored(records)
    if not scored:
        return None
    acc = SegmentationAccumulator(spec.iou)
    for r in scored:
        acc.add_scores(SampleScores(**r["scores"]))
    raw = acc.summary()
    out: dict = {"n": raw.pop("n"), "failures": raw.pop("failures"), spec.mean_iou_name: raw.pop("mean_iou")}
    out.update(raw)
    if spec.instance_ious:
        ap = InstanceAPAccumulator()
        for r in scored:
            g = r.get("gt_count") or 0
            ious = np.asarray(r.get("instance_ious") or [], dtype=np.float64).reshape(len(r["pred_scores"]), g)
            ap.add_ious(r["pred_scores"], ious)
        out.update(ap.compute())
    return out


def target_group(gt_count: int | None) -> str:
    """Inst2Seg / gRefCOCO stratum of a sample from its number of GT instances."""
    if gt_count is None:
        return "unknown"
    return "no-target" if gt_count == 0 else ("single" if gt_count == 1 else "multi")


def group_records(records: list[dict], spec: BenchmarkSpec) -> dict[str, list[dict]]:
    """Records per reporting group (empty if the benchmark has none)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if spec.group_by == "targets":
            if r.get("status") != STATUS_PREDICT_ONLY:
                groups[target_group(r.get("gt_count"))].append(r)
        elif r.get("group") is not None:
            groups[str(r["group"])].append(r)
    if spec.group_by == "targets":
        order = ("single", "multi", "no-target", "unknown")
        return {g: groups[g] for g in order if g in groups}
    return dict(sorted(groups.items()))


def summarize_split(spec: BenchmarkSpec, split: str, records: dict[str, dict], expected_ids: list[str],
                    info: dict, config: dict) -> dict:
    """summary.json content of one split from its per-sample records.

    Only records of `expected_ids` (the split after --limit, all shards) count.
    """
    recs = [records[i] for i in expected_ids if i in records]
    failed = [r for r in recs if r.get("status") == STATUS_FAILED]
    groups = group_records(recs, spec)
    return {
        "benchmark": spec.name,
        "split": split,
        "n_expected": len(expected_ids),
        "n_done": len(recs),
        "complete": len(recs) == len(expected_ids),
        "n": len(_scored(recs)),
        "n_predict_only": sum(r.get("status") == STATUS_PREDICT_ONLY for r in recs),
        "failures": len(failed),
        "failed_samples": [{"id": r["id"], "image": r.get("image"), "reason": r.get("reason")} for r in failed],
        # predictions resized to a GT sized otherwise than the (EXIF-upright) image
        "resized_to_gt": sum("resized_to_gt" in r for r in recs),
        "answer_status": dict(Counter(r["answer_status"] for r in recs if "answer_status" in r)),
        "metrics": segmentation_metrics(recs, spec),
        "groups": {g: {"n": len(_scored(rs)), "metrics": segmentation_metrics(rs, spec)} for g, rs in groups.items()},
        "latency_s": latency_stats(recs),
        **info,
        "git": git_revision(),
        "config": config,
        "paper": paper_numbers(spec, split),
    }


def paper_numbers(spec: BenchmarkSpec, split: str) -> dict[str, float]:
    """The paper's numbers (percent) for this split, if it reports any.

    A split named like a question file (``reason_seg_val``) matches the paper's ``val``.
    """
    if split in spec.paper:
        return dict(spec.paper[split])
    for key, numbers in spec.paper.items():
        if key != "*" and split.lower().endswith("_" + key.lower()):
            return dict(numbers)
    return dict(spec.paper.get("*", {}))


# --------------------------------------------------------------------------- Markdown


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * float(v):.1f}"


def markdown_table(summaries: list[dict], specs: dict[str, BenchmarkSpec]) -> str:
    """A Markdown table of each summary's headline metrics next to the paper's numbers."""
    lines = ["| Benchmark | Split | Metric | This run | Paper | N | Failures |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in summaries:
        spec = specs[s["benchmark"]]
        m = s.get("metrics") or {}
        for key, label in spec.headline:
            paper = s.get("paper", {}).get(key)
            lines.append(
                f"| {spec.title} | {s['split']} | {label} | {_pct(m.get(key))} | "
                f"{'—' if paper is None else f'{paper:.1f}'} | {s['n']} | {s['failures']} |"
            )
        if spec.table_groups:
            for g, gs in s.get("groups", {}).items():
                gm = gs.get("metrics") or {}
                for key, label in spec.headline:
                    v = gm.get(key)
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        lines.append(f"| {spec.title} | {s['split']} / {g} | {label} | {_pct(v)} | — | "
                                     f"{gs['n']} | {gm.get('failures', 0)} |")
    notes = []
    if any(s.get("untrained") for s in summaries):
        notes.append("untrained model: numbers are meaningless")
    if any(not s.get("complete", True) for s in summaries):
        notes.append("some splits are incomplete (sharded or interrupted run)")
    if notes:
        lines.append("")
        lines.extend(f"Note: {n}." for n in notes)
    return "\n".join(lines)
