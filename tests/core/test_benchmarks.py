"""The latency benchmark runs end to end on the tiny model (numbers are not asserted)."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_latency.py"


def test_engine_latency_benchmark_writes_a_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "lat.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--preset", "tiny", "--sizes", "64x48", "--warmup", "0",
                                      "--runs", "1", "--out", str(out)])
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as done:
        assert done.code == 0
    report = json.loads(out.read_text())
    stages = report["sizes"]["64x48"]
    assert {"forced/image_encode", "forced/generate", "forced/mask_head", "generated/generate"} <= set(stages)
    assert all(s["mean_ms"] > 0 for k, s in stages.items() if k != "forced/postprocess")
    assert "| 64x48 | forced/total |" in capsys.readouterr().out
