"""Compressed input, depth + camera_info synchronisation, 3D fields, and ~/segment.

One node subprocess (namespace /t_depth) with compressed_input and use_depth on.
"""

from __future__ import annotations

import io as _io
import time

import numpy as np
import pytest

from ros_helpers import publish_until, stamp_of, wait_for, with_stamp

NS = "/t_depth"
NODE = f"{NS}/instructsam"
H, W = 60, 80
FX = FY = 80.0
CX, CY = 40.0, 30.0
DEPTH_MM = 1500


@pytest.fixture(scope="module")
def node(start_node, client):
    # Debug logging for the node's own logger: the service logs when a request starts.
    proc = start_node(NS, {"compressed_input": True, "use_depth": True,
                           "depth_sync_tolerance": 0.01},
                      ["--log-level", f"{NS.strip('/')}.instructsam:=debug"])
    proc.wait_active(client)
    return proc


def _header(stamp, frame_id):
    from std_msgs.msg import Header

    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = stamp
    return h


def _compressed(stamp, rgb, fmt="png"):
    from PIL import Image
    from sensor_msgs.msg import CompressedImage

    buf = _io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt.upper())
    return CompressedImage(header=_header(stamp, "cam_color_optical"), format=fmt,
                           data=buf.getvalue())


def _depth(stamp, mm=DEPTH_MM, encoding="16UC1"):
    from instructsam_ros.conversions import numpy_to_image

    if encoding == "16UC1":
        arr = np.full((H, W), mm, np.uint16)
        arr[0, :] = 0  # an invalid row: ignored
    else:
        arr = np.full((H, W), mm / 1000.0, np.float32)
        arr[0, :] = np.nan
    return numpy_to_image(arr, encoding, _header(stamp, "cam_depth_optical"))


def _info(stamp):
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(header=_header(stamp, "cam_depth_optical"), height=H, width=W)
    info.k = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
    return info


@pytest.fixture(scope="module")
def io(node, client):
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.qos import instruction_qos, output_qos
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from std_msgs.msg import String
    from visualization_msgs.msg import MarkerArray

    n = client.node
    io = type("IO", (), {})()
    io.image = n.create_publisher(CompressedImage, f"{NS}/image/compressed", output_qos())
    io.depth = n.create_publisher(Image, f"{NS}/depth", output_qos())
    io.info = n.create_publisher(CameraInfo, f"{NS}/camera_info", output_qos())
    io.instruction = n.create_publisher(String, "/instruction", instruction_qos())
    io.results = client.collector(InstanceSegmentation, f"{NODE}/instances")
    io.markers = client.collector(MarkerArray, f"{NODE}/markers")
    io.instruction.publish(String(data="the green apple"))
    for pub in (io.image, io.depth, io.info):
        wait_for(lambda: pub.get_subscription_count() > 0, 30, what="subscriptions")
    yield io
    n.destroy_publisher(io.instruction)


def _scene(seed=0):
    from instructsam_core.sample_images import tabletop_scene

    return tabletop_scene(W, H, seed).image


def test_compressed_frame_with_matching_depth_gets_3d_positions(io):
    stamp = (500, 1000)

    def send_and_check():
        io.info.publish(_info(stamp))
        io.depth.publish(_depth(stamp))
        io.image.publish(_compressed(stamp, _scene()))
        time.sleep(0.3)  # depth first, so the frame finds it
        return with_stamp(io.results, stamp)()

    result = wait_for(send_and_check, 60, interval=0.0, what="a result with depth")
    assert result.header.frame_id == "cam_color_optical"
    assert result.depth_frame_id == "cam_depth_optical"
    assert result.instances
    for inst in result.instances:
        assert inst.has_position
        assert inst.centroid.z == pytest.approx(DEPTH_MM / 1000.0, abs=1e-6)
        # centroid x/y: back-projection of the median pixel of the mask (rows >= 1)
        ys, xs = np.mgrid[inst.roi.y_offset:inst.roi.y_offset + inst.roi.height,
                          inst.roi.x_offset:inst.roi.x_offset + inst.roi.width]
        crop = np.frombuffer(bytes(inst.mask.data), np.uint8).reshape(inst.mask.height, -1) > 0
        valid = crop & (ys >= 1)
        assert inst.depth_points == valid.sum()
        assert inst.centroid.x == pytest.approx((np.median(xs[valid]) - CX) * 1.5 / FX, abs=1e-6)
        assert inst.centroid.y == pytest.approx((np.median(ys[valid]) - CY) * 1.5 / FY, abs=1e-6)
        assert inst.extent.z == pytest.approx(0.0, abs=1e-6) and inst.extent.x > 0
    # RViz markers of that frame: a DELETEALL, then a box and a label per instance
    markers = wait_for(lambda: next((m for m in list(io.markers) if m.markers and
                                     stamp_of(m.markers[0]) == stamp), None), 20, what="the markers")
    from visualization_msgs.msg import Marker

    clear, *rest = markers.markers
    assert clear.action == Marker.DELETEALL
    boxes = {m.id: m for m in rest if m.ns == "instances"}
    labels = {m.id: m for m in rest if m.ns == "labels"}
    assert set(boxes) == set(labels) == {inst.id for inst in result.instances}
    for inst in result.instances:
        box, label = boxes[inst.id], labels[inst.id]
        assert box.type == Marker.CUBE and box.header.frame_id == "cam_color_optical"
        assert (box.pose.position.x, box.pose.position.z) == (inst.centroid.x, inst.centroid.z)
        assert box.scale.z == pytest.approx(0.01) and box.lifetime.sec == 1  # a flat patch still shows
        assert label.type == Marker.TEXT_VIEW_FACING and label.text.startswith(f"{inst.id} {inst.phrase} ")


