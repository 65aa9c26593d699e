"""The InstructSAM perception node: images + instruction -> InstanceSegmentation.

A lifecycle node (configure: parameters, publishers, instruction subscription and the
service; activate: load and warm up the model, subscribe to images, start the inference
thread; deactivate: stop, free the model and the GPU memory). With `autostart` (the
default) it configures and activates itself, so a plain `ros2 run`/`ros2 launch` works.

Topics (relative names, change them by remapping):
    image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage)
    /instruction (std_msgs/String), depth (sensor_msgs/Image), camera_info
    ~/instances (InstanceSegmentation), ~/label_image (mono16), ~/overlay (bgr8)
    ~/segment (Segment service), /diagnostics (diagnostic_msgs/DiagnosticArray)

Run: `ros2 run instructsam_ros perception_node --ros-args -p checkpoint:=/path/to/ckpt`
or `python -m instructsam_ros.perception_node --ros-args ...`.
"""

from __future__ import annotations

import gc
import math
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
import rclpy.qos
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from instructsam_ros import params
from instructsam_ros.conversions import (ImageError, compressed_to_rgb, depth_to_metres,
                                         image_to_rgb, numpy_to_image)
from instructsam_ros.geometry import Intrinsics, check_camera_info_size
from instructsam_ros.instruction import InstructionError, InstructionState, InstructionTooLong, clean_instruction
from instructsam_ros.messages import DepthInput, Timing, result_to_msg
from instructsam_ros.overlay import overlay_bgr
from instructsam_ros.qos import image_qos, instruction_qos, output_qos
from instructsam_ros.sync import StampBuffer, stamp_ns

NODE_NAME = "instructsam"
WARN_REPEAT_S = 5.0  # warnings of one category are logged at most this often
DEPTH_KEEP_S = 2.0  # depth/camera_info kept this long (by stamp) for matching


@dataclass
class Frame:
    """A colour frame waiting for the model."""

    msg: Any  # sensor_msgs/Image or CompressedImage
    compressed: bool
    received: float  # time.monotonic() at arrival


