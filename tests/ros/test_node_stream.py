"""The perception node over DDS: images + instruction in, InstanceSegmentation out.

One node subprocess for the module (namespace /t_stream), started with the shipped
params file plus `checkpoint:=tiny score_threshold:=0.0`, driven by an rclpy client.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml

from ros_helpers import CONFIG, full_mask, publish_until, stamp_of, wait_for, with_stamp

NS = "/t_stream"
NODE = f"{NS}/instructsam"


@pytest.fixture(scope="module")
def node(start_node, client):
    proc = start_node(NS)
    proc.wait_active(client)
    return proc


@pytest.fixture(scope="module")
def io(node, client):
    """Publishers and collectors shared by the module's tests."""
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.qos import instruction_qos, output_qos
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    n = client.node
    io = type("IO", (), {})()
    io.image = n.create_publisher(Image, f"{NS}/image", output_qos())
    io.instruction = n.create_publisher(String, "/instruction", instruction_qos())
    io.results = client.collector(InstanceSegmentation, f"{NODE}/instances")
    io.labels = client.collector(Image, f"{NODE}/label_image")
    io.overlays = client.collector(Image, f"{NODE}/overlay")
    io.stamp = [1000]

    def next_stamp():
        io.stamp[0] += 1
        return (io.stamp[0], 123)

    io.next_stamp = next_stamp
    io.instruction.publish(String(data="the red mug"))
    wait_for(lambda: io.image.get_subscription_count() > 0, 30, what="image subscription")
    yield io
    n.destroy_publisher(io.instruction)  # its latched instruction must not leak into other modules


def _send(io, make_image, **kw):
    """Publish one good frame until its result arrives; returns (result, rgb, image msg)."""
    stamp = io.next_stamp()
    msg, rgb = make_image(stamp=stamp, **kw)
    result = publish_until(io.image, msg, with_stamp(io.results, stamp))
    return result, rgb, msg


def _set_instruction(io, text):
    from std_msgs.msg import String

    io.instruction.publish(String(data=text))


def test_params_file_is_accepted_by_the_real_node(node, client):
    from rcl_interfaces.srv import GetParameters, ListParameters

    names = client.call(ListParameters, f"{NODE}/list_parameters",
                        ListParameters.Request()).result.names
    expected = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    assert set(expected) <= set(names)
    got = client.call(GetParameters, f"{NODE}/get_parameters",
                      GetParameters.Request(names=list(expected))).values
    overridden = {"checkpoint": "tiny", "device": "cpu", "score_threshold": 0.0}
    for (name, want), value in zip(expected.items(), got):
        actual = {1: value.bool_value, 2: value.integer_value, 3: value.double_value,
                  4: value.string_value}[value.type]
        assert actual == overridden.get(name, want), name


def test_parameters_carry_descriptors_with_ranges_and_allowed_values(node, client):
    from rcl_interfaces.srv import DescribeParameters

    names = ["score_threshold", "max_instances", "dtype", "image_reliability", "checkpoint", "max_new_tokens",
             "mask_nms_iou"]
    d = {x.name: x for x in client.call(DescribeParameters, f"{NODE}/describe_parameters",
                                        DescribeParameters.Request(names=names)).descriptors}
    assert all(d[n].description for n in names)
    r = d["score_threshold"].floating_point_range[0]
    assert (r.from_value, r.to_value) == (-1.0, 1.0)  # -1: the checkpoint's own
    assert d["max_instances"].integer_range[0].to_value == 1000
    assert d["dtype"].additional_constraints == "one of: auto, float32, bfloat16, float16"
    assert "best_effort" in d["image_reliability"].additional_constraints
    assert d["max_new_tokens"].integer_range[0].to_value == 8192 and "cuts" in d["max_new_tokens"].description
    assert "1.0 = off" in d["mask_nms_iou"].description


