"""Depth -> 3D, stamp matching, instruction checks and the parameter table."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from instructsam_ros import params
from instructsam_ros.geometry import Intrinsics, check_camera_info_size, mask_position
from instructsam_ros.instruction import InstructionError, InstructionState, InstructionTooLong, clean_instruction
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
    buf = StampBuffer(keep_s=0.07)  # sized by time: keeps stamps within 70 ms of the newest
    for ns in (0, 33_000_000, 66_000_000, 99_000_000):  # the first falls out (99 ms old)
        buf.add(_stamped(10, ns))
    assert len(buf) == 3
    q = _stamped(10, 70_000_000).header.stamp
    assert buf.nearest(q, 0.01).header.stamp.nanosec == 66_000_000
    assert buf.nearest(_stamped(10, 0).header.stamp, 0.01) is None  # evicted, 33 ms away
    assert buf.nearest(_stamped(11, 0).header.stamp, 0.5) is None


def test_stamp_buffer_keeps_by_time_whatever_the_rate_and_resets_on_time_jumps():
    buf = StampBuffer(keep_s=2.0)
    for i in range(100):  # 100 Hz for 1 s: all kept (a count-sized buffer of 30 would not)
        buf.add(_stamped(10, i * 10_000_000))
    assert len(buf) == 100
    assert buf.nearest(_stamped(10, 0).header.stamp, 0.001) is not None
    buf.add(_stamped(13, 0))  # 3 s later: everything older than 2 s goes
    assert len(buf) == 1
    buf.add(_stamped(5, 0))  # stamp jumped back (bag loop): the future entries go
    assert len(buf) == 1 and buf.nearest(_stamped(13, 0).header.stamp, 0.1) is None


def test_stamp_buffer_waits_for_a_match_that_arrives_later():
    import threading

    buf = StampBuffer()
    want = _stamped(20, 500)
    adder = threading.Timer(0.05, buf.add, args=(_stamped(20, 1000),))
    adder.start()
    try:
        got = buf.wait_nearest(want.header.stamp, 0.01, timeout_s=30.0)
    finally:
        adder.cancel()
    assert got is not None and got.header.stamp.nanosec == 1000


def test_stamp_buffer_wait_ends_early_when_the_stream_has_moved_past():
    import time

    buf = StampBuffer()
    buf.add(_stamped(20, 900_000_000))  # newer than the wanted stamp + tolerance
    t0 = time.monotonic()
    assert buf.wait_nearest(_stamped(20, 0).header.stamp, 0.01, timeout_s=30.0) is None
    assert buf.wait_nearest(_stamped(21, 0).header.stamp, 0.01, timeout_s=30.0,
                            cancelled=lambda: True) is None
    assert time.monotonic() - t0 < 10.0  # neither waited out its 30 s
    assert buf.wait_nearest(_stamped(21, 0).header.stamp, 0.01, timeout_s=0.0) is None


def test_camera_info_size_must_match_the_depth_image():
    from sensor_msgs.msg import CameraInfo

    check_camera_info_size(CameraInfo(width=80, height=60), 60, 80)
    check_camera_info_size(CameraInfo(), 60, 80)  # size not filled in: accepted
    with pytest.raises(ValueError, match="camera_info is 640x480 but the depth image is 80x60"):
        check_camera_info_size(CameraInfo(width=640, height=480), 60, 80)


def test_warnings_are_rate_limited_per_category_in_a_bounded_table(ros):
    from instructsam_ros.perception_node import PerceptionNode, _category
    from instructsam_ros.conversions import ImageError

    node = PerceptionNode(node_name="warn_probe")
    try:
        logged = []
        logger = type("L", (), {"warning": lambda self, text: logged.append(text)})()
        node.get_logger = lambda: logger
        for i in range(500):  # texts that differ every time (sizes, stamps, user input)
            node._warn(_category("bad_image", ImageError(f"truncated: {i} bytes", "truncated")),
                       f"image skipped: truncated: {i} bytes")
            node._warn(_category("instruction_cleaned",
                                 f"instruction contained {i} control characters"), f"cleaned {i}")
        assert len(node._warned) == 2
        assert logged == ["image skipped: truncated: 0 bytes", "cleaned 0"]
        node._warn(_category("bad_image", ImageError("unsupported", "encoding")), "other kind")
        assert logged[-1] == "other kind"  # another problem is not hidden by the first
    finally:
        node.destroy_node()


def test_a_shutdown_racing_the_executors_wait_ends_the_spin_and_other_errors_still_raise():
    """Ctrl-C's shutdown can land between the executor's check of the context and its
    wait: rclpy then raises RCLError from inside spin. The node's spin treats that as the
    shutdown it is, and only that."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from instructsam_ros.perception_node import spin_until_shutdown

    class RacedExecutor(MultiThreadedExecutor):
        """The race's interleaving, forced: the context goes down after spin's own check."""

        def spin(self) -> None:
            self.context.shutdown()
            self.spin_once(timeout_sec=0.1)

    def raced() -> RacedExecutor:
        context = rclpy.Context()
        context.init()
        executor = RacedExecutor(context=context)
        executor.add_node(rclpy.create_node("race_probe", context=context))
        return executor

    with pytest.raises(RuntimeError, match="context is not valid"):
        raced().spin()  # what rclpy raises, unhandled
    executor = raced()
    spin_until_shutdown(executor)  # returns: the context is down
    assert not executor.context.ok()

    class BrokenExecutor(MultiThreadedExecutor):
        def spin(self) -> None:
            raise RuntimeError("a callback failed")

    context = rclpy.Context()
    context.init()
    try:
        with pytest.raises(RuntimeError, match="a callback failed"):
            spin_until_shutdown(BrokenExecutor(context=context))  # context up: not a shutdown
    finally:
        context.try_shutdown()


