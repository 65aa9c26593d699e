"""End to end through the real engine (the tiny untrained model, threshold 0 so that
instances really flow): the benchmark CLIs on synthetic fixtures in the official formats,
and the real RoboRefIt frame in shared/data/roborefit_example/ as a smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from training.eval import grefcoco, inst2seg, reasonseg, roborefit
from training.eval.runner import read_log
from training.eval.synthetic import write_grefcoco, write_inst2seg, write_reasonseg, write_roborefit_official

REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_roborefit_cli_runs_both_splits_and_resumes(tmp_path, capsys):
    for split in ("testA", "testB"):
        write_roborefit_official(tmp_path / "data", split, n=2)
    out = tmp_path / "out"
    args = ["--checkpoint", "tiny", "--data-root", str(tmp_path / "data"), "--output-dir", str(out),
            "--threshold", "0", "--save-masks", "--no-progress", "--warmup", "1"]
    assert roborefit.main(args) == 0
    table = capsys.readouterr().out
    assert "| RoboRefIt | testA | mask mIoU (%) |" in table and "| 74.4 |" in table
    assert "untrained model" in table
    for split in ("testA", "testB"):
        s = json.loads((out / split / "summary.json").read_text())
        assert s["n"] == 2 and s["failures"] == 0 and s["complete"] and s["untrained"]
        assert s["device"] == "cpu" and s["dtype"] == "float32" and s["checkpoint"] == "tiny"
        assert s["config"]["threshold"] == 0.0
        # the official protocol: no duplicate suppression, the official generation budget
        assert s["engine_config"]["mask_nms_iou"] is None and s["engine_config"]["max_new_tokens"] == 1024
        m = s["metrics"]
        assert 0.0 <= m["miou"] <= 1.0 and {"ciou", "p@0.5", "p@0.7", "p@0.9", "box_acc@0.5", "box_miou",
                                              "empty_pred_rate"} <= set(m)
        assert set(s["groups"]) == {"scene_0", "scene_1"}
        assert s["latency_s"]["n_timed"] == 1  # the first sample is warm-up
        recs = read_log(out / split / "samples.jsonl")
        assert any(r["n_pred"] > 0 for r in recs), "threshold 0 should let instances through"
        for r in recs:
            assert (out / split / r["mask_png"]).is_file()
            assert r["instruction"].endswith("Please output the segmentation mask.")
    assert (out / "results.md").read_text().startswith("| Benchmark |")
    # a rerun finds everything done and appends nothing
    assert roborefit.main(args) == 0
    assert _lines(out / "testA" / "samples.jsonl") == 2
    # summaries can be rebuilt without a model
    (out / "testA" / "summary.json").unlink()
    assert roborefit.main(["--data-root", str(tmp_path / "data"), "--output-dir", str(out),
                           "--summarize-only", "--splits", "testA"]) == 0
    assert json.loads((out / "testA" / "summary.json").read_text())["n"] == 2


def test_other_benchmark_clis_run_with_the_tiny_model(tmp_path):
    data = tmp_path / "data"
    common = ["--checkpoint", "tiny", "--data-root", str(data), "--threshold", "0", "--no-progress"]
    cases = [(inst2seg, write_inst2seg(data), "inst2seg"), (reasonseg, write_reasonseg(data), "reason_seg_val"),
             (grefcoco, write_grefcoco(data), "grefcoco_val")]
    for module, qfile, split in cases:
        out = tmp_path / module.SPEC.name
        assert module.main(common + ["--question-file", str(qfile), "--output-dir", str(out)]) == 0
        s = json.loads((out / split / "summary.json").read_text())
        assert s["failures"] == 0 and s["n"] == s["n_expected"] > 0
        if module.SPEC.instance_ious:
            assert s["metrics"]["num_pred"] > 0 and "mAP" in s["metrics"]
    assert json.loads((tmp_path / "grefcoco" / "grefcoco_val" / "summary.json").read_text())["paper"] == {
        "mAP": 57.3, "ciou": 68.3}


def test_real_roborefit_frame_smoke_run(tmp_path, roborefit_example):
    """The shared real frame has no GT mask: the run is predict-only; check the outputs."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "training.eval.roborefit", "--checkpoint", "tiny", "--question-file", str(roborefit_example),
         "--output-dir", str(out), "--save-masks", "--warmup", "0", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "roborefit_example" / "summary.json").read_text())
    assert s["n_predict_only"] == 1 and s["n"] == 0 and s["failures"] == 0 and s["metrics"] is None
    assert s["latency_s"]["n_timed"] == 1 and s["latency_s"]["mean"] > 0
    (rec,) = read_log(out / "roborefit_example" / "samples.jsonl")
    assert rec["status"] == "predict_only" and rec["id"] == "0003000"
    assert rec["instruction"] == "I want to get the large yellow pear. Please output the segmentation mask."
    assert (out / "roborefit_example" / rec["mask_png"]).is_file()
    assert "| RoboRefIt | roborefit_example | mask mIoU (%) | n/a |" in proc.stdout


def test_gt_sized_otherwise_than_the_upright_image_gets_the_prediction_at_its_size(tmp_path):
    """An EXIF-rotated photo whose GT was drawn on the stored (sideways) pixels: the
    prediction is upsampled to the GT's size, as the release does, and counted."""
    import numpy as np
    from PIL import Image

    from instructsam_core.sample_images import tabletop_scene
    from instructsam_core.testing import sideways_jpeg_with_exif

    data, upright = sideways_jpeg_with_exif(tabletop_scene(64, 48, seed=3).image)  # upright 48x64, stored 64x48
    (tmp_path / "photo.jpg").write_bytes(data)
    gt = np.zeros((64, 48), np.uint8)
    gt[10:30, 5:25] = 255
    Image.fromarray(gt).save(tmp_path / "gt.png")
    (tmp_path / "q.json").write_text(json.dumps([{"image": "photo.jpg", "text": "the red mug", "mask": "gt.png"}]))
    out = tmp_path / "out"
    assert roborefit.main(["--checkpoint", "tiny", "--question-file", str(tmp_path / "q.json"), "--output-dir",
                           str(out), "--threshold", "0", "--no-progress", "--save-masks"]) == 0
    s = json.loads((out / "q" / "summary.json").read_text())
    assert s["failures"] == 0 and s["resized_to_gt"] == 1 and s["answer_status"] == {"ok": 1}
    record = read_log(out / "q" / "samples.jsonl")[0]
    assert record["resized_to_gt"] == {"image": [48, 64], "gt": [64, 48]}
    assert np.asarray(Image.open(out / "q" / record["mask_png"])).shape == (64, 48)
