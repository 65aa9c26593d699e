"""The training-throughput benchmark runs end to end on the tiny model (no timing asserted)."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_train_throughput_benchmark_writes_a_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--preset", "tiny", "--device", "cpu", "--steps", "1",
                                      "--warmup", "0", "--grad-accum", "2", "--image", "64x48",
                                      "--num-points", "64", "--out", str(out)])
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as done:
        assert done.code == 0
    report = json.loads(out.read_text())
    assert (report["batch_size"], report["grad_accum"], report["mask_size"], report["sam_image_size"]) == (1, 2, 32, 112)
    assert report["activation_checkpointing"] and report["sequence_length"] > 0 and len(report["step_s"]) == 1
    assert report["samples_per_s"] > 0 and report["tokens_per_s"] > 0 and report["peak_gib"] > 0
    assert "| tiny | cpu | 1 x 2 |" in capsys.readouterr().out
