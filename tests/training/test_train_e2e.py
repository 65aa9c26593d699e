"""Training end to end on the CPU with the tiny model: stage 1 overfits four samples, the
merge, stage 2 from the merged stage 1, the results load in the engine; runs stopped or
killed (also during a checkpoint write) resume where they were."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.eval.synthetic import write_grefcoco_scenes, write_roborefit_scenes
from training.train import main, train

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"
LOSS_TOL = dict(rel=1e-6, abs=1e-7)  # CPU float32: a resumed run repeats the same arithmetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    write_roborefit_scenes(root / "rr", n=4, size=(64, 64))
    grefcoco = write_grefcoco_scenes(root / "gr", n=2, size=(64, 64))
    return root / "rr", grefcoco


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_two_stages_overfit_merge_and_load_in_the_engine(data, tmp_path):
    from instructsam_core.engine import Segmenter
    from instructsam_core.processing import load_rgb
    from training.eval.roborefit import read_roborefit, roborefit_official_file

    roborefit, grefcoco = data
    s1 = tmp_path / "stage1"
    summary = train(load_config(CONFIGS / "tiny_stage1.yaml", [
        f"data.train=[{{kind: roborefit, path: {roborefit}}}]", f"loop.out_dir={s1}", "loop.progress=false"]))
    assert summary["finished"] and summary["step"] == 300 and summary["skipped"] == {}
    metrics = _metrics(s1)
    assert metrics[300]["loss"] < 0.4 * metrics[1]["loss"]  # the loss falls
    overfit = np.mean([metrics[s]["mask_iou"] for s in range(276, 301)])
    assert overfit >= 0.9, f"matched-mask IoU {overfit:.3f} over the last 25 steps"  # at the 32x32 mask size
    assert list((s1 / "tensorboard").glob("events.out.tfevents.*"))

    # the stage's result is a released-layout checkpoint: the engine segments those images
    seg = Segmenter.from_pretrained(str(s1 / "final"), device="cpu")
    assert not seg.is_untrained and seg.phrase_mode == "generate"
    samples = read_roborefit(roborefit_official_file(roborefit, "train"), roborefit, "official")
    ious = []
    for sample in samples:
        result = seg.segment_image(load_rgb(sample.image), sample.instruction, phrase=sample.text)
        gt = sample.load_gt().union
        pred = result.union_mask()
        ious.append((pred & gt).sum() / max(1, (pred | gt).sum()))
    # at 64x64 pixels from the tiny model's 32x32 masks (the upsampling costs ~0.1)
    assert np.mean(ious) >= 0.75, ious

    # the merge command gives the same weights as the run's own result
    assert main(["merge", str(s1), str(tmp_path / "merged")]) == 0
    a, b = load_file(str(s1 / "final" / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # stage 2 starts from the merged stage 1, on multi-instance and no-target phrases
    s2 = tmp_path / "stage2"
    summary = train(load_config(CONFIGS / "tiny_stage2.yaml", [
        f"model.checkpoint={tmp_path / 'merged'}", f"data.train=[{{kind: grefcoco, path: {grefcoco}}}]",
        f"data.val=[{{kind: grefcoco, path: {grefcoco}}}]", "loop.max_steps=20", f"loop.out_dir={s2}",
        "loop.progress=false", "loop.tensorboard=false"]))
    metrics = _metrics(s2)
    assert summary["finished"] and metrics[20]["loss"] < metrics[1]["loss"]
    evals = [json.loads(line)["eval"] for line in (s2 / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert evals and set(evals[-1]) >= {"loss", "mask_iou"}
    result = Segmenter.from_pretrained(str(s2 / "final"), device="cpu").segment_image(
        load_rgb(samples[0].image), "Can you segment 'the mugs' in the image?", phrase="the mugs")
    assert result.status == "ok" and result.target_phrases == ["the mugs"]


def _short(roborefit: Path, out: Path, *extra: str):
    return load_config(CONFIGS / "tiny_stage1.yaml", [
        f"data.train=[{{kind: roborefit, path: {roborefit}}}]", f"loop.out_dir={out}", "loop.max_steps=6",
        "loop.batch_size=2", "loop.checkpoint_every=2", "loop.log_every=1", "loop.progress=false",
        "loop.tensorboard=false", "loss.num_points=64", "model.lora_dropout=0.1", *extra])


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(_short(data[0], run))
    return _metrics(run)


def test_a_stopped_run_resumes_where_it_was(data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    first = train(_short(data[0], run, "loop.stop_after=3"))
    assert not first["finished"] and first["step"] == 3 and first["final"] is None
    second = train(_short(data[0], run))
    assert second["finished"] and second["step"] == 6
    resumed = _metrics(run)
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], **LOSS_TOL), step


def test_a_run_killed_during_a_checkpoint_write_resumes_from_the_last_complete_one(data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    cfg_file = tmp_path / "config.yaml"
    from training.config import save_config

    save_config(_short(data[0], run), cfg_file)
    # SIGKILL this process in the middle of writing step 4's checkpoint
    script = (
        "import os, signal, sys\n"
        "import training.checkpoints as ck\n"
        "real = ck.save_file\n"
        "def save_then_die(tensors, path, *a, **k):\n"
        "    real(tensors, path, *a, **k)\n"
        "    if 'step-000004' in str(path):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "ck.save_file = save_then_die\n"
        "from training.train import main\n"
        f"sys.exit(main(['--config', {str(cfg_file)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000002"]
    assert any(p.name.startswith(".step-000004") for p in checkpoints.iterdir())  # the torn write, hidden
    summary = train(load_config(cfg_file))
    assert summary["finished"] and not any(p.name.startswith(".") for p in checkpoints.iterdir())
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert logged == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 ran twice but are logged once, as resumed
    resumed = _metrics(run)
    for step in (3, 4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], **LOSS_TOL), step


def test_activation_checkpointing_gives_the_same_losses(data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    train(_short(data[0], run, "loop.max_steps=2", "model.gradient_checkpointing=true"))
    ckpt = _metrics(run)  # the schedule is shorter, but steps 1 and 2 see the same weights and lr
    for step in (1, 2):
        assert ckpt[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step


def test_a_resume_with_another_recipe_is_refused(data, tmp_path):
    run = tmp_path / "run"
    train(_short(data[0], run, "loop.stop_after=2"))
    with pytest.raises(ValueError, match="another configuration \\(optim.llm_lr"):
        train(_short(data[0], run, "optim.llm_lr=1e-2"))


def test_a_setting_added_since_the_run_started_takes_its_default_on_resume(data, tmp_path):
    run = tmp_path / "run"
    train(_short(data[0], run, "loop.stop_after=2"))
    saved = run / "config.yaml"
    lines = saved.read_text().splitlines()
    assert any("score_target:" in line for line in lines)
    saved.write_text("\n".join(line for line in lines if "score_target:" not in line) + "\n")  # an older run's file
    assert train(_short(data[0], run))["finished"]


def test_a_run_saved_with_the_old_head_option_defaults_resumes(data, tmp_path):
    run = tmp_path / "run"
    train(_short(data[0], run, "loop.stop_after=2"))
    saved = run / "config.yaml"
    text = saved.read_text()
    assert "fusion_output_norm: null" in text and "fusion_norm_scope: null" in text
    # What runs wrote before "unset" existed: the same settings, spelled as the presets' own.
    saved.write_text(text.replace("fusion_output_norm: null", "fusion_output_norm: false")
                     .replace("fusion_norm_scope: null", "fusion_norm_scope: all"))
    assert train(_short(data[0], run))["finished"]
    saved.write_text(saved.read_text().replace("fusion_output_norm: false", "fusion_output_norm: true"))
    with pytest.raises(ValueError, match="another configuration \\(model.fusion_output_norm differ"):
        train(_short(data[0], run))  # a real change still is one


def test_the_slot_spread_loss_and_the_fusion_output_norm_train_and_reach_the_checkpoint(data, tmp_path):
    from instructsam_core.build import build_model

    run = tmp_path / "run"
    assert train(_short(data[0], run, "loss.slot_spread=1.0", "model.fusion_output_norm=true",
                        "loss.unmatched_mask=1.0"))["finished"]
    rows = _metrics(run)
    spreads = [rows[s]["slot_spread"] for s in sorted(rows)]
    assert all(0.0 <= v <= 1.0 for v in spreads) and len(spreads) == 6
    unmatched = [rows[s]["unmatched_mask"] for s in sorted(rows)]  # logged, a real BCE (untrained slots overlap)
    assert len(unmatched) == 6 and all(math.isfinite(v) and v > 0 for v in unmatched)
    assert build_model(run / "final", device="cpu").model.config.fusion_output_norm  # inference applies it too
