"""The backends that run SAM3 as exported graphs: what runs without TensorRT.

`backend="tensorrt"` and `backend="onnxruntime"` are one backend (`graph_backend`) with two
graph runtimes. Everything but the runtime is tested here on onnxruntime (CPU), the real
runtime of the onnxruntime backend: the export on first use into the cache and its reuse,
the refusal of another model's export, SAM3 dropped from PyTorch, handles holding the
vision graph's outputs, the door's calls split to the graphs' axis limits (which
onnxruntime would not enforce, so the calls are recorded), and the results equal to the
eager backend's. Also the registration (tensorrt only where it imports) and the options.
The TensorRT runtime itself: test_tensorrt_backend.py, where tensorrt imports.

One export serves the module: the tiny checkpoint's graphs with small limits (2 frames,
3 phrases per call), so that small batches already cross them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from instructsam_core.backends import (UNAVAILABLE, CompiledBackend, OnnxRuntimeBackend,  # noqa: E402
                                       OnnxRuntimeOptions, TensorRtBackend, TensorRtOptions, available_backends,
                                       check_backend_options)
from instructsam_core.backends.graph_backend import GraphFrame  # noqa: E402
from instructsam_core.cli import main  # noqa: E402
from instructsam_core.engine import Segmenter  # noqa: E402
from instructsam_core.export.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from instructsam_core.processing import build_prompt_ids, encode_text  # noqa: E402
from instructsam_core.sample_images import tabletop_scene  # noqa: E402
from instructsam_core.tensorrt import tensorrt_status  # noqa: E402
from instructsam_core.testing import ScriptedAnswer, make_tiny_checkpoint  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LIMITS = {"max_batch": 2, "max_blocks": 3}
# fp32 on the CPU: onnxruntime's kernels against PyTorch's (graph parity ~1e-6 of scale).
SCORE_TOL = dict(atol=1e-5, rtol=0.0)
MASK_PIXELS = 3  # an upsampled logit within rounding of 0 may flip a pixel


def assert_same_result(ours, eager) -> None:
    assert (ours.status, ours.target_phrases, ours.generated_text) == (eager.status, eager.target_phrases,
                                                                       eager.generated_text)
    assert len(eager) > 0 and ours.slots.tolist() == eager.slots.tolist()
    np.testing.assert_allclose(ours.scores, eager.scores, **SCORE_TOL)
    differing = (ours.masks != eager.masks).reshape(len(eager), -1).sum(axis=1)
    assert differing.max() <= MASK_PIXELS, differing


def _answer(seg, *phrases: str) -> list[int]:
    """An answer naming `phrases`, each as `<ref_start> phrase <ref_end>`, then the end."""
    ids, answer = seg.backend.token_ids, []
    for i, phrase in enumerate(phrases):
        answer += (encode_text(seg.tokenizer, " and") if i else []) + [ids.ref_start]
        answer += encode_text(seg.tokenizer, phrase) + [ids.ref_end]
    return answer + [ids.im_end]


def _record_graph_calls(backend, monkeypatch) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """Every graph call of `backend` from now on: (part, input shapes)."""
    calls, run = [], backend._run

    def recording(part, inputs, stream):
        calls.append((part, {name: tuple(t.shape) for name, t in inputs.items()}))
        return run(part, inputs, stream)

    monkeypatch.setattr(backend, "_run", recording)
    return calls


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _from_checkpoint(checkpoint, **options) -> tuple[Segmenter, list[str]]:
    """An onnxruntime Segmenter (eager LLM unless told), and what its backend logged."""
    handler, logger = _Lines(), logging.getLogger("instructsam_core.backends.graph_backend")
    logger.addHandler(handler)
    try:
        seg = Segmenter.from_pretrained(str(checkpoint), device="cpu", dtype="float32", backend="onnxruntime",
                                        backend_options={"llm": "eager", **LIMITS, **options})
    finally:
        logger.removeHandler(handler)
    return seg, handler.lines


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """The acceleration cache of this module ($INSTRUCTSAM_CACHE), cold at the start."""
    root = tmp_path_factory.mktemp("acceleration-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSTRUCTSAM_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def first_use(tiny_checkpoint, cache_root):
    """(Segmenter, log lines) of the first onnxruntime backend: it exports the graphs."""
    return _from_checkpoint(tiny_checkpoint)


@pytest.fixture
def eager(eager_twin, monkeypatch):
    monkeypatch.setattr(eager_twin, "phrase_mode", "generate")  # restored after the test
    return eager_twin


# ---- registration and options (no graphs needed) ---------------------------------------

@pytest.mark.skipif(tensorrt_status()[0], reason="tensorrt is installed here")
def test_tensorrt_is_offered_only_where_it_imports(tiny_checkpoint):
    assert "tensorrt" not in available_backends() and "onnxruntime" in available_backends()
    reason = tensorrt_status()[1]  # "tensorrt is not installed" where it is not (CI)
    assert importlib.util.find_spec("tensorrt") is not None or reason == "tensorrt is not installed"
    # Refused before any model is loaded, saying how to get it.
    with pytest.raises(ValueError, match=rf"backend 'tensorrt' is not available here: {re.escape(reason)}\. "
                                         r"On a Jetson it comes with JetPack.*pip install tensorrt.*pypi\.nvidia\.com"):
        Segmenter.from_pretrained(str(tiny_checkpoint), backend="tensorrt")
    assert UNAVAILABLE["tensorrt"].startswith(reason)


@pytest.mark.parametrize("options, message", [
    ({"precision": "int8"}, "unknown engine precision 'int8'"),
    ({"workspace_mib": -1}, "workspace_mib must be >= 0"),
    ({"llm": "tensorrt"}, "llm must be one of compiled, eager"),
    ({"llm": "eager", "compiled": {"cache_dir": "x"}}, r"compiled options \['cache_dir'\] need llm='compiled'"),
    ({"compiled": {"graphs": 1}}, r"unknown compiled option\(s\) \['graphs'\]"),
    ({"compiled": {"max_cache_len": 8}}, "max_cache_len must be >= 64"),
    ({"max_blocks": 1}, "max_blocks must be at least 2"),
])
def test_bad_tensorrt_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        TensorRtOptions(**options)


def test_unknown_options_and_wrong_devices_are_refused(tiny_model):
    assert TensorRtOptions().precision == "fp16" and TensorRtOptions().llm == "compiled"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['precision'\] of backend 'onnxruntime'"):
        check_backend_options("onnxruntime", {"precision": "fp16"})
    # The device is checked before the model is touched.
    with pytest.raises(ValueError, match="the tensorrt backend runs on a CUDA GPU, not cpu"):
        TensorRtBackend(tiny_model[0], torch.device("cpu"), torch.float32, TensorRtOptions())
    with pytest.raises(ValueError, match="the onnxruntime backend runs on the CPU, not cuda"):
        OnnxRuntimeBackend(tiny_model[0], torch.device("cuda"), torch.float32, OnnxRuntimeOptions())


# ---- the graphs: exported on first use, found afterwards --------------------------------

def test_the_graphs_are_exported_on_first_use_then_found_in_the_cache(first_use, tiny_checkpoint, cache_root):
    seg, lines = first_use
    folder = seg.backend.export_dir
    assert folder.parent == cache_root / "onnx" and folder.name.endswith("-float32-b2-k3")
    manifest = Manifest.read(folder)
    assert manifest.model_hash.startswith(folder.name.split("-")[0])
    assert manifest.graph("vision").axes["batch"].max == 2 and manifest.graph("head").axes["blocks"].max == 3
    assert any("no export of this model" in line and "exporting SAM3's vision encoder and head" in line
               for line in lines)  # progress while exporting
    assert any("[2/2] head: head.onnx written" in line for line in lines)
    written = (folder / MANIFEST_NAME).stat().st_mtime_ns
    again, lines = _from_checkpoint(tiny_checkpoint)
    assert again.backend.export_dir == folder and lines == []  # nothing exported, nothing said
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == written


def test_export_into_the_cache_is_what_the_backends_find(first_use, tiny_checkpoint, tmp_path, monkeypatch):
    """`instructsam export --cache` (a desktop preparing a robot's cache, say) writes the
    folder the backends look in: one started afterwards exports nothing."""
    monkeypatch.setenv("INSTRUCTSAM_CACHE", str(tmp_path))
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", "--checkpoint", str(tiny_checkpoint), "--cache", "--max-batch", "2",
                     "--max-blocks", "3"]) == 0
    seg, lines = _from_checkpoint(tiny_checkpoint)
    assert lines == [] and seg.backend.export_dir == tmp_path / "onnx" / first_use[0].backend.export_dir.name
    with pytest.raises(SystemExit, match="--cache exports what the backends export"):
        main(["export", "--checkpoint", str(tiny_checkpoint), "--cache", "--parts", "vision"])


def test_sam3_leaves_pytorch_and_the_door_stays_narrow(first_use):
    seg = first_use[0]
    model = seg.backend.language.model  # the LLM backend's
    assert model.grounding_model is None and model.mask_hidden_fcs is None  # held once, by the graphs
    with pytest.raises(AttributeError, match="has no PyTorch model"):
        seg.model


def test_an_export_of_other_weights_or_a_foreign_folder_is_refused(first_use, tiny_checkpoint, tmp_path):
    folder = first_use[0].backend.export_dir
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="cannot serve this model: it was exported from other weights"):
        _from_checkpoint(other, onnx_dir=str(folder))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no manifest.json: not an export folder"):
        _from_checkpoint(tiny_checkpoint, onnx_dir=str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # never overwritten
    short = tmp_path / "short"  # an export whose head takes shorter prompts than the model pads to
    shutil.copytree(folder, short)
    manifest = json.loads((short / MANIFEST_NAME).read_text())
    manifest["graphs"]["head"]["axes"]["prompt_len"] = {"min": 1, "opt": 8, "max": 8}
    (short / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="its head takes prompts of up to 8 tokens, not the model's 32"):
        _from_checkpoint(tiny_checkpoint, onnx_dir=str(short))


# ---- the door's calls as graph inputs ---------------------------------------------------

def test_a_batch_equals_eager_in_calls_within_the_graphs_limits(first_use, eager, monkeypatch):
    seg = first_use[0]
    calls = _record_graph_calls(seg.backend, monkeypatch)
    images = [tabletop_scene(96, 72, seed=1).image, tabletop_scene(64, 48, seed=2).image,
              tabletop_scene(80, 80, seed=3).image]
    instructions = ["the mug", "a pear", "the tray"]
    for s in (seg, eager):
        monkeypatch.setattr(s, "phrase_mode", "instruction")  # each instruction is its one phrase
    ours = seg.segment_batch(images, instructions, score_threshold=0.0, batch_size=3)
    theirs = eager.segment_batch(images, instructions, score_threshold=0.0, batch_size=3)
    for a, b in zip(ours, theirs):
        assert_same_result(a, b)
    # Three frames: the vision graph takes two, then one; three phrases on three frames:
    # the head takes two frames' phrases, then the third's (each frame's levels once).
    assert [shapes["pixel_values"][0] for part, shapes in calls if part == "vision"] == [2, 1]
    head = [(shapes["query_states"][0], shapes["frame_index"][0], shapes["fpn_hidden_states_0"][0],
             shapes["prompt"][1]) for part, shapes in calls if part == "head"]
    assert head == [(2, 2, 2, 32), (1, 1, 1, 32)]  # prompts padded to max_phrase_tokens, as in PyTorch


def test_phrases_past_the_block_limit_run_in_turns_and_equal_eager(first_use, eager, monkeypatch):
    seg = first_use[0]
    monkeypatch.setattr(seg, "phrase_mode", "generate")
    calls = _record_graph_calls(seg.backend, monkeypatch)
    frame = tabletop_scene(96, 72, seed=4).image
    answer = _answer(eager, "red mug", "blue cup", "pear", "tray")
    results = [s.segment_image(frame, "everything on the table", score_threshold=0.0,
                               logits_processors=[ScriptedAnswer(answer)]) for s in (seg, eager)]
    assert results[1].target_phrases == ["red mug", "blue cup", "pear", "tray"]
    assert_same_result(*results)
    assert [(shapes["query_states"][0], shapes["fpn_hidden_states_0"][0])
            for part, shapes in calls if part == "head"] == [(3, 1), (1, 1)]


def test_a_handle_holds_the_vision_outputs_and_a_shared_frame_goes_in_once(first_use, eager, monkeypatch):
    seg = first_use[0]
    image = tabletop_scene(96, 72, seed=5).image
    heads = {}
    for s in (seg, eager):
        s.set_image(image)
        handle = s._frame
        prompt = build_prompt_ids(s.tokenizer, "the mug", handle.num_image_tokens, s.backend.token_ids)
        generation = s.backend.generate(handle, prompt, 32, forced_answer=_answer(s, "red mug"))
        if s is seg:
            assert isinstance(handle, GraphFrame) and handle.language.sam is None  # SAM3 is the graphs' part
            assert [tuple(level.shape) for level in handle.sam_levels] == [(1, 32, 32, 32), (1, 32, 16, 16),
                                                                            (1, 32, 8, 8)]
            calls = _record_graph_calls(s.backend, monkeypatch)
        heads[s] = s.backend.segment_phrases([(handle, generation), (handle, generation)])
    assert [(part, shapes["frame_index"][0], shapes["fpn_hidden_states_0"][0]) for part, shapes in calls] == [
        ("head", 2, 1)]  # two phrases of one frame: its features once
    for ours, theirs in zip(heads[seg], heads[eager]):
        for name in ("mask_logits", "logits", "boxes"):
            expected = getattr(theirs, name)
            torch.testing.assert_close(getattr(ours, name), expected, rtol=1e-3,
                                       atol=1e-4 * float(expected.abs().max()))


def test_the_default_llm_is_the_compiled_backend(first_use, tiny_checkpoint, compiled_cache_dir, compiled_segmenter,
                                                 eager):
    """The LLM as the tensorrt backend runs it by default, compiled, over an export folder
    given by name. Its compiled code is backend="compiled"'s for the same model (one cache
    key), so the two share it on disk."""
    folder = first_use[0].backend.export_dir
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", backend="onnxruntime",
                                    backend_options={"onnx_dir": str(folder),
                                                     "compiled": {"cache_dir": str(compiled_cache_dir)}})
    assert isinstance(seg.backend.language, CompiledBackend) and seg.backend.export_dir == folder
    assert seg.backend.language.cache_dir == compiled_segmenter.backend.cache_dir
    frame = tabletop_scene(640, 480, seed=1).image  # the compiled tests' frame size (conftest)
    instruction = "the red mug on the left"
    results = [s.segment_image(frame, instruction, phrase=instruction, score_threshold=0.0) for s in (seg, eager)]
    assert_same_result(*results)


def test_the_graph_backends_benchmark_runs_beside_eager(first_use, tiny_checkpoint, cache_root, tmp_path, capsys):
    """benchmarks/graph_backends.py on the tiny checkpoint, the graphs from this module's
    cache (no timing asserted: on a shared CPU it means nothing)."""
    bench = runpy.run_path(str(BENCHMARKS / "graph_backends.py"))
    out = tmp_path / "graphs.json"
    assert bench["main"](["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32",
                          "--backends", "eager,onnxruntime", "--warmup", "0", "--runs", "2", "--max-batch", "2",
                          "--max-blocks", "3", "--cache", str(cache_root), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["backends"]) == ["eager", "onnxruntime"]
    for backend in report["backends"].values():
        assert {"sam_vision", "sam_head", "prefill_image"} <= set(backend["stages"])
        assert backend["end_to_end"]["n"] == 2 and backend["stages"]["sam_vision"]["n"] == 2
    against = report["backends"]["onnxruntime"]["against_eager"]
    assert against["same_slots"] and against["max_score_diff"] < 1e-5 and against["mask_agreement"] > 0.999
    assert "| sam_vision |" in capsys.readouterr().out
