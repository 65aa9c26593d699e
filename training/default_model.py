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
# its evaluation, and the untrained model's, run with them too). Its K slots predict the
# same mask (docs/training.md, "Where it stands"), and the release's score target (the
# matched slot's Dice, 0 for the others) then teaches each to score about Dice/K: 0.01-0.05
# with a target, under 0.005 without. So: mask NMS keeps one of the equal masks, and the
# threshold is 0.01, the one of 0.1, 0.05, 0.03, 0.02, 0.01, 0.005 with the best T-acc on
# the validation split (never the held-out one) while N-acc stays 1.0. Its data ask every
# instruction in one form, so the engine puts plain ones in it (`instruction_template`).
ENGINE_DEFAULTS = {"mask_nms_iou": 0.7, "score_threshold": 0.01, "instruction_template": TRAINED_TEMPLATE}

# Seeds of each split: disjoint ranges, so no held-out scene is ever a training scene.
SEEDS = {"stage1": 0, "stage2": 100_000, "val": 500_000, "heldout": 1_000_000}


def write_ci_split(root: Path) -> Path:
    """The first `CI_SCENES` held-out scenes as a split of their own (`heldout_ci.json`):
    the same scenes and instructions as the head of the held-out split."""
    start = SEEDS["heldout"]
    return tabletop.write_split(root, "heldout_ci", range(start, start + CI_SCENES), held_out=True)


def write_data(root: Path, plan: Plan) -> dict[str, Path]:
    """The splits of `plan` under `root` (written once; a manifest says what is there)."""
    manifest = root / "manifest.json"
    counts = {"stage1": plan.stage1_scenes, "stage2": plan.stage2_scenes, "val": plan.val_scenes,
              "heldout": plan.heldout_scenes}
    # The scenes only: a plan that changes its steps keeps its data.
    wanted = {"scenes": counts, "seeds": SEEDS, "ci_scenes": CI_SCENES}
    paths = {name: root / f"{name}.json" for name in [*SEEDS, "heldout_ci"]}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(p.is_file() for p in paths.values()):
        return paths
    log.info("writing the synthetic tabletop data to %s", root)
    for name, start in SEEDS.items():
        seeds = range(start, start + counts[name])
        kinds = tabletop.STAGE1_KINDS if name in ("stage1", "val") else INSTRUCTION_KINDS
        tabletop.write_split(root, name, seeds, kinds=kinds, held_out=name == "heldout")
    write_ci_split(root)
    write_text_atomic(manifest, json.dumps(wanted, indent=1))
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
    """The checkpoint with its weights stored in bf16 (what ships: half the bytes) and its
    engine settings (`ENGINE_DEFAULTS`)."""
    from instructsam_core.build import build_model
    from instructsam_core.checkpoint import ENGINE_CONFIG_NAME, save_checkpoint

    built = build_model(checkpoint, device="cpu", dtype="bfloat16")
    shipped = save_checkpoint(built.model, built.tokenizer, out_dir)
    write_text_atomic(shipped / ENGINE_CONFIG_NAME, json.dumps(ENGINE_DEFAULTS, indent=1))
    return shipped


def evaluate(checkpoint: Path | str, split: Path, progress: bool = True) -> dict:
    """Scores of a checkpoint on a split through the engine (fp32 on the CPU, as CI runs it)."""
    from instructsam_core.engine import Segmenter

    seg = Segmenter.from_pretrained(str(checkpoint), device="cpu", dtype="float32")
    return tabletop.evaluate(seg, split, progress=progress)


def evaluate_untrained(heldout: Path) -> dict:
    """The untrained `small` model on the same split, given the expression as its phrase
    (it cannot write one): the baseline the card compares with."""
    from instructsam_core.engine import Segmenter

    seg = Segmenter.from_config("small", device="cpu", dtype="float32", **ENGINE_DEFAULTS)  # as the trained one runs
    return tabletop.evaluate(seg, heldout, force_phrase=True, progress=True)


def score(model_dir: Path, data: dict[str, Path], record: dict) -> dict:
    """Evaluate an exported model (held-out split, CI subset, the untrained baseline) and
    write its scores.json and model card; `record` says how it was trained."""
    from training.model_card import write_model_card

    start = time.perf_counter()
    scores = {"heldout": evaluate(model_dir, data["heldout"]),
              "ci_subset": evaluate(model_dir, data["heldout_ci"], progress=False),
              "untrained": evaluate_untrained(data["heldout"])}
    record = {**record, "times_s": {**record["times_s"], "evaluate": time.perf_counter() - start}, **scores}
    write_text_atomic(model_dir / "scores.json", json.dumps(record, indent=1))
    write_model_card(model_dir, record)
    return record


def rescore(model_dir: Path, data: dict[str, Path]) -> dict:
    """The exported model in `model_dir` scored again under today's `ENGINE_DEFAULTS`
    (written as its engine_config.json), its training record (plan, times, machine) kept:
    a change of engine settings updates the card without retraining."""
    from instructsam_core.checkpoint import ENGINE_CONFIG_NAME

    scores_file = model_dir / "scores.json"
    if not scores_file.is_file():
        raise SystemExit(f"error: {scores_file} not found: --rescore takes a model this script exported")
    trained = {k: v for k, v in json.loads(scores_file.read_text()).items()
               if k not in ("heldout", "ci_subset", "untrained")}
    write_text_atomic(model_dir / ENGINE_CONFIG_NAME, json.dumps(ENGINE_DEFAULTS, indent=1))
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
                        *common])
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
                                   "command": "make train-default" + (" (--pilot)" if args.pilot else "")})
    print(json.dumps({"model": str(shipped), "times_s": record["times_s"], "heldout": record["heldout"]}, indent=1))
    if args.ship:
        with atomic_directory(args.ship) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        print(f"installed the model in {args.ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
