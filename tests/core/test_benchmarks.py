"""The latency benchmark runs end to end on the tiny model, every section (numbers are
not asserted: on a shared CPU they mean nothing).

It runs the compiled backend in the sections that reuse the session's compiled graphs
(the same checkpoint, frame size and answer, the same cache directory), and eager alone
where the compiled backend would compile anew or start another process (the restarts, the
batch of 2, each K); tests/core/test_compiled_backend.py covers a compiled restart.
"""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_latency.py"


def test_engine_latency_benchmark_writes_every_section(tmp_path, monkeypatch, capsys, tiny_checkpoint,
                                                       compiled_cache_dir, compiled_segmenter):
    out = tmp_path / "lat.json"
    monkeypatch.setattr(sys, "argv", [
        str(BENCH), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32",
        "--warmup", "0", "--runs", "1", "--sweep-runs", "1", "--batch", "2", "--k-sweep", "4,8",
        "--compiled-sections", "main,parity", "--cache-dir", str(compiled_cache_dir),
        "--peak-tflops", "1", "--peak-gbps", "20", "--out", str(out)])
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as done:
        assert done.code == 0
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["main", "parity", "start", "batch", "ksweep", "cold_start"]
    assert sections["start"]["eager"]["load_to_first_result_seconds"] > 0
    assert "skipped" in sections["cold_start"]  # compiled, and so left out here

    main = sections["main"]
    assert main["phrase_tokens"] == 5 and set(main["backends"]) == {"eager", "compiled"}
    for backend in main["backends"].values():
        assert {"qwen_vision", "sam_vision", "prefill_image", "prefill", "decode", "query_pass", "sam_head",
                "postprocess"} <= set(backend["stages"])
        assert backend["stages"]["decode"]["n"] == 4  # one run, four single-token steps
        assert backend["end_to_end"]["n"] == 1 and backend["stream_per_frame"]["n"] == 1
    assert main["backends"]["compiled"]["compile_seconds"]  # first calls of each stage, timed
    assert main["floors"]["decode"]["gflop"] > 0 and main["floors"]["decode"]["floor_ms"] > 0
    assert main["floors"]["end_to_end"]["floor_ms"] > 0
    assert {"end_to_end", "stream_per_frame", "decode", "sam_head"} <= set(main["speedup"])

    assert sections["parity"]["same_tokens"] and sections["parity"]["same_slots"]
    assert set(sections["batch"]["eager"]) == {"batch_size_1", "batch_size_2"}
    assert {"K=4", "K=8"} <= set(sections["ksweep"])

    printed = capsys.readouterr().out
    assert "| decode |" in printed and "| end_to_end |" in printed and "| stream_per_frame |" in printed