def test_result_carries_the_frame_header_and_consistent_instances(io, make_image):
    result, rgb, msg = _send(io, make_image, frame_id="cam_left_optical", size=(96, 128))
    h, w = rgb.shape[:2]
    assert result.header.frame_id == "cam_left_optical"
    assert stamp_of(result) == stamp_of(msg)
    assert result.instruction == "the red mug" and result.instruction_id >= 1
    assert result.status == "ok"
    assert len(result.instances) > 0, "threshold 0 must let the tiny model's slots through"
    scores = [i.score for i in result.instances]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    labels = np.frombuffer(bytes(result.label_image.data), np.uint16).reshape(h, w)
    assert result.label_image.encoding == "mono16"
    assert result.label_image.header.frame_id == "cam_left_optical"
    masks = []
    for k, inst in enumerate(result.instances):
        assert inst.id == k + 1
        assert inst.phrase == result.phrases[inst.phrase_index]
        r = inst.roi
        assert 0 <= r.x_offset and r.x_offset + r.width <= w
        assert 0 <= r.y_offset and r.y_offset + r.height <= h
        assert (inst.mask.encoding, inst.mask.width, inst.mask.height) == ("mono8", r.width, r.height)
        crop = np.frombuffer(bytes(inst.mask.data), np.uint8)
        assert set(np.unique(crop)) <= {0, 255}
        m = full_mask(inst, h, w)
        assert inst.area == m.sum() > 0
        ys, xs = np.nonzero(m)  # the roi is the mask's tight box
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (
            r.x_offset, r.y_offset, r.x_offset + r.width - 1, r.y_offset + r.height - 1)
        assert not inst.has_position  # no depth on this node
        masks.append(m)
    masks = np.stack(masks)
    # The label image: background where no mask is, else the lowest id whose mask covers it.
    covered = masks.any(0)
    np.testing.assert_array_equal(labels == 0, ~covered)
    first = np.argmax(masks, axis=0) + 1
    np.testing.assert_array_equal(labels[covered], first[covered])
    assert result.latency_engine > 0 and result.latency_node >= result.latency_engine * 0.5
    assert result.image_age > 0  # the stamp (1001 s after the epoch) is old


def test_overlay_and_label_image_topics_match_the_frame(io, make_image):
    result, rgb, msg = _send(io, make_image, size=(72, 100), encoding="bgr8")
    stamp = stamp_of(msg)
    overlay = wait_for(with_stamp(io.overlays, stamp), 30, what="overlay")
    label = wait_for(with_stamp(io.labels, stamp), 30, what="label image")
    assert (overlay.encoding, overlay.height, overlay.width) == ("bgr8", 72, 100)
    assert overlay.header.frame_id == msg.header.frame_id
    ov = np.frombuffer(bytes(overlay.data), np.uint8).reshape(72, overlay.step)[:, :300]
    src_bgr = np.frombuffer(bytes(msg.data), np.uint8).reshape(72, 300)
    assert (ov != src_bgr).mean() > 0.05  # masks/boxes/text drawn over the image
    assert label.encoding == "mono16" and bytes(label.data) == bytes(result.label_image.data)


def test_instruction_id_rises_only_when_the_text_changes(io, make_image):
    first, _, _ = _send(io, make_image)
    _set_instruction(io, first.instruction)  # a repeat, as `ros2 topic pub` sends every second
    time.sleep(0.3)
    again, _, _ = _send(io, make_image)
    assert again.instruction_id == first.instruction_id
    _set_instruction(io, "the blue bowl")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        changed, _, _ = _send(io, make_image)
        if changed.instruction == "the blue bowl":
            break
    assert changed.instruction == "the blue bowl"
    assert changed.instruction_id == first.instruction_id + 1
    _set_instruction(io, "the red mug")


def test_empty_instruction_stops_results_until_a_new_one(io, make_image):
    _send(io, make_image)
    _set_instruction(io, "")
    time.sleep(0.5)
    stamp = io.next_stamp()
    msg, _ = make_image(stamp=stamp)
    for _ in range(4):
        io.image.publish(msg)
        time.sleep(0.3)
    assert with_stamp(io.results, stamp)() is None
    _set_instruction(io, "the red mug")
    result, _, _ = _send(io, make_image)
    assert result.instruction == "the red mug"


