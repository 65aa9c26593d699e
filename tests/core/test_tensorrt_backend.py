"""`backend="tensorrt"` on the tiny checkpoint: engines built on first use (the graphs
exported first) and loaded from the cache afterwards, frame features kept in the vision
engine's device buffers and fed to the head engine as they are, and results equal to the
eager backend's: fp32 engines to fp32 rounding, the default fp16 engines with the
compiled bf16 LLM within half precision.

These run wherever tensorrt imports and CUDA exists. This project's CI and development
machines have neither, so they are skipped there ("tensorrt is not installed") and have
never run: docs/acceleration.md says how to run them on a Jetson or a desktop GPU. The
backend's wiring without the TensorRT runtime is tested everywhere, on onnxruntime, in
test_graph_backends.py.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed")

from instructsam_core.backends import available_backends  # noqa: E402
from instructsam_core.backends.tensorrt_backend import TensorRtBackend  # noqa: E402
from instructsam_core.cli import main  # noqa: E402
from instructsam_core.engine import Segmenter  # noqa: E402
from instructsam_core.processing import build_prompt_ids, encode_text  # noqa: E402
from instructsam_core.sample_images import tabletop_scene  # noqa: E402

pytestmark = pytest.mark.needs_cuda

LIMITS = {"max_batch": 2, "max_blocks": 3}
FP32 = {"precision": "fp32", "llm": "eager", **LIMITS}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """This module's acceleration cache ($INSTRUCTSAM_CACHE: graphs in onnx/, engines in tensorrt/)."""
    root = tmp_path_factory.mktemp("acceleration-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSTRUCTSAM_CACHE", str(root))
        # The reference without TF32 (cuDNN's default for convolutions): fp32 engines are built without it.
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        patch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        yield root


def _segmenter(checkpoint, options, dtype="float32") -> Segmenter:
    return Segmenter.from_pretrained(str(checkpoint), device="cuda", dtype=dtype, backend="tensorrt",
                                     phrase_mode="instruction", backend_options=options)


@pytest.fixture(scope="module")
def fp32_engines(tiny_checkpoint, cache_root):
    return _segmenter(tiny_checkpoint, FP32)


@pytest.fixture(scope="module")
def eager_cuda(tiny_checkpoint, cache_root):
    return Segmenter.from_pretrained(str(tiny_checkpoint), device="cuda", dtype="float32", phrase_mode="instruction")


def _images():
    return [tabletop_scene(96, 72, seed=1).image, tabletop_scene(64, 48, seed=2).image,
            tabletop_scene(80, 80, seed=3).image]


INSTRUCTIONS = ["the mug", "a pear", "the tray"]


def test_tensorrt_is_registered_where_it_imports():
    assert "tensorrt" in available_backends()


def test_fp32_engines_equal_eager_on_a_batch_split_to_the_profiles(fp32_engines, eager_cuda, monkeypatch):
    backend = fp32_engines.backend
    assert isinstance(backend, TensorRtBackend) and set(backend.engines) == {"vision", "head"}
    calls, run = [], backend._run

    def recording(part, inputs, stream):
        calls.append((part, {name: tuple(t.shape) for name, t in inputs.items()}))
        return run(part, inputs, stream)

    monkeypatch.setattr(backend, "_run", recording)
    ours = fp32_engines.segment_batch(_images(), INSTRUCTIONS, score_threshold=0.0, batch_size=3)
    theirs = eager_cuda.segment_batch(_images(), INSTRUCTIONS, score_threshold=0.0, batch_size=3)
    for a, b in zip(ours, theirs):
        assert a.target_phrases == b.target_phrases and a.slots.tolist() == b.slots.tolist()
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4, rtol=0.0)
        assert (a.masks != b.masks).reshape(len(b), -1).sum(axis=1).max() <= 3
    # Within the engines' profiles (2 frames, 3 blocks): TensorRT refuses anything larger.
    assert [shapes["pixel_values"][0] for part, shapes in calls if part == "vision"] == [2, 1]
    assert [shapes["frame_index"][0] for part, shapes in calls if part == "head"] == [2, 1]


def test_engines_are_built_once_then_loaded_from_the_cache(fp32_engines, tiny_checkpoint, cache_root, caplog):
    engines = sorted((cache_root / "tensorrt").glob("*.engine"))
    assert [p.name.split("-")[:2] for p in engines] == [["head", "fp32"], ["vision", "fp32"]]
    stamps = [p.stat().st_mtime_ns for p in engines]
    with caplog.at_level(logging.INFO, logger="instructsam_core.backends.tensorrt_backend"):
        again = _segmenter(tiny_checkpoint, FP32)
    assert caplog.text.count("engine (fp32) from the cache") == 2
    assert sorted((cache_root / "tensorrt").glob("*.engine")) == engines
    assert [p.stat().st_mtime_ns for p in engines] == stamps
    again.release()


def test_frame_features_stay_in_the_engines_device_buffers(fp32_engines, monkeypatch):
    seg, backend = fp32_engines, fp32_engines.backend
    seg.set_image(tabletop_scene(96, 72, seed=4).image)
    handle = seg._frame
    assert all(level.is_cuda and level.dtype == torch.float32 for level in handle.sam_levels)
    ids = backend.token_ids
    prompt = build_prompt_ids(seg.tokenizer, "the mug", handle.num_image_tokens, ids)
    answer = [ids.ref_start, *encode_text(seg.tokenizer, "red mug"), ids.ref_end, ids.im_end]
    generation = backend.generate(handle, prompt, 32, forced_answer=answer)
    fed, run = {}, backend._run

    def recording(part, inputs, stream):
        fed.update((name, t.data_ptr()) for name, t in inputs.items())
        return run(part, inputs, stream)

    monkeypatch.setattr(backend, "_run", recording)
    head = backend.segment_phrases([(handle, generation)])[0]
    # One frame: its vision outputs go to the head engine as they are (no copy, no host trip).
    assert [fed[f"fpn_hidden_states_{i}"] for i in range(3)] == [level.data_ptr() for level in handle.sam_levels]
    assert head.mask_logits.is_cuda and head.logits.is_cuda


def test_default_fp16_engines_and_the_compiled_llm_agree_with_eager_in_half_precision(tiny_checkpoint, cache_root):
    # The defaults (fp16 engines, the LLM compiled in bf16), the compiled code kept in this module's cache.
    seg = _segmenter(tiny_checkpoint, {"compiled": {"cache_dir": str(cache_root / "compiled")}}, dtype=None)
    assert seg.backend.options.precision == "fp16" and seg.dtype == torch.bfloat16
    eager = Segmenter.from_pretrained(str(tiny_checkpoint), device="cuda", phrase_mode="instruction")
    for a, b in zip(seg.segment_batch(_images(), INSTRUCTIONS, score_threshold=0.0),
                    eager.segment_batch(_images(), INSTRUCTIONS, score_threshold=0.0)):
        assert a.target_phrases == b.target_phrases and len(a) == len(b)
        np.testing.assert_allclose(a.scores, b.scores, atol=5e-2, rtol=0.0)
        assert (a.masks == b.masks).mean() >= 0.98  # the parity check's fp16 mask agreement, less rounding
    seg.release()


def test_the_parity_command_checks_the_backends_own_engines(fp32_engines, tiny_checkpoint, cache_root):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["parity", "--onnx", str(fp32_engines.backend.export_dir), "--checkpoint", str(tiny_checkpoint),
                   "--runner", "tensorrt", "--precision", "fp32", "--engine-cache", str(cache_root / "tensorrt")])
    assert rc == 0 and "parity passed" in out.getvalue(), out.getvalue()
