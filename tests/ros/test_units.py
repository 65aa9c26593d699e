"""Depth -> 3D, stamp matching, instruction checks and the parameter table."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from instructsam_ros import params
from instructsam_ros.geometry import Intrinsics, mask_position
from instructsam_ros.instruction import InstructionError, InstructionState, clean_instruction
from instructsam_ros.sync import StampBuffer

REPO = Path(__file__).resolve().parents[2]


def test_mask_position_back_projects_a_fronto_parallel_patch():
    k = Intrinsics(fx=100.0, fy=100.0, cx=50.0, cy=40.0)
    depth = np.full((80, 100), np.nan, np.float32)
    mask = np.zeros((80, 100), bool)
    mask[30:51, 60:81] = True  # columns 60..80, rows 30..50
    depth[mask] = 2.0
    depth[30, 60] = np.nan  # an invalid pixel inside the mask is ignored
    pos = mask_position(mask, depth, k)
    assert pos.points == 21 * 21 - 1
    np.testing.assert_allclose(pos.centroid, [(70 - 50) * 2 / 100, (40 - 40) * 2 / 100, 2.0],
                               atol=1e-9)
    # 20 px at 2 cm/px; the 2% tails fall inside the first/last rows and columns
    # (each holds ~5% of the points), so the extent is the full patch
    np.testing.assert_allclose(pos.extent[:2], [0.4, 0.4], atol=1e-9)
    assert pos.extent[2] == 0.0


def test_mask_position_is_none_without_valid_depth():
    mask = np.ones((4, 4), bool)
    assert mask_position(mask, np.full((4, 4), np.nan, np.float32),
                         Intrinsics(1.0, 1.0, 0.0, 0.0)) is None


def test_intrinsics_reject_zero_focal_length():
    from sensor_msgs.msg import CameraInfo

    with pytest.raises(ValueError, match="invalid focal lengths"):
        Intrinsics.from_camera_info(CameraInfo())


def _stamped(sec, nsec):
    from sensor_msgs.msg import Image

    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = sec, nsec
    return m


def test_stamp_buffer_returns_nearest_within_tolerance():
    buf = StampBuffer(size=3)
    for ns in (0, 33_000_000, 66_000_000, 99_000_000):  # the first falls out (size 3)
        buf.add(_stamped(10, ns))
    assert len(buf) == 3
    q = _stamped(10, 70_000_000).header.stamp
    assert buf.nearest(q, 0.01).header.stamp.nanosec == 66_000_000
    assert buf.nearest(_stamped(10, 0).header.stamp, 0.01) is None  # evicted, 33 ms away
    assert buf.nearest(_stamped(11, 0).header.stamp, 0.5) is None


def test_clean_instruction_caps_strips_and_rejects():
    assert clean_instruction("  the red\n mug ", 100) == ("the red mug", [])
    text, warnings = clean_instruction("x" * 50, 10)
    assert text == "x" * 10 and "cut to the first 10" in warnings[0]
    text, warnings = clean_instruction("the\x07mug", 100)
    assert text == "the mug" and "control characters" in warnings[0]
    with pytest.raises(InstructionError, match="not valid UTF-8"):
        clean_instruction("the \ufffd mug", 100)
    assert clean_instruction("   ", 100) == ("", [])


def test_instruction_id_rises_only_when_the_text_changes():
    s = InstructionState()
    a, changed = s.set("the mug")
    assert (a.id, changed) == (1, True)
    assert s.set("the mug") == (a, False)  # `ros2 topic pub` repeats: same id
    b, _ = s.set("the bowl")
    assert b.id == 2
    cleared, changed = s.set("")
    assert cleared.text == "" and changed
    assert s.set("the bowl")[0].id == 3  # after a clear, even the same text is new


def test_parameter_table_matches_settings_and_has_descriptions():
    table = params.specs()
    assert set(table) == {f.name for f in fields(params.Settings)}
    defaults = params.Settings()
    for name, spec in table.items():
        assert spec.description, name
        assert getattr(defaults, name) == spec.default, name
        assert type(getattr(defaults, name)) is type(spec.default), name
    assert params.validate(defaults) is None


@pytest.mark.parametrize("change,problem", [
    ({"device": "gpu"}, "device 'gpu'"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
    ({"backend": "tensorrt-nope"}, "backend 'tensorrt-nope'"),
    ({"image_reliability": "sometimes"}, "image_reliability"),
    ({"score_threshold": 1.5}, "score_threshold 1.5 is outside"),
])
def test_validate_names_the_bad_parameter(change, problem):
    assert problem in params.validate(params.Settings().with_values(change))


def test_backend_choices_are_the_engines():
    from instructsam_core.engine import Segmenter

    assert params.specs()["backend"].choices == tuple(Segmenter.available_backends())


def test_params_file_sets_only_declared_parameters():
    doc = yaml.safe_load((REPO / "config" / "perception.yaml").read_text())
    values = doc["/**"]["ros__parameters"]
    table = params.specs()
    assert set(values) == set(table)  # every parameter documented, none unknown
    for name, value in values.items():
        assert type(value) is type(table[name].default), f"{name}: {value!r}"


def test_launch_file_passes_only_declared_parameters_and_known_remaps():
    tree = ast.parse((REPO / "launch" / "perception.launch.py").read_text())
    node_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and getattr(n.func, "id", "") == "Node"
                  and any(k.arg == "executable" and getattr(k.value, "value", "") ==
                          "perception_node" for k in n.keywords)]
    assert len(node_calls) == 1
    kw = {k.arg: k.value for k in node_calls[0].keywords}
    passed = [k.value for d in ast.walk(kw["parameters"]) if isinstance(d, ast.Dict)
              for k in d.keys]
    assert passed and set(passed) <= set(params.specs())
    remapped = [t.elts[0].value for t in kw["remappings"].elts]
    assert set(remapped) == {"image", "image/compressed", "depth", "camera_info"}
    assert kw["name"].value == "instructsam"
