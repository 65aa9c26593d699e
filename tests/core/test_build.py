"""The one builder: presets, configs, checkpoints; device and dtype names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from instructsam_core.build import build_model, resolve_device, resolve_dtype
from instructsam_core.config import PRESETS, InstructSamConfig, preset

REPO = Path(__file__).resolve().parents[2]


def test_only_the_builder_constructs_the_model():
    constructors = []
    for package in ("instructsam_core", "instructsam_ros", "training", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name == "InstructSam":
                        constructors.append(str(path.relative_to(REPO)))
    assert constructors and set(constructors) == {"instructsam_core/build.py"}


def test_default_config_is_the_released_2b_architecture():
    config = InstructSamConfig()
    text, vision = config.vlm["text_config"], config.vlm["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (2048, 28, 16)
    assert (vision["depth"], vision["out_hidden_size"], vision["deepstack_visual_indexes"]) == (24, 2048, [5, 11, 17])
    assert (config.num_queries, config.out_dim, config.sam_image_size, config.sam3) == (10, 256, 1008, {})
    assert preset("2b") == config
    with pytest.raises(ValueError, match="vlm is empty"):
        InstructSamConfig(vlm={})


def test_presets_are_a_table_of_fresh_configs():
    assert sorted(PRESETS) == ["2b", "small", "tiny"]
    a, b = preset("tiny"), preset("tiny")
    a.vlm["text_config"]["hidden_size"] = 64
    assert b.vlm["text_config"]["hidden_size"] == 32  # each call builds its own
    with pytest.raises(ValueError, match="unknown preset 'huge'; known presets: \\['2b', 'small', 'tiny'\\]"):
        preset("huge")


def test_auto_device_and_dtype_resolve_in_one_place():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_random_weights_are_seeded_and_leave_the_callers_random_state_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("tiny", device="cpu", seed=3)
    after = torch.rand(1)
    b = build_model(preset("tiny"), device="cpu", seed=3)
    assert torch.equal(before, after)
    assert a.untrained and (a.device.type, a.dtype) == ("cpu", torch.float32)
    assert torch.equal(a.model.mask_queries, b.model.mask_queries)
    half = build_model("tiny", device="cpu", dtype="bfloat16", seed=3)
    assert torch.equal(half.model.mask_queries, a.model.mask_queries.to(torch.bfloat16))


def test_a_missing_checkpoint_names_the_presets(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist \\(or give a preset name: 2b, small, tiny\\)"):
        build_model(tmp_path / "nowhere", device="cpu")


def test_segmenter_serves_random_weights_only_when_asked(caplog):
    from instructsam_core.engine import Segmenter

    with pytest.raises(ValueError, match="has no embedded weights.*Segmenter.from_config\\('2b'\\)"):
        Segmenter.from_pretrained("2b")
    with caplog.at_level("WARNING"):
        seg = Segmenter.from_config("tiny", device="cpu", phrase_mode="generate", max_new_tokens=4)
    assert seg.is_untrained and seg.phrase_mode == "generate" and seg.config.max_new_tokens == 4
    assert "UNTRAINED" in caplog.text and seg.checkpoint == "random:tiny"