def _set_param(client, name, **value):
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters

    req = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(**value))])
    result = client.call(SetParameters, f"{NODE}/set_parameters", req).results[0]
    assert result.successful, result.reason


def test_depth_published_after_the_image_is_waited_for(io, client):
    """Aligned depth usually comes after its colour frame: the frame waits for it
    (up to depth_wait_s) instead of going out without 3D fields."""
    _set_param(client, "depth_wait_s", type=3, double_value=1.0)
    try:
        result = None
        for attempt in range(5):  # a new stamp per attempt, in case a frame is lost
            stamp = (510 + attempt, 0)
            io.image.publish(_compressed(stamp, _scene(4)))
            time.sleep(0.2)  # the node has the frame before its depth exists
            io.depth.publish(_depth(stamp))
            io.info.publish(_info(stamp))
            try:
                result = wait_for(with_stamp(io.results, stamp), 15, what="the result")
                break
            except AssertionError:
                continue
        assert result is not None, "no frame answered"
    finally:
        _set_param(client, "depth_wait_s", type=3, double_value=0.1)
    assert result.depth_frame_id == "cam_depth_optical"
    assert result.instances and all(i.has_position for i in result.instances)
    assert result.instances[0].centroid.z == pytest.approx(DEPTH_MM / 1000.0, abs=1e-6)


def test_depth_outside_the_tolerance_is_not_used(io, node):
    stamp = (501, 0)
    far = (501, 50_000_000)  # 50 ms away; tolerance is 10 ms
    io.depth.publish(_depth(far))
    io.info.publish(_info(far))
    time.sleep(0.3)
    result = publish_until(io.image, _compressed(stamp, _scene(1)), with_stamp(io.results, stamp))
    assert result.instances and result.depth_frame_id == ""
    assert not any(i.has_position for i in result.instances)
    wait_for(lambda: "no depth/camera_info within 0.01 s" in node.log(), 10,
             what="the sync warning")


def test_jpeg_is_accepted_and_malformed_compressed_is_skipped(io, node):
    from sensor_msgs.msg import CompressedImage

    bad_stamp = (502, 0)
    bad = CompressedImage(header=_header(bad_stamp, "cam_color_optical"), format="jpeg",
                          data=b"\xff\xd8\xff\xe0 definitely not a jpeg")
    for _ in range(3):
        io.image.publish(bad)
        time.sleep(0.1)
    wait_for(lambda: "malformed compressed image" in node.log(), 20, what="the warning")
    stamp = (503, 0)
    good = publish_until(io.image, _compressed(stamp, _scene(2), "jpeg"),
                         with_stamp(io.results, stamp))
    assert good.instances and with_stamp(io.results, bad_stamp)() is None


def _request(stamp=(600, 7), depth=True, instruction="the blue bowl", ident=4242):
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.srv import Segment

    req = Segment.Request()
    req.image = numpy_to_image(_scene(3), "rgb8", _header(stamp, "cam_color_optical"))
    if depth:
        req.depth = _depth(stamp, mm=800, encoding="32FC1")
        req.camera_info = _info(stamp)
    req.instruction = instruction
    req.instruction_id = ident
    req.score_threshold = 0.0
    return req


