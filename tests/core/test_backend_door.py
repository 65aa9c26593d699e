"""The backend door holds no eager types, and the engine goes through it alone.

A TensorRT backend (no PyTorch modules, no transformers cache) must fit through
`backends/base.py`; these tests keep the door and the engine's use of it that narrow: by
their imports and attribute uses (AST), and by running the engine over a backend that
offers nothing but the door and hands out bare frame handles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from instructsam_core.backends import Backend, FrameHandle
from instructsam_core.engine import Segmenter
from instructsam_core.processing import encode_text
from instructsam_core.sample_images import tabletop_scene
from instructsam_core.testing import ScriptedAnswer

CORE = Path(__file__).resolve().parents[2] / "instructsam_core"
# Modules whose types are the eager backend's (or PyTorch's model machinery), not the door's.
EAGER_MODULES = ("transformers", "torch.nn", "instructsam_core.model", "instructsam_core.backends.eager",
                 "instructsam_core.backends.torch_backend", "instructsam_core.backends.compiled",
                 "instructsam_core.backends.static_cache")
# What the engine may use of a backend: the door.
DOOR = {"config", "token_ids", "device", "dtype", "encode_frames", "generate", "segment_phrases", "synchronize",
        "release", "stage_timer"}


def _imports(path: Path, package: str) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def _eager(names: list[str]) -> list[str]:
    return [n for n in names if any(n == m or n.startswith(m + ".") for m in EAGER_MODULES)]


def test_the_door_module_imports_no_eager_types():
    names = _imports(CORE / "backends" / "base.py", "instructsam_core.backends")
    assert "instructsam_core.outputs" in names  # the check resolves relative imports
    assert _eager(names) == []


def test_the_engine_imports_no_eager_types_and_uses_only_the_door():
    engine = CORE / "engine.py"
    assert _eager(_imports(engine, "instructsam_core")) == []
    tree = ast.parse(engine.read_text())
    used, handle_fields = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Attribute) and value.attr == "backend":  # self.backend.<name>
            used.add(node.attr)
        if (isinstance(value, ast.Name) and value.id == "frame") or (
                isinstance(value, ast.Attribute) and value.attr == "_frame"):
            handle_fields.add(node.attr)
    assert used and used <= DOOR, used - DOOR
    assert handle_fields == {"num_image_tokens"}  # a frame handle is opaque to the engine


class DoorOnly(Backend):
    """Nothing but the door, over a real backend: every frame handle it gives out is a bare
    `FrameHandle`, so an engine that looked inside one (or at a PyTorch model) would fail."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.config, self.token_ids, self.device, self.dtype = inner.config, inner.token_ids, inner.device, inner.dtype
        self.real: dict[FrameHandle, FrameHandle] = {}

    def encode_frames(self, frames):
        handles = []
        for real in self.inner.encode_frames(frames):
            handle = FrameHandle(real.num_image_tokens)
            self.real[handle] = real
            handles.append(handle)
        return handles

    def generate(self, frame, *args, **kwargs):
        return self.inner.generate(self.real[frame], *args, **kwargs)

    def segment_phrases(self, answers):
        return self.inner.segment_phrases([(self.real[frame], generation) for frame, generation in answers])

    def synchronize(self):
        self.inner.synchronize()

    def release(self):
        self.inner.release()


def test_the_engine_runs_through_the_door_alone(tiny_checkpoint):
    plain = Segmenter.from_pretrained(str(tiny_checkpoint), phrase_mode="instruction")
    door = Segmenter(DoorOnly(plain.backend), plain.tokenizer, plain.config, phrase_mode="instruction")
    with pytest.raises(AttributeError, match="has no PyTorch model"):
        door.model
    image, other = tabletop_scene(96, 72, seed=1).image, tabletop_scene(64, 48, seed=2).image
    ids = plain.backend.token_ids
    script = [ids.ref_start] + encode_text(plain.tokenizer, "red mug") + [ids.ref_end, ids.im_end]
    for seg in (plain, door):
        seg.set_image(image)
    pairs = [(plain.segment("the mug", score_threshold=0.0), door.segment("the mug", score_threshold=0.0))]
    for seg in (plain, door):
        seg.phrase_mode = "generate"  # the answer decoded (scripted), not forced
    pairs.append(tuple(seg.segment("mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
                       for seg in (plain, door)))
    for seg in (plain, door):
        seg.phrase_mode = "instruction"
    pairs += zip(plain.segment_batch([image, other], ["a pear", "the tray"], score_threshold=0.0),
                 door.segment_batch([image, other], ["a pear", "the tray"], score_threshold=0.0))
    for a, b in pairs:
        assert len(a) > 0 and a.target_phrases == b.target_phrases
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.scores, b.scores)
    door.release()
