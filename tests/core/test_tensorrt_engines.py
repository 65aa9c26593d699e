"""TensorRT engines from the exported tiny graphs: built once and then taken from the
cache, run on torch CUDA tensors (device pointers bound, enqueued on a torch stream), and
equal to the PyTorch path within the engine's precision.

These run wherever tensorrt imports and CUDA exists. This project's CI and development
machines have neither, so they are skipped there ("tensorrt is not installed") and have
never run: docs/acceleration.md says how to run them on a Jetson or a desktop GPU.
"""

import contextlib
import copy
import io

import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed")

from instructsam_core.cli import main  # noqa: E402
from instructsam_core.export.graphs import HEAD, VISION  # noqa: E402
from instructsam_core.export.manifest import Manifest  # noqa: E402
from instructsam_core.export.onnx_export import export_onnx  # noqa: E402
from instructsam_core.export.parity import check_parity, parity_cases  # noqa: E402
from instructsam_core.tensorrt.builder import engine_for, engine_key, tensorrt_major  # noqa: E402
from instructsam_core.tensorrt.cache import EngineCache  # noqa: E402
from instructsam_core.tensorrt.runtime import TensorRtEngine, TensorRtRunner  # noqa: E402

pytestmark = pytest.mark.needs_cuda

# Sizes other than the traced ones (batch 2; frames 2, blocks 3, prompt_len 5).
SIZES = {VISION: [{"batch": 1}, {"batch": 5}],
         HEAD: [{"frames": 1, "blocks": 1, "prompt_len": 32}, {"frames": 2, "blocks": 6, "prompt_len": 9}]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_model[0], folder, source="tiny")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return EngineCache(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def cuda_model(tiny_model):
    return copy.deepcopy(tiny_model[0]).to("cuda")


def _engines(folder, cache, precision):
    return {part: TensorRtEngine.from_file(engine_for(folder, part, precision, cache, progress=False)[0])
            for part in (VISION, HEAD)}


def test_an_engine_is_built_once_then_taken_from_the_cache(exported, tmp_path):
    cache = EngineCache(tmp_path / "engines")
    path, built = engine_for(exported, HEAD, "fp32", cache)
    assert built and cache.lookup(engine_key(Manifest.read(exported), HEAD, "fp32")) == path
    again, built_again = engine_for(exported, HEAD, "fp32", cache)
    assert (again, built_again) == (path, False)
    assert list((tmp_path / "engines").glob("timing-*.cache"))  # kernel timings kept for the next build


def test_fp32_engines_match_pytorch_at_sizes_not_traced(exported, cache, cuda_model):
    runner = TensorRtRunner(_engines(exported, cache, "fp32"), "fp32")
    report = check_parity(runner, parity_cases(cuda_model, Manifest.read(exported), sizes=SIZES))
    assert report.passed, report.table()


def test_fp16_engines_match_pytorch_within_half_precision(exported, cache, cuda_model):
    if tensorrt_major() >= 11:
        with pytest.raises(ValueError, match="builds only the graph's own precision"):
            engine_for(exported, HEAD, "fp16", cache, progress=False)
        return
    runner = TensorRtRunner(_engines(exported, cache, "fp16"), "fp16")
    report = check_parity(runner, parity_cases(cuda_model, Manifest.read(exported), sizes=SIZES))
    assert report.precision == "float16" and report.passed, report.table()


def test_the_runtime_binds_cuda_tensors_on_the_callers_stream(exported, cache, cuda_model):
    engine = _engines(exported, cache, "fp32")[VISION]
    pixels = torch.rand(2, 3, 112, 112, device="cuda") * 2 - 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        outputs = engine.run({"pixel_values": pixels}, stream)
    stream.synchronize()
    with torch.no_grad():
        expected = cuda_model.encode_image_sam(pixels).fpn_hidden_states
    for name, want in zip(engine.output_names, expected):
        assert outputs[name].device == pixels.device and outputs[name].dtype == torch.float32
        torch.testing.assert_close(outputs[name], want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(ValueError, match="is on cpu"):
        engine.run({"pixel_values": pixels.cpu()})
    with pytest.raises(ValueError, match="is torch.float16; the engine takes torch.float32"):
        engine.run({"pixel_values": pixels.half()})
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run({"pixel_values": torch.zeros(9, 3, 112, 112, device="cuda")})


def test_parity_command_checks_cached_and_given_engines(exported, cache):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["parity", "--onnx", str(exported), "--runner", "tensorrt", "--precision", "fp32",
                   "--engine-cache", str(cache.root)])
    assert rc == 0 and "parity passed" in out.getvalue(), out.getvalue()
    # An engine built elsewhere (trtexec on a Jetson, say) is checked the same way.
    vision_engine, _ = engine_for(exported, VISION, "fp32", cache, progress=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["parity", "--onnx", str(exported), "--runner", "tensorrt", "--precision", "fp32",
                   "--parts", "vision", "--engine", f"vision={vision_engine}"])
    assert rc == 0 and "parity passed: 6/6" in out.getvalue(), out.getvalue()