def test_segment_service_answers_with_the_requesters_id_and_3d(node, client):
    from instructsam_ros.srv import Segment

    resp = client.call(Segment, f"{NODE}/segment", _request())
    assert resp.success, resp.message
    r = resp.result
    assert r.instruction_id == 4242 and r.instruction == "the blue bowl"
    assert stamp_of(r) == (600, 7) and r.header.frame_id == "cam_color_optical"
    assert r.instances and all(i.has_position for i in r.instances)
    assert r.instances[0].centroid.z == pytest.approx(0.8, abs=1e-6)
    assert (r.label_image.height, r.label_image.width) == (H, W)
    assert r.frames_dropped == 0


def test_segment_service_score_threshold_one_finds_nothing_but_succeeds(node, client):
    from instructsam_ros.srv import Segment

    req = _request(depth=False)
    req.score_threshold = 1.0
    resp = client.call(Segment, f"{NODE}/segment", req)
    assert resp.success and len(resp.result.instances) == 0
    assert list(resp.result.phrases) == [req.instruction]  # what was looked for, found nowhere
    assert resp.result.status == "ok"  # the answer paired; nothing scored above 1.0
    labels = np.frombuffer(bytes(resp.result.label_image.data), np.uint16)
    assert labels.size == H * W and not labels.any()


@pytest.mark.parametrize("problem,expected", [
    ("encoding", "unsupported colour encoding 'bayer_rggb8'"),
    ("instruction", "instruction is empty"),
    ("depth size", "depth is 80x30 but the image is 80x60"),
    ("camera_info", "invalid focal lengths"),
    ("camera_info size", "camera_info is 640x480 but the depth image is 80x60"),
    ("nan threshold", "score_threshold nan is not in 0..1"),
    ("threshold above 1", "score_threshold 1.5 is not in 0..1"),
])
def test_segment_service_rejects_bad_requests_and_keeps_serving(node, client, problem,
                                                               expected):
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.srv import Segment

    req = _request()
    if problem == "encoding":
        req.image.encoding = "bayer_rggb8"
    elif problem == "instruction":
        req.instruction = "   "
    elif problem == "depth size":
        req.depth = numpy_to_image(np.full((30, W), 1000, np.uint16), "16UC1", req.depth.header)
    elif problem == "camera_info":
        req.camera_info.k = [0.0] * 9
    elif problem == "camera_info size":
        req.camera_info.width, req.camera_info.height = 640, 480
    elif problem == "nan threshold":
        req.score_threshold = float("nan")
    else:
        req.score_threshold = 1.5
    resp = client.call(Segment, f"{NODE}/segment", req)
    assert not resp.success and expected in resp.message
    ok = client.call(Segment, f"{NODE}/segment", _request(depth=False))
    assert ok.success and ok.result.instances


def test_other_callbacks_are_served_while_the_service_computes(node, client):
    """~/segment runs in its own callback group on a multi-threaded executor: a parameter
    request sent while an inference is in flight is answered before the inference ends."""
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.srv import Segment
    from rcl_interfaces.srv import GetParameters

    from instructsam_core.sample_images import tabletop_scene

    seg = client.node.create_client(Segment, f"{NODE}/segment")
    get = client.node.create_client(GetParameters, f"{NODE}/get_parameters")
    try:
        assert seg.wait_for_service(timeout_sec=30) and get.wait_for_service(timeout_sec=30)
        req = _request(depth=False, ident=4343)
        # A 4K frame keeps the tiny model busy for a few tenths of a second.
        req.image = numpy_to_image(tabletop_scene(3840, 2160, 5).image, "rgb8", req.image.header)
        future = seg.call_async(req)
        wait_for(lambda: "segment request 4343 received" in node.log() or future.done(), 60,
                 what="the service to start")
        answered_while_busy = False
        while not future.done() and not answered_while_busy:
            reply = get.call_async(GetParameters.Request(names=["score_threshold"]))
            wait_for(lambda: reply.done() or future.done(), 60, interval=0.005,
                     what="either answer")
            answered_while_busy = reply.done() and not future.done()
        wait_for(future.done, 60, what="the service answer")
        assert future.result().success, future.result().message
        assert answered_while_busy, "the parameter request waited for the inference"
    finally:
        client.node.destroy_client(seg)
        client.node.destroy_client(get)
