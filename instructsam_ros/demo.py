"""Demo (the README's main job): the perception node on a camera stream, over real DDS.

    python -m instructsam_ros.demo --out out/demo
    ros2 run instructsam_ros demo --out /tmp/demo --checkpoint /models/InstructSAM-2B

Starts the node (in this process, on its own executor thread) with the shipped default
model, then plays a camera and a task planner: it publishes a short stream of scenes of
the synthetic tabletop world that no training run has seen (seeds of their own) on
/image, and a new instruction of another kind (colour, attribute, category, spatial,
multi-target, no target, ...) on /instruction every frame, as a person would type it
("the red mug"; the default model's engine_config.json puts it in the one form its
training data ask, `instructsam_core.world.TRAINED_TEMPLATE`). For each frame it writes the
node's overlay (PNG), its label image (PNG) and the InstanceSegmentation it received
(JSON, images summarised), and prints a table: instruction, instances found, scores, IoU
of their union with the scene's ground truth, latency.

With `--checkpoint tiny` the model is a tiny UNTRAINED network: everything flows end to
end, but what it segments is noise; a real checkpoint on these drawn scenes segments
whatever it makes of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Scenes from seeds no training split uses (training/default_model.py: 0..1_000_299).
DEMO_SEEDS = 2_000_000
# One instruction kind per frame, in this order (a kind the scene does not allow is skipped).
KIND_ORDER = ("colour", "attribute", "category", "spatial", "multi", "no_target", "superlative", "intent",
              "exclusion")


@dataclass
class Step:
    """One frame of the stream: its picture, the instruction sent with it, the truth."""

    image: np.ndarray
    instruction: str  # what is published on /instruction, as a person would type it
    kind: str
    truth: np.ndarray  # (H, W) bool: every target pixel
    targets: int  # how many instances the instruction names (0: none in the scene)


def demo_steps(frames: int, height: int, width: int) -> list[Step]:
    """Scenes and instructions (with their exact targets) of the stream, deterministic."""
    from instructsam_core.sample_images import random_scene
    from instructsam_core.world import expressions

    steps: list[Step] = []
    seed = DEMO_SEEDS
    while len(steps) < frames:
        scene = random_scene(seed, width, height)
        rng = np.random.default_rng([seed, 7])
        for offset in range(len(KIND_ORDER)):  # this frame's kind, or the next the scene allows
            kind = KIND_ORDER[(len(steps) + offset) % len(KIND_ORDER)]
            found = expressions(scene, rng, (kind,))
            if found:
                e = found[0]
                truth = np.zeros(scene.image.shape[:2], bool)
                for i in e.targets:
                    truth |= scene.objects[i].mask
                steps.append(Step(scene.image, e.text, e.kind, truth, len(e.targets)))
                break
        seed += 1
    return steps


def segmentation_to_dict(msg) -> dict:
    """An InstanceSegmentation as JSON-able data; images are summarised (size, encoding)."""
    def image(img) -> dict:
        return {"height": img.height, "width": img.width, "encoding": img.encoding}

    return {
        "header": {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
                   "frame_id": msg.header.frame_id},
        "instruction": msg.instruction, "instruction_id": msg.instruction_id, "phrases": list(msg.phrases),
        "generated_text": msg.generated_text, "status": msg.status,
        "instances": [{"id": x.id, "score": round(float(x.score), 4), "slot": x.slot, "phrase": x.phrase,
                       "phrase_index": x.phrase_index,
                       "roi": {"x_offset": x.roi.x_offset, "y_offset": x.roi.y_offset,
                               "width": x.roi.width, "height": x.roi.height},
                       "mask": image(x.mask), "area": x.area, "has_position": x.has_position}
                      for x in msg.instances],
        "label_image": image(msg.label_image),
        "latency": {k: round(float(getattr(msg, f"latency_{k}")), 4)
                    for k in ("image_encode", "generate", "mask_head", "postprocess", "engine", "node")},
        "image_age": round(float(msg.image_age), 4), "frames_dropped": msg.frames_dropped,
    }


def card_scores() -> str:
    """One line of the default model's held-out scores, from the scores.json beside it."""
    from instructsam_core.build import default_model_dir

    held = json.loads((default_model_dir() / "scores.json").read_text(encoding="utf-8"))["heldout"]
    return (f"its held-out scores (MODEL_CARD.md): T-acc {held['t_acc']:.2f}, N-acc {held['n_acc']:.2f}, "
            f"colour mIoU {held['kinds']['colour']['miou']:.2f}, multi-instance mAP {held['multi_map']:.2f}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="instructsam_ros.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="default",
                   help="'default' (the shipped model), a checkpoint directory, or 'tiny' (untrained)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=8, help="frames in the stream (one instruction each)")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold (default: 0 for the untrained tiny model, else the checkpoint's own: "
                        "its engine_config.json, or 0.5)")
    p.add_argument("--size", default="240x320", help="frame size HxW")
    p.add_argument("--out", default="out/demo", help="folder for the overlays, label images and messages")
    p.add_argument("--domain-id", type=int, default=None,
                   help="ROS_DOMAIN_ID (default: a random one, so no robot hears the demo)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Run the demo; returns one summary row per frame answered."""
    import rclpy
    from PIL import Image as PILImage
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header, String

    from instructsam_core.fileio import atomic_file, write_text_atomic
    from instructsam_core.postprocess import mask_iou
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.perception_node import PerceptionNode
    from instructsam_ros.qos import instruction_qos, output_qos

    h, w = (int(v) for v in args.size.lower().split("x"))
    threshold = args.threshold if args.threshold is not None else (0.0 if args.checkpoint == "tiny" else -1.0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # Jazzy+
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")  # Humble (no discovery range there)
    domain = args.domain_id if args.domain_id is not None else random.randint(1, 100)
    if args.checkpoint == "tiny":
        print("NOTE: the model is the built-in tiny UNTRAINED InstructSAM (random weights, "
              f"score threshold {threshold}): the plumbing is real, the masks are noise.")
    elif args.checkpoint == "default":
        print("NOTE: the model is the shipped default model, trained on the synthetic tabletop world "
              "only (instructsam_core/default_model/MODEL_CARD.md); the scenes below are of that world.")
        print(f"      {card_scores()}")
    steps = demo_steps(args.frames, h, w)
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
    rows: list[dict] = []
    try:
        ok = TransitionCallbackReturn.SUCCESS
        if node.trigger_configure() != ok or node.trigger_activate() != ok:
            print(f"error: {node.start_error}", file=sys.stderr)
            return rows
        print(f"publishing {len(steps)} frames on /image and an instruction per frame on /instruction "
              f"(ROS_DOMAIN_ID {domain})")
        _wait(lambda: image_pub.get_subscription_count() > 0, 10.0)
        for i, step in enumerate(steps):
            instr_pub.publish(String(data=step.instruction))
            if not _wait(lambda: node.current_instruction().text == step.instruction, 10.0):
                print(f"frame {i}: the node did not take the instruction within 10 s", file=sys.stderr)
                continue
            header = Header(frame_id="camera_color_optical_frame")
            header.stamp.sec = i + 1  # one synthetic second per frame: easy to match
            image_pub.publish(numpy_to_image(step.image, "rgb8", header))
            if not _wait(lambda: i + 1 in results and i + 1 in overlays, 120.0):
                print(f"frame {i}: no answer within 120 s", file=sys.stderr)
                continue
            res, ov = results[i + 1], overlays[i + 1]
            labels = np.frombuffer(bytes(res.label_image.data), np.uint16).reshape(res.label_image.height,
                                                                                   res.label_image.width)
            stem = out_dir / f"frame_{i:02d}"
            with atomic_file(f"{stem}_overlay.png") as tmp:
                PILImage.fromarray(np.ascontiguousarray(ov[:, :, ::-1])).save(tmp, format="PNG")
            with atomic_file(f"{stem}_labels.png") as tmp:
                PILImage.fromarray(labels).save(tmp, format="PNG")
            write_text_atomic(f"{stem}_instances.json", json.dumps(segmentation_to_dict(res), indent=1))
            rows.append({"frame": i, "kind": step.kind, "instruction": step.instruction, "expression": step.instruction,
                         "found": len(res.instances), "targets": step.targets,
                         "scores": [round(float(x.score), 2) for x in res.instances],
                         "iou": mask_iou(labels > 0, step.truth), "status": res.status,
                         "engine_ms": 1e3 * res.latency_engine, "node_ms": 1e3 * res.latency_node})
    finally:
        # Stop spinning before anything is destroyed (destroying under a spinning
        # executor aborts), then the worker thread and model, then the nodes.
        executor.shutdown(timeout_sec=5.0)
        spin.join(timeout=5.0)
        node.close()
        demo.destroy_node()
        node.destroy_node()
        rclpy.try_shutdown()
    write_text_atomic(out_dir / "summary.json", json.dumps(rows, indent=1))
    print(summary_table(rows))
    print(f"{len(rows)}/{len(steps)} frames answered; overlays, label images and messages in {out_dir}/")
    return rows


def summary_table(rows: list[dict]) -> str:
    """The printed table: one line per frame, then the mean IoU."""
    lines = [f"{'#':>2}  {'kind':<11} {'asks for':<34} {'targets':>7} {'found':>5}  {'scores':<22} {'IoU':>5}  "
             f"{'engine':>8}  {'node':>8}"]
    for r in rows:
        scores = " ".join(f"{s:.2f}" for s in r["scores"][:5]) + (" ..." if len(r["scores"]) > 5 else "")
        lines.append(f"{r['frame']:>2}  {r['kind']:<11} {r['expression'][:34]:<34} {r['targets']:>7} {r['found']:>5}  "
                     f"{scores or '-':<22} {r['iou']:>5.2f}  {r['engine_ms']:>6.0f}ms  {r['node_ms']:>6.0f}ms")
    if rows:
        lines.append(f"mean IoU of the answers' union masks with the ground truth: "
                     f"{np.mean([r['iou'] for r in rows]):.2f} over {len(rows)} frames")
    return "\n".join(lines)


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
    return 0 if len(run(args)) == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