class LatestFrame:
    """A one-frame slot: a new frame replaces an unprocessed one (which counts as dropped).

    So a slow model never builds a queue: it always works on the newest frame.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify()

    def take(self, timeout: float) -> Frame | None:
        """The newest frame, or None after `timeout` seconds or when closed."""
        with self._cond:
            if self._frame is None and not self._closed:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return None if self._closed else frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frame = None
            self._cond.notify_all()


@dataclass
class Stats:
    """Counters for diagnostics (written by callbacks and the worker; ints are atomic enough)."""

    received: int = 0
    processed: int = 0
    invalid: int = 0  # frames skipped for bad input
    rate_limited: int = 0  # frames skipped by max_rate
    failed: int = 0  # frames the engine raised on
    depth_unmatched: int = 0
    last_latency: float = 0.0
    last_age: float = 0.0
    last_instances: int = 0


class PerceptionNode(LifecycleNode):
    """InstructSAM as a ROS 2 lifecycle node (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.settings = params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.start_error = ""  # why the last configure/activate failed
        self._instruction = InstructionState()
        self._segmenter = None
        self._overlay_banner = ""  # shown on the overlay, e.g. that the model is untrained
        self._engine_lock = threading.Lock()  # the engine is not re-entrant
        self._slot = LatestFrame()
        self._worker: threading.Thread | None = None
        self._stats = Stats()
        self._active = False
        self._depth_enabled = False
        self._last_accept = 0.0
        self._warned: dict[str, float] = {}  # category -> last time logged
        self._depth_buf = StampBuffer(DEPTH_KEEP_S)
        self._info_buf = StampBuffer(DEPTH_KEEP_S)
        self._image_subs: list = []
        self._entities: list[tuple[str, Any]] = []  # (kind, entity) made at configure
        self._pub_instances = self._pub_label = self._pub_overlay = None
        self._pub_diag = None
        self._diag_prev = (time.monotonic(), 0)

    # ------------------------------------------------------------------ parameters

    def _on_set_parameters(self, changed: list) -> SetParametersResult:
        """Validate runtime changes; apply them when valid (ranges are checked by rclpy)."""
        candidate = self.settings.with_values({p.name: p.value for p in changed})
        problem = params.validate(candidate)
        if problem:
            self.get_logger().warning(f"rejected parameter change: {problem}")
            return SetParametersResult(successful=False, reason=problem)
        static = sorted(p.name for p in changed if p.name in params.STATIC)
        if static and self._entities:
            self.get_logger().info(
                f"{', '.join(static)} take effect at the next configure/activate")
        self.settings = candidate
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.settings = params.read(self)
        problem = params.validate(self.settings)
        if problem:
            self.start_error = f"invalid parameter: {problem}"
            self.get_logger().error(self.start_error)
            return TransitionCallbackReturn.FAILURE
        if not self.settings.checkpoint:
            self.start_error = ("parameter 'checkpoint' is empty: set it to an InstructSAM "
                                "checkpoint directory (or 'tiny' for the untrained test model)")
            self.get_logger().error(self.start_error)
            return TransitionCallbackReturn.FAILURE
        out = output_qos()
        self._pub_instances = self.create_lifecycle_publisher(
            _msg_types()[0], "~/instances", out)
        self._pub_label = self.create_lifecycle_publisher(Image, "~/label_image", out)
        self._pub_overlay = self.create_lifecycle_publisher(Image, "~/overlay", out)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Two subscriptions on /instruction: the transient-local one receives the last
        # instruction of latched publishers that were there before us; the volatile one
        # matches plain publishers such as `ros2 topic pub` (a transient-local reader
        # does not match a volatile writer). Identical text is deduplicated.
        latched = instruction_qos()
        volatile = instruction_qos()
        volatile.durability = rclpy.qos.DurabilityPolicy.VOLATILE
        self._entities = [
            ("lifecycle_publisher", self._pub_instances),
            ("lifecycle_publisher", self._pub_label),
            ("lifecycle_publisher", self._pub_overlay),
            ("publisher", self._pub_diag),
            ("subscription", self.create_subscription(
                String, "/instruction", self._on_instruction, latched)),
            ("subscription", self.create_subscription(
                String, "/instruction", self._on_instruction, volatile)),
            # Its own group: with the multi-threaded executor a long inference does not
            # hold up lifecycle, parameter, instruction and diagnostics callbacks.
            ("service", self.create_service(_msg_types()[1], "~/segment", self._on_segment,
                                            callback_group=MutuallyExclusiveCallbackGroup())),
            ("timer", self.create_timer(1.0, self._publish_diagnostics)),
        ]
        self.get_logger().info("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        s = self.settings
        try:
            self._segmenter = self._load_engine(s)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            self.start_error = (f"cannot load the InstructSAM model from checkpoint "
                                f"'{s.checkpoint}': {exc}")
            self.get_logger().error(self.start_error)
            self._segmenter = None
            return TransitionCallbackReturn.FAILURE
        self._slot = LatestFrame()
        self._stats = Stats()
        self._diag_prev = (time.monotonic(), 0)  # the counters restart with the stats
        qos = image_qos(s.image_reliability, s.image_qos_depth)
        if s.compressed_input:
            self._image_subs.append(self.create_subscription(
                CompressedImage, "image/compressed", self._on_compressed, qos))
        else:
            self._image_subs.append(self.create_subscription(Image, "image", self._on_image, qos))
        self._depth_enabled = s.use_depth  # fixed while active, whatever the parameter does
        if s.use_depth:
            self._image_subs.append(self.create_subscription(
                Image, "depth", self._depth_buf.add, qos))
            self._image_subs.append(self.create_subscription(
                CameraInfo, "camera_info", self._info_buf.add, qos))
        self._active = True
        self._worker = threading.Thread(target=self._run_worker, name="instructsam-inference",
                                        daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"active: model '{s.checkpoint}' on {self._segmenter.device} ({self._segmenter.dtype}), "
            f"{'compressed ' if s.compressed_input else ''}images from "
            f"'{self._image_subs[0].topic_name}'")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self.get_logger().info("deactivated: model unloaded")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_entities()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._destroy_entities()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._destroy_entities()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop the worker and release everything (for clean shutdown on SIGINT)."""
        self._stop_processing()
        self._destroy_entities()

    def current_instruction(self):
        """The latched instruction (text and id)."""
        return self._instruction.get()

    # ------------------------------------------------------------------ engine

    def _load_engine(self, s: params.Settings):
        """Load the engine and run one warm-up pass (first-call costs stay out of frames)."""
        from instructsam_core.engine import Segmenter

        t0 = time.monotonic()
        seg = Segmenter.from_pretrained(s.checkpoint, device=s.device, dtype=s.dtype, backend=s.backend,
                                        **params.engine_options(s))
        self._overlay_banner = ""
        if seg.is_untrained:
            self._overlay_banner = "UNTRAINED demo model: masks are random"
            self.get_logger().warning(
                f"checkpoint '{s.checkpoint}' is an UNTRAINED model: its masks are "
                "meaningless (for tests and demos only)")
        warm = np.full((112, 112, 3), 127, dtype=np.uint8)
        seg.set_image(warm, key=None)
        seg.segment("warm up", score_threshold=1.0)
        seg.reset()
        self.get_logger().info(f"model loaded and warmed up in {time.monotonic() - t0:.1f} s")
        return seg

    def _stop_processing(self) -> None:
        self._active = False
        for sub in self._image_subs:
            self.destroy_subscription(sub)
        self._image_subs = []
        self._slot.close()
        self._depth_buf.clear()  # also wakes a worker waiting for depth
        self._info_buf.clear()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None
        with self._engine_lock:
            seg, self._segmenter = self._segmenter, None
        if seg is not None:
            seg.release()  # the engine frees its device memory (CUDA cache included)
        gc.collect()

    def _destroy_entities(self) -> None:
        for kind, entity in self._entities:
            getattr(self, f"destroy_{kind}")(entity)
        self._entities = []
        self._pub_instances = self._pub_label = self._pub_overlay = self._pub_diag = None

    # ------------------------------------------------------------------ callbacks

    def _warn(self, category: str, text: str) -> None:
        """Log a warning, but at most one per `category` every WARN_REPEAT_S.

        Keyed by a fixed category (not the text, which holds sizes, stamps, user input),
        so the table stays as small as the list of categories.
        """
        now = time.monotonic()
        if now - self._warned.get(category, -1e9) >= WARN_REPEAT_S:
            self._warned[category] = now
            self.get_logger().warning(text)

    def _on_instruction(self, msg: String) -> None:
        try:
            text, warnings = clean_instruction(msg.data, self.settings.max_instruction_chars)
        except InstructionTooLong as exc:
            self._warn("instruction_too_long", f"{exc}; instruction rejected, the current one kept")
            return
        except InstructionError as exc:
            # Unreadable text: clear rather than keep the old target, the requester wanted a new one.
            self._instruction.set("")
            self._warn("instruction_rejected",
                       f"{exc}; instruction rejected and the current one cleared")
            return
        for w in warnings:
            self._warn(_category("instruction_cleaned", w), w)
        current, changed = self._instruction.set(text)
        if changed:
            if current.text:
                self.get_logger().info(f"instruction {current.id}: '{current.text}'")
            else:
                self.get_logger().info("instruction cleared")

    def _accept_frame(self) -> bool:
        """Count a frame and apply max_rate."""
        self._stats.received += 1
        now = time.monotonic()
        rate = self.settings.max_rate
        if rate > 0.0 and now - self._last_accept < 1.0 / rate:
            self._stats.rate_limited += 1
            return False
        self._last_accept = now
        return True

    def _on_image(self, msg: Image) -> None:
        if self._active and self._accept_frame():
            self._slot.put(Frame(msg, False, time.monotonic()))

    def _on_compressed(self, msg: CompressedImage) -> None:
        if self._active and self._accept_frame():
            self._slot.put(Frame(msg, True, time.monotonic()))

    # ------------------------------------------------------------------ inference

    def _run_worker(self) -> None:
        """Inference thread: newest frame -> engine -> publish, until deactivated."""
        while self._active:
            frame = self._slot.take(timeout=0.5)
            if frame is None:
                continue
            try:
                self._process(frame)
            except Exception:  # noqa: BLE001 - one bad frame must not stop the node
                if not self._running():
                    return  # shutting down (Ctrl-C) mid-frame: nothing to report
                self._stats.failed += 1
                self.get_logger().error(
                    "frame failed, skipped:\n" + traceback.format_exc(limit=6))

    def _running(self) -> bool:
        """Active, and the ROS context not shut down (SIGINT shuts it down at once)."""
        return self._active and self.context.ok()

    def _process(self, frame: Frame) -> None:
        instruction = self._instruction.get()
        if not instruction.text:
            return  # nothing asked: nothing to publish
        msg = frame.msg
        try:
            rgb = compressed_to_rgb(msg) if frame.compressed else image_to_rgb(msg)
        except ImageError as exc:
            self._stats.invalid += 1
            self._warn(_category("bad_image", exc), f"image skipped: {exc}")
            return
        depth = self._match_depth(msg.header, rgb.shape[:2])
        s = self.settings
        with self._engine_lock:
            seg = self._segmenter
            if seg is None or not self._active:
                return
            # key=None: every streamed frame is encoded once anyway, and a stamp is no
            # identity (zero or repeated stamps from hand-made publishers).
            seg.set_image(rgb, key=None)
            try:
                seg.update_config(**params.engine_options(s))
                result = seg.segment(instruction.text, score_threshold=s.score_threshold,
                                     max_instances=s.max_instances or None)
            except ValueError as exc:
                self._stats.invalid += 1
                self._warn("instruction_refused",
                           f"instruction '{instruction.text[:80]}' skipped: {exc}")
                return
        age = (self.get_clock().now().nanoseconds - stamp_ns(msg.header.stamp)) * 1e-9
        timing = Timing(latency_node=time.monotonic() - frame.received, image_age=age,
                        frames_dropped=self._slot.dropped)
        out = result_to_msg(result, msg.header, instruction.text, instruction.id,
                            with_label_image=s.publish_label_image, depth=depth, timing=timing)
        pubs = (self._pub_instances, self._pub_label, self._pub_overlay)
        if None in pubs or not self._running():
            return  # deactivated, cleaned up or shutting down meanwhile
        pubs[0].publish(out)
        if s.publish_label_image and pubs[1].get_subscription_count() > 0:
            pubs[1].publish(out.label_image)
        if s.publish_overlay and pubs[2].get_subscription_count() > 0:
            bgr = overlay_bgr(rgb, result, f"[{instruction.id}] {instruction.text}", self._overlay_banner)
            pubs[2].publish(numpy_to_image(bgr, "bgr8", msg.header))
        st = self._stats
        st.processed += 1
        st.last_latency, st.last_age, st.last_instances = timing.latency_node, age, len(result)

    def _match_depth(self, header, size: tuple[int, int]) -> DepthInput | None:
        """The depth frame and camera_info matching `header.stamp`, if depth is enabled."""
        s = self.settings
        if not self._depth_enabled:
            return None
        # Aligned depth is usually published after its colour frame: wait (bounded) for it.
        deadline = time.monotonic() + s.depth_wait_s
        cancelled = lambda: not self._active  # noqa: E731
        d = self._depth_buf.wait_nearest(header.stamp, s.depth_sync_tolerance,
                                         s.depth_wait_s, cancelled)
        info = None
        if d is not None:
            info = self._info_buf.wait_nearest(header.stamp, s.depth_sync_tolerance,
                                               deadline - time.monotonic(), cancelled)
        if d is None or info is None:
            self._stats.depth_unmatched += 1
            self._warn("depth_unmatched",
                       f"no depth/camera_info within {s.depth_sync_tolerance} s of the image "
                       f"stamp (waited up to {s.depth_wait_s} s); 3D fields left empty")
            return None
        try:
            metres = depth_to_metres(d)
            k = Intrinsics.from_camera_info(info)
            check_camera_info_size(info, *metres.shape)
        except (ImageError, ValueError) as exc:
            self._warn(_category("bad_depth", exc),
                       f"depth skipped, 3D fields left empty: {exc}")
            return None
        if metres.shape != tuple(size):
            self._warn("depth_size",
                       f"depth is {metres.shape[1]}x{metres.shape[0]} but the image is "
                       f"{size[1]}x{size[0]}: depth must be aligned to the colour image")
            return None
        return DepthInput(metres, k, d.header.frame_id)

    # ------------------------------------------------------------------ service

    def _on_segment(self, request, response):
        """~/segment: one image + instruction -> InstanceSegmentation (see Segment.srv)."""
        self.get_logger().debug(f"segment request {request.instruction_id} received")
        response.success = False
        s = self.settings
        try:
            text, warnings = clean_instruction(request.instruction, s.max_instruction_chars)
            for w in warnings:
                self._warn(_category("instruction_cleaned", w), w)
            if not text:
                raise InstructionError("instruction is empty")
            threshold = float(request.score_threshold)
            if math.isnan(threshold) or threshold > 1.0:
                raise ValueError(f"score_threshold {threshold} is not in 0..1 "
                                 "(or negative for the node's parameter)")
            rgb = image_to_rgb(request.image)
            depth = None
            if request.depth.width or request.depth.height:
                metres = depth_to_metres(request.depth)
                if metres.shape != rgb.shape[:2]:
                    raise ImageError(f"depth is {metres.shape[1]}x{metres.shape[0]} but the "
                                     f"image is {rgb.shape[1]}x{rgb.shape[0]}")
                k = Intrinsics.from_camera_info(request.camera_info)
                check_camera_info_size(request.camera_info, *metres.shape)
                depth = DepthInput(metres, k, request.depth.header.frame_id)
        except (InstructionError, ImageError, ValueError) as exc:
            response.message = str(exc)
            self._warn("segment_rejected", f"segment request rejected: {exc}")
            return response
        if threshold < 0:
            threshold = s.score_threshold
        t0 = time.monotonic()
        with self._engine_lock:
            seg = self._segmenter
            if seg is None or not self._active:
                response.message = "node is not active (load a model: configure + activate)"
                return response
            try:
                seg.set_image(rgb, key=None)
                seg.update_config(**params.engine_options(s))
                result = seg.segment(text, score_threshold=threshold,
                                     max_instances=s.max_instances or None)
            except ValueError as exc:
                response.message = str(exc)
                self._warn("segment_rejected", f"segment request rejected: {exc}")
                return response
        header = request.image.header
        age = (self.get_clock().now().nanoseconds - stamp_ns(header.stamp)) * 1e-9
        response.result = result_to_msg(
            result, header, text, request.instruction_id,
            with_label_image=s.publish_label_image, depth=depth,
            timing=Timing(latency_node=time.monotonic() - t0, image_age=age))
        response.success = True
        response.message = f"{len(result)} instance(s)"
        return response

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        if self._pub_diag is None:
            return
        st, s = self._stats, self.settings
        now = time.monotonic()
        t_prev, n_prev = self._diag_prev
        rate = (st.received - n_prev) / max(now - t_prev, 1e-6)
        self._diag_prev = (now, st.received)
        ins = self._instruction.get()
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: instructsam perception"
        status.hardware_id = s.checkpoint
        if not self._active:
            status.level, status.message = DiagnosticStatus.WARN, "inactive (no model loaded)"
        elif not ins.text:
            status.level, status.message = DiagnosticStatus.OK, "waiting for an instruction"
        elif rate <= 0.0:
            status.level, status.message = DiagnosticStatus.WARN, "no images arriving"
        elif st.last_age > 1.0:
            status.level, status.message = DiagnosticStatus.WARN, "results are stale"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        values = {
            "instruction": ins.text, "instruction_id": ins.id,
            "input_rate_hz": f"{rate:.2f}", "frames_received": st.received,
            "frames_processed": st.processed, "frames_dropped": self._slot.dropped,
            "frames_invalid": st.invalid, "frames_rate_limited": st.rate_limited,
            "frames_failed": st.failed, "depth_unmatched": st.depth_unmatched,
            "last_latency_s": f"{st.last_latency:.4f}", "staleness_s": f"{st.last_age:.4f}",
            "last_instances": st.last_instances,
        }
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self._pub_diag.publish(arr)


def _category(prefix: str, problem) -> str:
    """A rate-limit category from a fixed set: ImageError.kind, the exception type, or
    the fixed opening words of a warning from a known template (no user data)."""
    if isinstance(problem, BaseException):
        return f"{prefix}:{getattr(problem, 'kind', type(problem).__name__)}"
    return f"{prefix}:{re.sub(r'[0-9]+', '#', ' '.join(str(problem).split()[:3]))}"


def _msg_types():
    """(InstanceSegmentation, Segment): imported late so a missing build fails clearly."""
    try:
        from instructsam_ros.msg import InstanceSegmentation
        from instructsam_ros.srv import Segment
    except ImportError as exc:
        raise ImportError(
            "instructsam_ros interfaces are not built: run `colcon build` (robot) or "
            "scripts/build_ros.sh, then source the install (setup.bash / scripts/ros_env.sh)"
        ) from exc
    return InstanceSegmentation, Segment


def main(args: list[str] | None = None) -> int:
    """Entry point of `ros2 run instructsam_ros perception_node`."""
    rclpy.init(args=args)
    node = None
    try:
        node = PerceptionNode()
        if node.settings.autostart:
            ok = TransitionCallbackReturn.SUCCESS
            if node.trigger_configure() != ok or node.trigger_activate() != ok:
                node.get_logger().fatal(f"start-up failed: {node.start_error}")
                return 1
        # Two threads: the ~/segment service (its own callback group) and everything else
        # (the node's default, mutually exclusive group). Inference of the stream runs on
        # the node's own worker thread.
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