def _corrupt(kind, msg):
    if kind == "unknown encoding":
        msg.encoding = "yuv422_yuy2"
        return "unsupported colour encoding 'yuv422_yuy2'"
    if kind == "step mismatch":
        msg.step = msg.width * 3 - 2
        return "is smaller than width*bytes per pixel"
    if kind == "truncated":
        msg.data = bytes(msg.data)[: len(msg.data) // 2]
        return "truncated colour image"
    if kind == "zero size":
        msg.height, msg.width, msg.step, msg.data = 0, 0, 0, b""
        return "zero-size colour image"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["unknown encoding", "step mismatch", "truncated", "zero size"])
def test_bad_image_is_skipped_with_a_warning_and_the_node_serves_the_next(io, node, make_image,
                                                                        kind):
    bad_stamp = io.next_stamp()
    bad, _ = make_image(stamp=bad_stamp)
    expected = _corrupt(kind, bad)
    for _ in range(3):
        io.image.publish(bad)
        time.sleep(0.1)
    wait_for(lambda: expected in node.log(), 20, what=f"warning '{expected}'")
    good, _, _ = _send(io, make_image)  # still alive and answering
    assert good.instances
    assert with_stamp(io.results, bad_stamp)() is None
    assert node.proc.poll() is None


def test_non_utf8_instruction_is_rejected_and_clears(io, node, make_image):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    raw = bytearray(serialize_message(String(data="the mug AB")))
    at = raw.index(b"AB")
    raw[at:at + 2] = b"\xff\xfe"  # not UTF-8
    before, _, _ = _send(io, make_image)
    io.instruction.publish(bytes(raw))
    wait_for(lambda: "not valid UTF-8" in node.log(), 20, what="the UTF-8 warning")
    stamp = io.next_stamp()
    msg, _ = make_image(stamp=stamp)
    for _ in range(3):
        io.image.publish(msg)
        time.sleep(0.3)
    assert with_stamp(io.results, stamp)() is None  # cleared: nothing is segmented
    _set_instruction(io, "the red mug")
    after, _, _ = _send(io, make_image)
    assert after.instruction == "the red mug" and after.instruction_id > before.instruction_id


def test_over_long_instruction_is_rejected_and_the_current_one_stays(io, node, client, make_image):
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters

    req = SetParameters.Request(parameters=[Parameter(
        name="max_instruction_chars", value=ParameterValue(type=2, integer_value=40))])
    assert client.call(SetParameters, f"{NODE}/set_parameters", req).results[0].successful
    from std_msgs.msg import String

    _set_instruction(io, "the red mug")
    io.instruction.publish(String(data="the red mug " * 100))
    wait_for(lambda: "more than the limit of 40 (parameter max_instruction_chars)" in node.log(), 20,
             what="the limit warning")
    assert "the current one kept" in node.log()
    result, _, _ = _send(io, make_image)
    assert result.instruction == "the red mug"  # never cut, never replaced
    req.parameters[0].value.integer_value = 2000
    assert client.call(SetParameters, f"{NODE}/set_parameters", req).results[0].successful


def test_runtime_parameters_are_validated_and_applied(io, client, make_image):
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters

    def set_param(name, **value):
        req = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(**value))])
        return client.call(SetParameters, f"{NODE}/set_parameters", req).results[0]

    bad = set_param("device", type=4, string_value="gpu")
    assert not bad.successful and "device 'gpu'" in bad.reason
    assert not set_param("score_threshold", type=3, double_value=1.5).successful  # range
    assert not set_param("dtype", type=4, string_value="int4").successful
    assert set_param("max_instances", type=2, integer_value=1).successful
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result, _, _ = _send(io, make_image)
        if len(result.instances) <= 1:
            break
    assert len(result.instances) == 1
    assert set_param("max_instances", type=2, integer_value=0).successful


def _set(client, name, **value):
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters

    req = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(**value))])
    result = client.call(SetParameters, f"{NODE}/set_parameters", req).results[0]
    assert result.successful, result.reason


