"""Train, evaluate and ship the default model: `make train-default`.

    python -m training.default_model                       # the full run (data, stage 1, stage 2, eval)
    python -m training.default_model --pilot               # a short run that shows the learning curves
    python -m training.default_model --ship instructsam_core/default_model   # and install the result
    python -m training.default_model --rescore instructsam_core/default_model   # re-evaluate it, no training

The default model is the `small` preset (the real Qwen3-VL and SAM3 classes, a word-level
tokenizer of the synthetic world) trained from random weights by the project's own
two-stage pipeline on the synthetic tabletop world (`training/tabletop.py`): stage 1 on
referring instructions (category, colour, attribute, no target), stage 2 on every kind.
Every step is resumable: the data are written once (deterministic from their seeds), each
stage resumes from its last checkpoint, and a finished stage is not run again.

The result is evaluated on a held-out split (other seeds, plus colour/kind combinations
never seen in training) through the engine, as shipped (bf16 weights, run in fp32 on the
CPU), next to the untrained model; the model card (MODEL_CARD.md) and the scores
(scores.json) go beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructsam_core.fileio import atomic_directory, write_text_atomic
from instructsam_core.world import INSTRUCTION_KINDS, TRAINED_TEMPLATE
from training import tabletop
from training.config import load_config

log = logging.getLogger("instructsam.default_model")

CONFIGS = Path(__file__).resolve().parent / "configs"
CI_SCENES = 40  # the first held-out scenes, which CI re-evaluates (tests/training/test_default_model.py)


@dataclass(frozen=True)
class Plan:
    """How much data and training a run gets."""

    stage1_scenes: int
    stage2_scenes: int
    stage1_steps: int
    stage2_steps: int
    heldout_scenes: int = 300
    val_scenes: int = 60


FULL = Plan(stage1_scenes=4000, stage2_scenes=4000, stage1_steps=6500, stage2_steps=2500)
PILOT = Plan(stage1_scenes=1500, stage2_scenes=1000, stage1_steps=1500, stage2_steps=400, heldout_scenes=60)

# The engine settings the default model ships with (engine_config.json beside its weights;
# its evaluation, and the untrained model's, run with them too). Its K slots predict
# nearly the same mask (docs/training.md, "Where it stands"), so mask NMS keeps one of the
# equal masks; its data ask every instruction in one form, so the engine puts plain ones
# in it (`instruction_template`). The score threshold is chosen per model (`choose_threshold`).
ENGINE_DEFAULTS = {"mask_nms_iou": 0.7, "instruction_template": TRAINED_TEMPLATE}

# The score thresholds tried on the validation split with every kind (`val_all`). The
# release's score target (the matched slot's Dice, 0 for the others) teaches K slots that
# agree to score about Dice/K each: 0.01-0.05 with a target, under 0.005 without, so the
# grid is fine at the low end.
THRESHOLD_GRID = (0.002, 0.003, 0.004, 0.005, 0.0065, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5)


def choose_threshold(sweep: dict[float, dict]) -> float:
    """The score threshold of a validation sweep (`tabletop.evaluate_thresholds`) with the
    best gIoU (GRES's: the mean per-instruction IoU, an instruction without a target scoring
    1 when answered empty, so the masks and the empty answers are judged together); ties go
    to the higher threshold (fewer false instances)."""
    if not sweep:
        raise ValueError("choose_threshold needs a sweep of at least one threshold")
    return max(sweep, key=lambda t: (round(sweep[t]["giou"], 6), t))


# Seeds of each split: disjoint ranges, so no held-out scene is ever a training scene.
# `val` (the stage-1 kinds, as stage 1 trains) is what training validates on; `val_all`
# (every kind, as the held-out split) is where the engine's score threshold is chosen.
SEEDS = {"stage1": 0, "stage2": 100_000, "val": 500_000, "val_all": 600_000, "heldout": 1_000_000}
SPLIT_KINDS = {"stage1": tabletop.STAGE1_KINDS, "val": tabletop.STAGE1_KINDS}  # the others: every kind


def write_ci_split(root: Path) -> Path:
    """The first `CI_SCENES` held-out scenes as a split of their own (`heldout_ci.json`):
    the same scenes and instructions as the head of the held-out split."""
    start = SEEDS["heldout"]
    return tabletop.write_split(root, "heldout_ci", range(start, start + CI_SCENES), held_out=True)


def write_data(root: Path, plan: Plan) -> dict[str, Path]:
    """The splits of `plan` under `root`, each written once: the manifest records what
    each file holds (its seeds and scene count), so a split added or resized later is
    written alone and the others are kept."""
    manifest_file = root / "manifest.json"
    counts = {"stage1": plan.stage1_scenes, "stage2": plan.stage2_scenes, "val": plan.val_scenes,
              "val_all": plan.val_scenes, "heldout": plan.heldout_scenes, "heldout_ci": CI_SCENES}
    wanted = {name: {"first_seed": SEEDS["heldout" if name == "heldout_ci" else name], "scenes": n}
              for name, n in counts.items()}
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    paths = {name: root / f"{name}.json" for name in wanted}
    for name, entry in wanted.items():
        if manifest.get(name) == entry and paths[name].is_file():
            continue
        log.info("writing the synthetic tabletop split %s (%d scenes) to %s", name, entry["scenes"], root)
        if name == "heldout_ci":
            write_ci_split(root)
        else:
            seeds = range(entry["first_seed"], entry["first_seed"] + entry["scenes"])
            tabletop.write_split(root, name, seeds, kinds=SPLIT_KINDS.get(name, INSTRUCTION_KINDS),
                                 held_out=name == "heldout")
        manifest[name] = entry
        write_text_atomic(manifest_file, json.dumps(manifest, indent=1))  # after each split: a stop loses one at most
    return paths


def run_stage(config: str, out_dir: Path, overrides: list[str]) -> Path:
    """One training stage (resumed if it was stopped; skipped if it finished); its final checkpoint."""
    from training.train import train

    final = out_dir / "final"
    if (final / "config.json").is_file():
        log.info("%s is done (%s)", config, final)
        return final
    cfg = load_config(CONFIGS / config, [f"loop.out_dir={out_dir}", *overrides])
    summary = train(cfg)
    if not summary["finished"]:
        raise SystemExit(f"{config} stopped at step {summary['step']}; run the command again to resume")
    return final


def training_seconds(stage_dir: Path) -> float:
    """Training time of a stage from its per-step log (each row's samples / samples_per_s),
    so a stage resumed over several invocations still reports its whole time; evaluation
    inside the stage is not counted."""
    cfg = load_config(stage_dir / "config.yaml")
    per_step = cfg.loop.batch_size * cfg.loop.grad_accum
    step_seconds: dict[int, float] = {}  # by step: a resumed stage logs its redone steps again
    with open(stage_dir / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("samples_per_s"):
                step_seconds[row["step"]] = per_step / row["samples_per_s"]
    return sum(step_seconds.values())


def export_bf16(checkpoint: Path, out_dir: Path) -> Path:
    """The checkpoint with its weights stored in bf16 (what ships: half the bytes); `score`
    then writes its engine settings."""
    from instructsam_core.build import build_model
    from instructsam_core.checkpoint import save_checkpoint

    built = build_model(checkpoint, device="cpu", dtype="bfloat16")
    return save_checkpoint(built.model, built.tokenizer, out_dir)


def _segmenter(checkpoint: Path | str, **engine_options):
    from instructsam_core.engine import Segmenter

    return Segmenter.from_pretrained(str(checkpoint), device="cpu", dtype="float32", **engine_options)  # as CI runs it


def evaluate(checkpoint: Path | str, split: Path, progress: bool = True) -> dict:
    """Scores of a checkpoint on a split through the engine as its engine_config.json sets
    it (fp32 on the CPU, as CI runs it)."""
    return tabletop.evaluate(_segmenter(checkpoint), split, progress=progress)


def evaluate_untrained(heldout: Path, score_threshold: float) -> dict:
    """The untrained `small` model on the same split, given the expression as its phrase
    (it cannot write one): the baseline the card compares with, run as the trained one is."""
    from instructsam_core.engine import Segmenter

    seg = Segmenter.from_config("small", device="cpu", dtype="float32", score_threshold=score_threshold,
                                **ENGINE_DEFAULTS)
    return tabletop.evaluate(seg, heldout, force_phrase=True, progress=True)


def _accuracy_row(scores: dict) -> dict:
    """What a threshold trades: gIoU, N-acc, T-acc, multi-instance mAP and the goal's mIoU kinds."""
    kinds = scores["kinds"]
    return {**{key: scores[key] for key in ("giou", "n_acc", "t_acc", "multi_map")},
            **{f"{k}_miou": kinds[k]["miou"] for k in ("colour", "attribute") if k in kinds}}


def score(model_dir: Path, data: dict[str, Path], record: dict) -> dict:
    """Choose the exported model's score threshold on the every-kind validation split and
    write its engine_config.json, then evaluate it there (held-out split, CI subset, the
    untrained baseline) and write its scores.json and model card; `record` says how it was
    trained. The held-out split is scored at every threshold of the grid too, for the
    card's trade-off table: shown, never used to choose."""
    from instructsam_core.checkpoint import ENGINE_CONFIG_NAME
    from training.model_card import write_model_card

    start = time.perf_counter()
    # Every threshold is given explicitly, so one segmenter with the shipped settings
    # serves both sweeps; the CI subset below runs through the written engine_config.json.
    segmenter = _segmenter(model_dir, **ENGINE_DEFAULTS)
    val_sweep = tabletop.evaluate_thresholds(segmenter, data["val_all"], THRESHOLD_GRID, progress=True)
    threshold = choose_threshold(val_sweep)
    log.info("score threshold %g: the best gIoU on %s", threshold, data["val_all"].name)
    write_text_atomic(model_dir / ENGINE_CONFIG_NAME,
                      json.dumps({**ENGINE_DEFAULTS, "score_threshold": threshold}, indent=1))
    heldout_sweep = tabletop.evaluate_thresholds(segmenter, data["heldout"], THRESHOLD_GRID, progress=True)
    scores = {"threshold": {"chosen": threshold, "rule": "best gIoU on val_all",
                            "val_all": {str(t): _accuracy_row(v) for t, v in val_sweep.items()},
                            "heldout": {str(t): _accuracy_row(v) for t, v in heldout_sweep.items()}},
              "heldout": heldout_sweep[threshold],
              "ci_subset": evaluate(model_dir, data["heldout_ci"], progress=False),
              "untrained": evaluate_untrained(data["heldout"], threshold)}
    record = {**record, "times_s": {**record["times_s"], "evaluate": time.perf_counter() - start}, **scores}
    write_text_atomic(model_dir / "scores.json", json.dumps(record, indent=1))
    write_model_card(model_dir, record)
    return record


def rescore(model_dir: Path, data: dict[str, Path]) -> dict:
    """The exported model in `model_dir` scored again under today's `ENGINE_DEFAULTS` and
    threshold rule (its engine_config.json rewritten), its training record (plan, times,
    machine) kept: a change of engine settings updates the card without retraining."""
    scores_file = model_dir / "scores.json"
    if not scores_file.is_file():
        raise SystemExit(f"error: {scores_file} not found: --rescore takes a model this script exported")
    trained = {k: v for k, v in json.loads(scores_file.read_text()).items()
               if k not in ("heldout", "ci_subset", "untrained", "threshold")}
    return score(model_dir, data, trained)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch thread{'s' * (threads != 1)}, no GPU used"


def _command(args: argparse.Namespace) -> str:
    """The command that trained a model, for its card: the make target for the shipped recipe."""
    if not args.stage1_overrides:
        return "make train-default" + (" (--pilot)" if args.pilot else "")
    return ("python -m training.default_model" + " --pilot" * args.pilot
            + "".join(f" --set {o}" for o in args.stage1_overrides))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.default_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/default_model", help="run folder (data, stages, result)")
    p.add_argument("--pilot", action="store_true", help="a short run (about 15 minutes) with its learning curves")
    p.add_argument("--ship", default="", help="also install the result here (e.g. instructsam_core/default_model)")
    p.add_argument("--rescore", default="", metavar="MODEL_DIR",
                   help="no training: evaluate this exported model again with ENGINE_DEFAULTS and rewrite its "
                        "engine_config.json, scores.json and model card (after a change of engine settings)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="stage1_overrides",
                   help="a config override for stage 1 (repeatable; e.g. model.fusion_layers=4): an experiment, "
                        "not the shipped recipe; stage 2 keeps the architecture and head options stage 1 saved")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = PILOT if args.pilot else FULL
    out = Path(args.out) / ("pilot" if args.pilot else "full")
    if args.rescore:
        record = rescore(Path(args.rescore), write_data(out / "data", plan))
        print(json.dumps({"model": args.rescore, "heldout": record["heldout"]}, indent=1))
        return 0
    times: dict[str, float] = {}

    start = time.perf_counter()
    data = write_data(out / "data", plan)
    data_seconds = time.perf_counter() - start
    if data_seconds > 1.0:  # else an earlier invocation wrote them, and its time is not known
        times["data"] = data_seconds
    common = [f"data.val=[{{kind: grefcoco, path: {data['val']}}}]"]

    stage1 = run_stage("small_stage1.yaml", out / "stage1",
                       [f"data.train=[{{kind: grefcoco, path: {data['stage1']}}}]", f"loop.max_steps={plan.stage1_steps}",
                        *common, *args.stage1_overrides])
    times["stage1"] = training_seconds(out / "stage1")
    stage2 = run_stage("small_stage2.yaml", out / "stage2",
                       [f"model.checkpoint={stage1}", f"data.train=[{{kind: grefcoco, path: {data['stage2']}}}]",
                        f"loop.max_steps={plan.stage2_steps}", *common])
    times["stage2"] = training_seconds(out / "stage2")

    shipped = export_bf16(stage2, out / "model")
    from training.curves import plot_curves

    plot_curves([out / "stage1" / "metrics.jsonl", out / "stage2" / "metrics.jsonl"], shipped / "curves.png")
    record = score(shipped, data, {"plan": plan.__dict__, "seeds": SEEDS, "ci_scenes": CI_SCENES, "times_s": times,
                                   "machine": machine(),
                                   "command": _command(args)})
    print(json.dumps({"model": str(shipped), "times_s": record["times_s"], "heldout": record["heldout"]}, indent=1))
    if args.ship:
        with atomic_directory(args.ship) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        print(f"installed the model in {args.ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
