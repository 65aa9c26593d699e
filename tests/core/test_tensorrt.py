"""The TensorRT path's parts that need no TensorRT: optimization profiles from the
manifest, the trtexec command line, engine cache keys and the cache itself, and the
commands' answer where tensorrt is missing. The engine build and runtime are tested in
test_tensorrt_engines.py, wherever tensorrt imports."""

import contextlib
import importlib.util
import io
import json
import sys
import types

import pytest

from instructsam_core.cli import main
from instructsam_core.export.graphs import AxisRange
from instructsam_core.export.manifest import GraphEntry, Manifest, TensorSpec
from instructsam_core.tensorrt import tensorrt_status
from instructsam_core.tensorrt.cache import EngineCache, EngineKey
from instructsam_core.tensorrt.profiles import InputProfile, input_profiles, trtexec_command

TENSORRT_MISSING = importlib.util.find_spec("tensorrt") is None


def _head_entry() -> GraphEntry:
    """A head graph's manifest entry as the exporter writes it for the 2B model."""
    f32 = "float32"
    return GraphEntry(
        part="head", file="head.onnx", sha256={"head.onnx": "a" * 64, "head.onnx.data": "b" * 64},
        inputs=[TensorSpec("query_states", f32, ("blocks", 10, 2048)),
                TensorSpec("prompt", f32, ("blocks", "prompt_len", 256)),
                TensorSpec("prompt_mask", "bool", ("blocks", "prompt_len")),
                TensorSpec("frame_index", "int64", ("blocks",)),
                TensorSpec("fpn_hidden_states_0", f32, ("frames", 256, 288, 288))],
        outputs=[TensorSpec("mask_logits", f32, ("blocks", 10, 288, 288))],
        axes={"frames": AxisRange(1, 1, 8), "blocks": AxisRange(1, 1, 16), "prompt_len": AxisRange(1, 32, 32)},
        export_sizes={"frames": 2, "blocks": 3, "prompt_len": 5})


def _manifest() -> Manifest:
    return Manifest(model_hash="f" * 64, source="2b", model={}, opset=18, exporter="torch.onnx.export(dynamo=True)",
                    versions={}, graphs={"head": _head_entry()})


def _key(**changes) -> EngineKey:
    fields = dict(part="head", model_hash="f" * 64, onnx_sha256="head.onnx:" + "a" * 64, precision="fp16",
                  tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                  profile=input_profiles(_head_entry()))
    fields.update(changes)
    return EngineKey(**fields)


def test_profiles_set_every_dynamic_axis_to_its_range():
    profiles = {p.name: p for p in input_profiles(_head_entry())}
    assert profiles["prompt"] == InputProfile("prompt", (1, 1, 256), (1, 32, 256), (16, 32, 256))
    assert profiles["fpn_hidden_states_0"].max == (8, 256, 288, 288)
    assert profiles["frame_index"] == InputProfile("frame_index", (1,), (1,), (16,))
    narrower = {p.name: p for p in input_profiles(_head_entry(), {"blocks": AxisRange(1, 2, 4)})}
    assert narrower["query_states"].opt == (2, 10, 2048) and narrower["query_states"].max == (4, 10, 2048)


def test_profiles_refuse_ranges_the_graph_was_not_exported_for():
    with pytest.raises(ValueError, match="blocks range 1..32 lies outside the exported 1..16"):
        input_profiles(_head_entry(), {"blocks": AxisRange(1, 1, 32)})
    with pytest.raises(ValueError, match="has no axis 'batch'"):
        input_profiles(_head_entry(), {"batch": AxisRange(1, 1, 2)})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        AxisRange(2, 1, 4)