def test_publish_overlay_off_keeps_instances_but_stops_the_overlay(io, client, make_image):
    _set(client, "publish_overlay", type=1, bool_value=False)
    try:
        result, _, msg = _send(io, make_image)
        time.sleep(0.5)
        assert with_stamp(io.overlays, stamp_of(msg))() is None
    finally:
        _set(client, "publish_overlay", type=1, bool_value=True)
    _, _, msg = _send(io, make_image)
    wait_for(with_stamp(io.overlays, stamp_of(msg)), 10, what="the overlay again")


def test_max_rate_limits_processed_frames(io, client, make_image):
    _set(client, "max_rate", type=3, double_value=2.0)
    try:
        stamps = [io.next_stamp() for _ in range(30)]
        t0 = time.monotonic()
        for s in stamps:  # 20 Hz for 1.5 s
            io.image.publish(make_image(stamp=s)[0])
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let the last accepted frame finish
        answered = [m for m in io.results if stamp_of(m) in stamps]
        assert 1 <= len(answered) <= 2.0 * elapsed + 1
    finally:
        _set(client, "max_rate", type=3, double_value=0.0)


def test_only_the_newest_frame_is_kept_and_drops_are_counted(io, make_image):
    before, _, _ = _send(io, make_image)
    stamps = [io.next_stamp() for _ in range(25)]
    burst = [make_image(stamp=s)[0] for s in stamps]
    for msg in burst:  # 200 Hz, faster than the model (but each reaches the node)
        io.image.publish(msg)
        time.sleep(0.005)
    # The newest frame of the burst is the one left waiting: it gets answered (sent once).
    last = wait_for(with_stamp(io.results, stamps[-1]), 60, what="the newest frame of the burst")
    answered = [stamp_of(m) for m in io.results if stamp_of(m) in stamps]
    assert len(answered) < len(stamps)  # no queue: most of the burst was skipped
    assert set(answered) <= set(stamps)  # each result carries the stamp of its own frame
    assert last.frames_dropped > before.frames_dropped  # the skipped ones were counted


def test_frames_with_identical_stamps_are_each_encoded(io, client, make_image):
    """Hand-made publishers send zero (or repeated) stamps: a stamp is no frame identity,
    so a new image with the same stamp must not reuse the previous image's features."""
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.srv import Segment

    stamp = (0, 0)
    msg_a, rgb_a = make_image(stamp=stamp, seed=0)
    msg_b = numpy_to_image(np.ascontiguousarray(255 - rgb_a), "rgb8", msg_a.header)

    def via_service(msg):  # the reference answer for one image
        req = Segment.Request(image=msg, instruction="the red mug", score_threshold=0.0)
        resp = client.call(Segment, f"{NODE}/segment", req)
        assert resp.success, resp.message
        return bytes(resp.result.label_image.data)

    want_a, want_b = via_service(msg_a), via_service(msg_b)
    assert want_a != want_b  # different content, different masks (the premise)

    def answer(n, want):
        return lambda: next((m for m in io.results[n:] if stamp_of(m) == stamp
                             and m.instruction == "the red mug"
                             and bytes(m.label_image.data) == want), None)

    publish_until(io.image, msg_a, answer(len(io.results), want_a), timeout=30)
    # Same stamp, other image: answered for B itself, not with A's cached features.
    publish_until(io.image, msg_b, answer(len(io.results), want_b), timeout=30)


def test_diagnostics_report_rates_drops_and_staleness(io, client):
    from diagnostic_msgs.msg import DiagnosticArray

    diags = client.collector(DiagnosticArray, "/diagnostics")
    name = f"{NODE}: instructsam perception"
    arr = wait_for(lambda: next((d for d in diags if d.status and d.status[0].name == name),
                                None), 10, what=f"diagnostics '{name}'")
    status = arr.status[0]
    # The test frames are stamped ~1000 s after the epoch: the node must call that stale.
    assert float({kv.key: kv.value for kv in status.values}["staleness_s"]) > 1e8
    assert status.level == status.WARN
    assert status.message in ("results are stale", "no images arriving")
    values = {kv.key: kv.value for kv in status.values}
    for key in ("input_rate_hz", "frames_dropped", "frames_processed", "staleness_s",
                "last_latency_s", "instruction", "instruction_id"):
        assert key in values, key
    assert int(values["frames_processed"]) > 0 and int(values["frames_received"]) > 0
