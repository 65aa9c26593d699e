"""Demo: run the perception node on procedurally drawn frames, over real DDS.

    python -m instructsam_ros.demo --out out/demo
    ros2 run instructsam_ros demo --out /tmp/demo --checkpoint /models/InstructSAM-2B

Starts the node (in this process, on its own executor thread), publishes an instruction
and a few procedural tabletop frames (`instructsam_core.sample_images`) to it through DDS like a camera driver and a planner
would, prints each InstanceSegmentation that comes back and writes the overlay images as
PNG files. With the default `--checkpoint tiny` the model is a tiny UNTRAINED network:
everything flows end to end (masks, boxes, label image, overlay), but what it segments is
noise, not mugs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="instructsam_ros.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="tiny", help="checkpoint dir; 'tiny' = untrained")
    p.add_argument("--device", default="cpu")
    p.add_argument("--instruction", default="the red mug")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold (default: 0 for the untrained tiny model, else 0.5)")
    p.add_argument("--size", default="240x320", help="frame size HxW")
    p.add_argument("--out", default="out/demo", help="folder for the overlay PNGs")
    p.add_argument("--domain-id", type=int, default=None,
                   help="ROS_DOMAIN_ID (default: a random one, so no robot hears the demo)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the number of frames answered."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.lifecycle import TransitionCallbackReturn
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header, String
    from PIL import Image as PILImage

    from instructsam_core.fileio import atomic_file
    from instructsam_core.sample_images import tabletop_scene
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.perception_node import PerceptionNode
    from instructsam_ros.qos import instruction_qos, output_qos

    h, w = (int(v) for v in args.size.lower().split("x"))
    threshold = args.threshold if args.threshold is not None else (
        0.0 if args.checkpoint == "tiny" else 0.5)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # Jazzy+
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")  # Humble (no discovery range there)
    domain = args.domain_id if args.domain_id is not None else random.randint(1, 100)
    if args.checkpoint == "tiny":
        print("NOTE: the model is the built-in tiny UNTRAINED InstructSAM (random weights, "
              f"score threshold {threshold}): the plumbing is real, the masks are noise.")
    rclpy.init(domain_id=domain)
    executor = MultiThreadedExecutor(num_threads=2)
    node = PerceptionNode(parameter_overrides=[
        Parameter("checkpoint", value=args.checkpoint), Parameter("device", value=args.device),
        Parameter("score_threshold", value=float(threshold)),
        Parameter("image_reliability", value="reliable"),
    ])
    demo = rclpy.create_node("instructsam_demo")
    results: dict[int, InstanceSegmentation] = {}
    overlays: dict[int, np.ndarray] = {}

    def on_result(msg):
        results[msg.header.stamp.sec] = msg

    def on_overlay(msg):
        a = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
        overlays[msg.header.stamp.sec] = a[:, :msg.width * 3].reshape(msg.height, msg.width, 3)

    demo.create_subscription(InstanceSegmentation, "/instructsam/instances", on_result, output_qos())
    demo.create_subscription(Image, "/instructsam/overlay", on_overlay, output_qos())
    image_pub = demo.create_publisher(Image, "/image", output_qos())
    instr_pub = demo.create_publisher(String, "/instruction", instruction_qos())
    executor.add_node(node)
    executor.add_node(demo)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    answered = 0
    try:
        ok = TransitionCallbackReturn.SUCCESS
        if node.trigger_configure() != ok or node.trigger_activate() != ok:
            print(f"error: {node.start_error}", file=sys.stderr)
            return 0
        instr_pub.publish(String(data=args.instruction))
        print(f"instruction -> /instruction: '{args.instruction}' (ROS_DOMAIN_ID {domain})")
        _wait(lambda: node.current_instruction().text == args.instruction, 10.0)
        _wait(lambda: image_pub.get_subscription_count() > 0, 10.0)
        for i in range(args.frames):
            header = Header(frame_id="camera_color_optical_frame")
            header.stamp.sec = i + 1  # one synthetic second per frame: easy to match
            frame = tabletop_scene(w, h, seed=i).image  # the core's sample scenes, one per frame
            image_pub.publish(numpy_to_image(frame, "rgb8", header))
            if not _wait(lambda: i + 1 in results and i + 1 in overlays, 120.0):
                print(f"frame {i}: no answer within 120 s", file=sys.stderr)
                continue
            res, ov = results[i + 1], overlays[i + 1]
            answered += 1
            path = out_dir / f"overlay_{i:02d}.png"
            with atomic_file(path) as tmp:
                PILImage.fromarray(np.ascontiguousarray(ov[:, :, ::-1])).save(tmp, format="PNG")
            inst = ", ".join(
                f"#{x.id} '{x.phrase}' score {x.score:.2f} box "
                f"({x.roi.x_offset},{x.roi.y_offset},{x.roi.width}x{x.roi.height})"
                for x in res.instances[:3])
            print(f"frame {i}: stamp {res.header.stamp.sec}.{res.header.stamp.nanosec:09d} "
                  f"frame_id {res.header.frame_id} instruction_id {res.instruction_id} "
                  f"phrases {list(res.phrases)}: {len(res.instances)} instance(s)"
                  f"{' - ' + inst if inst else ''}; engine {res.latency_engine * 1e3:.0f} ms, "
                  f"node {res.latency_node * 1e3:.0f} ms -> {path}")
    finally:
        # Stop spinning before anything is destroyed (destroying under a spinning
        # executor aborts), then the worker thread and model, then the nodes.
        executor.shutdown(timeout_sec=5.0)
        spin.join(timeout=5.0)
        node.close()
        demo.destroy_node()
        node.destroy_node()
        rclpy.try_shutdown()
    print(f"{answered}/{args.frames} frames answered; overlays in {out_dir}/")
    return answered


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point (`python -m instructsam_ros.demo`); exit 1 if a frame went unanswered."""
    from rclpy.utilities import remove_ros_args

    args = _parse(argv if argv is not None else remove_ros_args(sys.argv)[1:])
    return 0 if run(args) == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