def test_trtexec_command_carries_the_same_profile_and_precision():
    command = trtexec_command("out/head.onnx", _head_entry(), "fp16", "out/head-fp16.engine", "out/timing.cache")
    assert command[:3] == ["trtexec", "--onnx=out/head.onnx", "--saveEngine=out/head-fp16.engine"]
    assert ("--minShapes=query_states:1x10x2048,prompt:1x1x256,prompt_mask:1x1,frame_index:1,"
            "fpn_hidden_states_0:1x256x288x288") in command
    assert ("--maxShapes=query_states:16x10x2048,prompt:16x32x256,prompt_mask:16x32,frame_index:16,"
            "fpn_hidden_states_0:8x256x288x288") in command
    assert command[-2:] == ["--fp16", "--timingCacheFile=out/timing.cache"]
    assert not [c for c in trtexec_command("h.onnx", _head_entry(), "fp32", "h.engine") if c.startswith("--fp")]
    with pytest.raises(ValueError, match="unknown engine precision 'int8'"):
        trtexec_command("h.onnx", _head_entry(), "int8", "h.engine")


def test_engine_key_changes_with_everything_an_engine_depends_on():
    base = _key()
    assert _key().digest() == base.digest()  # stable
    changes = dict(part="vision", model_hash="e" * 64, onnx_sha256="head.onnx:" + "c" * 64, precision="bf16",
                   tensorrt_version="10.3.1", gpu_name="NVIDIA H100", compute_capability="9.0",
                   profile=input_profiles(_head_entry(), {"blocks": AxisRange(1, 1, 8)}))
    digests = {name: _key(**{name: value}).digest() for name, value in changes.items()}
    assert base.digest() not in digests.values() and len(set(digests.values())) == len(changes)
    assert base.file_stem().startswith("head-fp16-sm87-trt10.3.0-")
    with pytest.raises(ValueError, match="unknown engine precision"):
        _key(precision="half")


def test_engine_cache_returns_only_engines_stored_under_the_same_key(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    key = _key()
    assert cache.lookup(key) is None
    path = cache.store(key, b"serialized engine")
    assert cache.lookup(key) == path and path.read_bytes() == b"serialized engine"
    assert json.loads(cache.key_path(key).read_text()) == key.to_dict()
    assert cache.lookup(_key(tensorrt_version="10.4.0")) is None  # another TensorRT: another file
    cache.key_path(key).write_text(json.dumps({**key.to_dict(), "gpu_name": "other"}))
    assert cache.lookup(key) is None  # the stored key must match field by field, not only its digest prefix
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == [path.name, cache.key_path(key).name]
    timing = cache.timing_cache_path("NVIDIA Jetson AGX Orin", "8.7", "10.3.0")
    assert timing.name == "timing-nvidia-jetson-agx-orin-sm87-trt10.3.0.cache"


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INSTRUCTSAM_CACHE", str(tmp_path / "c"))
    assert EngineCache().root == tmp_path / "c" / "tensorrt"
    monkeypatch.delenv("INSTRUCTSAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert EngineCache().root == tmp_path / "x" / "instructsam" / "tensorrt"


def test_engine_command_prints_trtexec_commands_without_tensorrt(tmp_path):
    _manifest().write(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["engine", "--onnx", str(tmp_path), "--precision", "bf16", "--trtexec"]) == 0
    (line,) = out.getvalue().splitlines()
    assert line.startswith(f"trtexec --onnx={tmp_path / 'head.onnx'} --saveEngine={tmp_path / 'head-bf16.engine'}")
    assert line.endswith(f"--bf16 --timingCacheFile={tmp_path / 'timing.cache'}")


def test_tensorrt_status_names_what_is_missing(monkeypatch):
    usable, reason = tensorrt_status()
    if TENSORRT_MISSING:
        assert (usable, reason) == (False, "tensorrt is not installed")
    stub = types.ModuleType("tensorrt")  # what a stub wheel leaves behind
    stub.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    assert tensorrt_status() == (False, "tensorrt 10.3.0 lacks the Builder/OnnxParser/Runtime API")


@pytest.mark.skipif(not TENSORRT_MISSING, reason="tensorrt is installed here")
def test_building_without_tensorrt_says_so(tmp_path):
    _manifest().write(tmp_path)
    with pytest.raises(SystemExit, match="tensorrt is not installed; see docs/acceleration.md"):
        main(["engine", "--onnx", str(tmp_path)])
