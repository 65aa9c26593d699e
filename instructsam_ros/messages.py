"""Build InstanceSegmentation messages from the engine's Result (no node state here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from instructsam_core.postprocess import label_image
from instructsam_ros.conversions import ImageError, crop_mask, depth_to_metres, numpy_to_image
from instructsam_ros.geometry import Intrinsics, check_camera_info_size, mask_position


@dataclass
class DepthInput:
    """A depth frame matched to the colour frame: metres `(H, W)` (NaN = invalid)."""

    metres: np.ndarray
    intrinsics: Intrinsics
    frame_id: str


def depth_input(depth_msg, camera_info, image_size: tuple[int, int]) -> DepthInput:
    """A depth image and its camera_info as metres + intrinsics, checked against the colour
    image's `(H, W)`. Raises ImageError or ValueError saying what does not fit."""
    metres = depth_to_metres(depth_msg)
    if metres.shape != tuple(image_size):
        raise ImageError(f"depth is {metres.shape[1]}x{metres.shape[0]} but the image is "
                         f"{image_size[1]}x{image_size[0]}: depth must be aligned to the colour image",
                         "size")
    k = Intrinsics.from_camera_info(camera_info)
    check_camera_info_size(camera_info, *metres.shape)
    return DepthInput(metres, k, depth_msg.header.frame_id)


@dataclass
class Timing:
    """Node-side numbers that go into the message next to the engine's timings."""

    latency_node: float = 0.0  # seconds from the image's arrival to publishing
    image_age: float = 0.0  # seconds: now - header.stamp
    frames_dropped: int = 0


def result_to_msg(result, header, instruction: str, instruction_id: int, *,
                  with_label_image: bool = True, depth: DepthInput | None = None,
                  timing: Timing | None = None):
    """InstanceSegmentation for one Result, with `header` copied from the source image.

    Args:
        result: instructsam_core.result.Result (masks sorted by score, best first).
        header: std_msgs/Header of the source image (stamp and frame_id are kept).
        depth: when given and the same size as the image, fills the 3D fields.
    """
    from instructsam_ros.msg import Instance, InstanceSegmentation

    timing = timing or Timing()
    msg = InstanceSegmentation()
    msg.header = header
    msg.instruction = instruction
    msg.instruction_id = int(instruction_id)
    # Phrases in generation order, so Instance.phrase_index indexes this list. The
    # engine's target_phrases keeps phrases that found nothing too.
    phrases = list(result.target_phrases)
    if not phrases and len(result):  # a Result made without them: rebuild from the instances
        phrases = [""] * (int(result.phrase_indices.max()) + 1)
        for p, i in zip(result.phrases, result.phrase_indices):
            phrases[int(i)] = p
    msg.phrases = phrases
    msg.generated_text = result.generated_text
    msg.status = result.status
    use_depth = depth is not None and depth.metres.shape == tuple(result.image_size)
    if use_depth:
        msg.depth_frame_id = depth.frame_id
    instances = []
    for k in range(len(result)):
        inst = Instance()
        inst.id = k + 1
        inst.score = float(result.scores[k])
        inst.slot = int(result.slots[k])
        inst.phrase = result.phrases[k]
        inst.phrase_index = int(result.phrase_indices[k])
        x1, y1, x2, y2 = (int(v) for v in result.boxes[k])
        inst.roi.x_offset, inst.roi.y_offset = x1, y1
        inst.roi.width, inst.roi.height = x2 - x1 + 1, y2 - y1 + 1
        inst.roi.do_rectify = False
        inst.mask = numpy_to_image(crop_mask(result.masks[k], result.boxes[k]), "mono8", header)
        inst.area = int(result.masks[k].sum())
        if use_depth:
            pos = mask_position(result.masks[k], depth.metres, depth.intrinsics)
            if pos is not None:
                inst.has_position = True
                inst.centroid.x, inst.centroid.y, inst.centroid.z = pos.centroid
                inst.extent.x, inst.extent.y, inst.extent.z = pos.extent
                inst.depth_points = pos.points
        instances.append(inst)
    msg.instances = instances
    if with_label_image:
        msg.label_image = numpy_to_image(label_image(result.masks), "mono16", header)
    t = result.timings
    msg.latency_image_encode = float(t.get("image_encode", 0.0))
    msg.latency_generate = float(t.get("generate", 0.0))
    msg.latency_mask_head = float(t.get("mask_head", 0.0))
    msg.latency_postprocess = float(t.get("postprocess", 0.0))
    msg.latency_engine = float(t.get("total", 0.0))
    msg.latency_node = float(timing.latency_node)
    msg.image_age = float(timing.image_age)
    msg.frames_dropped = int(timing.frames_dropped)
    return msg