def test_clean_instruction_strips_and_rejects_never_cuts():
    assert clean_instruction("  the red\n mug ", 100) == ("the red mug", [])
    with pytest.raises(InstructionTooLong, match="50 characters, more than the limit of 10 "
                                                 "\\(parameter max_instruction_chars\\)"):
        clean_instruction("x" * 50, 10)
    assert clean_instruction("x" * 10, 10) == ("x" * 10, [])
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
    defaults = params.Settings.defaults()
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
    assert problem in params.validate(params.Settings.defaults().with_values(change))


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


def _launch_tree():
    # launch/launch_ros cannot be installed here and are not stubbed: the launch file is
    # checked by reading its source.
    return ast.parse((REPO / "launch" / "perception.launch.py").read_text())


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", "") == name or getattr(n.func, "attr", "") == name)]


def _kwargs(call):
    return {k.arg: k.value for k in call.keywords}


def test_launch_file_passes_only_declared_parameters_and_known_remaps():
    tree = _launch_tree()
    nodes = [c for c in _calls(tree, "Node")
             if getattr(_kwargs(c).get("executable"), "value", "") == "perception_node"]
    assert len(nodes) == 1
    kw = _kwargs(nodes[0])
    assert kw["name"].value == "instructsam"
    remapped = [t.elts[0].value for t in kw["remappings"].elts]
    assert set(remapped) == {"image", "image/compressed", "depth", "camera_info"}
    # The parameters it can override are node parameters, each also a launch argument.
    overrides = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "OVERRIDES")
    names = {e.value for e in overrides.elts}
    declared = {c.args[0].value for c in _calls(tree, "DeclareLaunchArgument")}
    assert names and names <= set(params.specs()) and names <= declared
    assert {"params_file", "rviz", "namespace", "image", "depth", "camera_info"} <= declared
    # Overrides are typed as strings, so a value like "1234" stays a string parameter.
    values = _calls(tree, "ParameterValue")
    assert values and all(getattr(_kwargs(v).get("value_type"), "id", "") == "str" for v in values)


def test_launch_file_starts_rviz_only_on_request_and_defaults_defer_to_the_params_file():
    tree = _launch_tree()
    rviz = [c for c in _calls(tree, "Node") if getattr(_kwargs(c).get("executable"), "value", "") == "rviz2"]
    assert len(rviz) == 1 and "condition" in _kwargs(rviz[0])
    defaults = {c.args[0].value: _kwargs(c)["default_value"] for c in _calls(tree, "DeclareLaunchArgument")}
    # Empty defaults mean "keep the params file's value"; rviz is off unless asked for.
    assert defaults["checkpoint"].value == "" and defaults["device"].value == "" and defaults["backend"].value == ""
    assert defaults["rviz"].value == "false"

def test_engine_options_follow_the_release_by_default():
    defaults = params.Settings.defaults()
    # mask_nms_iou -1: the checkpoint's own setting, which from_pretrained reads itself
    assert params.engine_options(defaults) == {"max_new_tokens": 1024, "max_instruction_chars": 2000}
    assert params.engine_options(defaults, {"mask_nms_iou": 0.7})["mask_nms_iou"] == 0.7  # back to it on a change
    assert params.engine_options(defaults, {})["mask_nms_iou"] is None  # a checkpoint without one: off
    tuned = defaults.with_values({"max_new_tokens": 32, "mask_nms_iou": 0.7})
    assert params.engine_options(tuned)["max_new_tokens"] == 32 and params.engine_options(tuned)["mask_nms_iou"] == 0.7
    off = defaults.with_values({"mask_nms_iou": 1.0})
    assert params.engine_options(off, {"mask_nms_iou": 0.7})["mask_nms_iou"] is None  # 1.0 = off, whatever the checkpoint
    from instructsam_core.config import EngineConfig
    assert params.engine_options(defaults)["max_instruction_chars"] == EngineConfig().max_instruction_chars


def test_a_malformed_frame_never_takes_a_good_frames_place_in_the_slot(ros):
    from sensor_msgs.msg import CompressedImage

    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.perception_node import PerceptionNode

    node = PerceptionNode(node_name="slot_probe")
    try:
        node._active = True  # as after activate, without loading a model
        good = numpy_to_image(np.zeros((4, 6, 3), np.uint8), "rgb8")
        node._on_frame(good, False)
        truncated = numpy_to_image(np.zeros((4, 6, 3), np.uint8), "rgb8")
        truncated.data = truncated.data[:-5]
        node._on_frame(truncated, False)  # cheap checks: refused in the callback
        node._on_frame(CompressedImage(format="jpeg", data=b"GIF89a..."), True)
        frame = node._slot.take(timeout=0.1)
        assert frame is not None and frame.msg is good
        assert (node._stats.received, node._stats.invalid, node._slot.dropped) == (3, 2, 0)
    finally:
        node._active = False
        node.destroy_node()


def test_cheap_checks_name_the_problem_without_decoding():
    from sensor_msgs.msg import CompressedImage

    from instructsam_ros.conversions import ImageError, check_compressed, check_image, numpy_to_image

    msg = numpy_to_image(np.zeros((4, 6, 3), np.uint8), "rgb8")
    check_image(msg)
    msg.encoding = "yuv422"
    with pytest.raises(ImageError, match="unsupported colour encoding 'yuv422'"):
        check_image(msg)
    check_compressed(CompressedImage(format="png", data=b"\x89PNG\r\n\x1a\n...."))
    with pytest.raises(ImageError, match="empty compressed image"):
        check_compressed(CompressedImage(format="jpeg", data=b""))
    with pytest.raises(ImageError, match="neither JPEG nor PNG"):
        check_compressed(CompressedImage(format="jpeg", data=b"BM......"))
