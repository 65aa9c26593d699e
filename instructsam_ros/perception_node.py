"""The InstructSAM perception node: images + instruction -> InstanceSegmentation.

A lifecycle node (configure: parameters, publishers, instruction subscription and the
service; activate: load and warm up the model, subscribe to images, start the inference
thread; deactivate: stop, free the model and the GPU memory). With `autostart` (the
default) it configures and activates itself, so a plain `ros2 run`/`ros2 launch` works.

Topics (relative names, change them by remapping):
    image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage)
    /instruction (std_msgs/String), depth (sensor_msgs/Image), camera_info
    ~/instances (InstanceSegmentation), ~/label_image (mono16), ~/overlay (bgr8),
    ~/markers (visualization_msgs/MarkerArray, with depth)
    ~/segment (Segment service), /diagnostics (diagnostic_msgs/DiagnosticArray)

Run: `ros2 run instructsam_ros perception_node --ros-args -p checkpoint:=/path/to/ckpt` (default: the shipped model)
or `python -m instructsam_ros.perception_node --ros-args ...`.
"""

from __future__ import annotations

import gc
import math
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import rclpy
import rclpy.qos
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from instructsam_ros import params
from instructsam_ros.conversions import (ImageError, check_compressed, check_image, compressed_to_rgb,
                                         image_to_rgb, numpy_to_image)
from instructsam_ros.diagnostics import InputRate, Stats, status_of, status_values
from instructsam_ros.frames import Frame, FrameWorker, LatestFrame, RateLimit
from instructsam_ros.instruction import InstructionError, InstructionState, InstructionTooLong, clean_instruction
from instructsam_ros.markers import instance_markers
from instructsam_ros.messages import DepthInput, Timing, depth_input, result_to_msg
from instructsam_ros.overlay import overlay_bgr
from instructsam_ros.qos import image_qos, instruction_qos, output_qos
from instructsam_ros.sync import StampBuffer, stamp_ns

NODE_NAME = "instructsam"
WARN_REPEAT_S = 5.0  # warnings of one category are logged at most this often
DEPTH_KEEP_S = 2.0  # depth/camera_info kept this long (by stamp) for matching


class PerceptionNode(LifecycleNode):
    """InstructSAM as a ROS 2 lifecycle node (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.settings = params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.start_error = ""  # why the last configure/activate failed
        self._instruction = InstructionState()
        self._segmenter = None
        self._engine_settings: params.Settings | None = None  # the settings the engine runs with
        self._overlay_banner = ""  # shown on the overlay, e.g. that the model is untrained
        self._engine_lock = threading.Lock()  # the engine is not re-entrant
        self._slot = LatestFrame()
        self._worker: FrameWorker | None = None
        self._stats = Stats()
        self._rate = InputRate()
        self._rate_limit = RateLimit()
        self._active = False
        self._depth_enabled = False
        self._warned: dict[str, float] = {}  # category -> last time logged
        self._depth_buf = StampBuffer(DEPTH_KEEP_S)
        self._info_buf = StampBuffer(DEPTH_KEEP_S)
        self._image_subs: list = []
        self._entities: list[tuple[str, Any]] = []  # (kind, entity) made at configure
        self._pub_instances = self._pub_label = self._pub_overlay = self._pub_markers = None
        self._pub_diag = None

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
                                "checkpoint directory, or 'default' for the shipped model")
            self.get_logger().error(self.start_error)
            return TransitionCallbackReturn.FAILURE
        out = output_qos()
        self._pub_instances = self.create_lifecycle_publisher(_msg_types()[0], "~/instances", out)
        self._pub_label = self.create_lifecycle_publisher(Image, "~/label_image", out)
        self._pub_overlay = self.create_lifecycle_publisher(Image, "~/overlay", out)
        self._pub_markers = self.create_lifecycle_publisher(MarkerArray, "~/markers", out)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Two subscriptions on /instruction: the transient-local one receives the last
        # instruction of latched publishers that were there before us; the volatile one
        # matches plain publishers such as `ros2 topic pub` (a transient-local reader
        # does not match a volatile writer). Identical text is deduplicated. That
        # mismatch is expected, so it is logged once at debug level, not as a warning.
        latched = instruction_qos()
        volatile = instruction_qos()
        volatile.durability = rclpy.qos.DurabilityPolicy.VOLATILE
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_volatile_instruction_publisher)
        self._entities = [
            ("lifecycle_publisher", self._pub_instances),
            ("lifecycle_publisher", self._pub_label),
            ("lifecycle_publisher", self._pub_overlay),
            ("lifecycle_publisher", self._pub_markers),
            ("publisher", self._pub_diag),
            ("subscription", self.create_subscription(
                String, "/instruction", self._on_instruction, latched, event_callbacks=events)),
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
        self._stats, self._rate = Stats(), InputRate()  # the counters restart with activation
        self._slot = LatestFrame()
        qos = image_qos(s.image_reliability, s.image_qos_depth)
        if s.compressed_input:
            self._image_subs.append(self.create_subscription(
                CompressedImage, "image/compressed", lambda m: self._on_frame(m, True), qos))
        else:
            self._image_subs.append(self.create_subscription(
                Image, "image", lambda m: self._on_frame(m, False), qos))
        self._depth_enabled = s.use_depth  # fixed while active, whatever the parameter does
        if s.use_depth:
            self._image_subs.append(self.create_subscription(Image, "depth", self._depth_buf.add, qos))
            self._image_subs.append(self.create_subscription(
                CameraInfo, "camera_info", self._info_buf.add, qos))
        self._active = True
        self._worker = FrameWorker(self._slot, self._process, self._on_frame_error)
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
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
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
        from instructsam_core.engine import DEFAULT_MODEL, DEFAULT_MODEL_NOTE, Segmenter

        t0 = time.monotonic()
        seg = Segmenter.from_pretrained(s.checkpoint, device=s.device, dtype=s.dtype, backend=s.backend,
                                        **params.engine_options(s))
        self._engine_settings = s
        self._overlay_banner = ""
        if seg.is_untrained:
            self._overlay_banner = "UNTRAINED demo model: masks are random"
            self.get_logger().warning(
                f"checkpoint '{s.checkpoint}' is an UNTRAINED model: its masks are "
                "meaningless (for tests and demos only)")
        elif s.checkpoint == DEFAULT_MODEL:
            self._overlay_banner = "default model: synthetic tabletop world only"
            self.get_logger().info(DEFAULT_MODEL_NOTE)
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
        self._depth_buf.clear()  # also wakes a worker waiting for depth
        self._info_buf.clear()
        if self._worker is not None:
            self._worker.stop()
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
        self._pub_instances = self._pub_label = self._pub_overlay = self._pub_markers = self._pub_diag = None

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

    def _on_volatile_instruction_publisher(self, event) -> None:
        if "volatile_instruction" not in self._warned:
            self._warned["volatile_instruction"] = time.monotonic()
            self.get_logger().debug(
                "a volatile /instruction publisher (e.g. `ros2 topic pub`) does not match the "
                "transient-local subscription; its messages arrive through the volatile one")

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

    def _on_frame(self, msg, compressed: bool) -> None:
        """A colour frame arrived: count it, apply max_rate, do the cheap checks, and only
        then let it take the slot (a malformed frame never replaces a good one)."""
        if not self._active:
            return
        self._stats.received += 1
        if not self._rate_limit.allow(self.settings.max_rate):
            self._stats.rate_limited += 1
            return
        try:
            check_compressed(msg) if compressed else check_image(msg)
        except ImageError as exc:
            self._stats.invalid += 1
            self._warn(_category("bad_image", exc), f"image skipped: {exc}")
            return
        self._slot.put(Frame(msg, compressed, time.monotonic()))

    def _on_frame_error(self, frame: Frame, exc: BaseException) -> None:
        if not self._running():
            return  # shutting down (Ctrl-C) mid-frame: nothing to report
        self._stats.failed += 1
        self.get_logger().error("frame failed, skipped:\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6)))

    def _running(self) -> bool:
        """Active, and the ROS context not shut down (SIGINT shuts it down at once)."""
        return self._active and self.context.ok()

    # ------------------------------------------------------------------ inference

    def _answer(self, rgb: np.ndarray, header, text: str, instruction_id: int, threshold: float,
                depth: DepthInput | None, started: float, dropped: int = 0):
        """The one inference path of the stream and the service: the engine on one image
        and instruction, then the InstanceSegmentation. Returns `(message, result)`, or
        None when the node stopped meanwhile; the engine's ValueError passes through."""
        s = self.settings
        with self._engine_lock:
            seg = self._segmenter
            if seg is None or not self._active:
                return None
            # key=None: every image is encoded once anyway, and a stamp is no identity
            # (zero or repeated stamps from hand-made publishers).
            seg.set_image(rgb, key=None)
            if self._engine_settings is not s:  # settings are replaced whole on every change
                seg.update_config(**params.engine_options(s, seg.checkpoint_defaults))
                self._engine_settings = s
            # A negative threshold (the parameter's default) is the checkpoint's own.
            result = seg.segment(text, score_threshold=None if threshold < 0 else threshold,
                                 max_instances=s.max_instances or None)
        age = (self.get_clock().now().nanoseconds - stamp_ns(header.stamp)) * 1e-9
        timing = Timing(latency_node=time.monotonic() - started, image_age=age, frames_dropped=dropped)
        return result_to_msg(result, header, text, instruction_id, with_label_image=s.publish_label_image,
                             depth=depth, timing=timing), result

    def _process(self, frame: Frame) -> None:
        """The stream: the newest frame with the current instruction, published."""
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
        try:
            answer = self._answer(rgb, msg.header, instruction.text, instruction.id, s.score_threshold, depth,
                                  frame.received, self._slot.dropped)
        except ValueError as exc:
            self._stats.invalid += 1
            self._warn("instruction_refused", f"instruction '{instruction.text[:80]}' skipped: {exc}")
            return
        pubs = (self._pub_instances, self._pub_label, self._pub_overlay, self._pub_markers)
        if answer is None or None in pubs or not self._running():
            return  # deactivated, cleaned up or shutting down meanwhile
        out, result = answer
        pubs[0].publish(out)
        if s.publish_label_image and pubs[1].get_subscription_count() > 0:
            pubs[1].publish(out.label_image)
        if s.publish_overlay and pubs[2].get_subscription_count() > 0:
            bgr = overlay_bgr(rgb, result, f"[{instruction.id}] {instruction.text}", self._overlay_banner)
            pubs[2].publish(numpy_to_image(bgr, "bgr8", msg.header))
        if depth is not None and s.publish_markers and pubs[3].get_subscription_count() > 0:
            pubs[3].publish(instance_markers(out))
        st = self._stats
        st.processed += 1
        st.last_latency, st.last_age, st.last_instances = out.latency_node, out.image_age, len(result)

    def _match_depth(self, header, size: tuple[int, int]) -> DepthInput | None:
        """The depth frame and camera_info matching `header.stamp`, if depth is enabled."""
        s = self.settings
        if not self._depth_enabled:
            return None
        # Aligned depth is usually published after its colour frame: wait (bounded) for it.
        deadline = time.monotonic() + s.depth_wait_s
        cancelled = lambda: not self._active  # noqa: E731
        d = self._depth_buf.wait_nearest(header.stamp, s.depth_sync_tolerance, s.depth_wait_s, cancelled)
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
            return depth_input(d, info, size)
        except (ImageError, ValueError) as exc:
            self._warn(_category("bad_depth", exc), f"depth skipped, 3D fields left empty: {exc}")
            return None

    # ------------------------------------------------------------------ service

    def _on_segment(self, request, response):
        """~/segment: one image + instruction -> InstanceSegmentation (see Segment.srv)."""
        self.get_logger().debug(f"segment request {request.instruction_id} received")
        started = time.monotonic()
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
                depth = depth_input(request.depth, request.camera_info, rgb.shape[:2])
            answer = self._answer(rgb, request.image.header, text, request.instruction_id,
                                  s.score_threshold if threshold < 0 else threshold, depth, started)
        except (InstructionError, ImageError, ValueError) as exc:
            response.message = str(exc)
            self._warn("segment_rejected", f"segment request rejected: {exc}")
            return response
        if answer is None:
            response.message = "node is not active (load a model: configure + activate)"
            return response
        response.result, result = answer
        response.success = True
        response.message = f"{len(result)} instance(s)"
        return response

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        if self._pub_diag is None:
            return
        stats, instruction = self._stats, self._instruction.get()
        rate = self._rate.update(stats.received)
        level, message = status_of(self._active, instruction.text, rate, stats)
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: instructsam perception",
                                  hardware_id=self.settings.checkpoint, message=message,
                                  level=DiagnosticStatus.OK if level == "OK" else DiagnosticStatus.WARN)
        values = status_values(instruction.text, instruction.id, rate, stats, self._slot.dropped)
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
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


def spin_until_shutdown(executor: Executor) -> None:
    """Spin `executor` until its context shuts down (Ctrl-C, `ros2 launch` stopping us).

    rclpy's SIGINT handler shuts the context down from its own thread. If that lands
    between the executor's check of the context and its wait, the executor raises
    RCLError ("... the given context is not valid", from the wait set or its timer)
    instead of returning: a known rclpy race (ros2/ros2cli#854), seen on Jazzy as a
    traceback on a clean Ctrl-C. It is a shutdown only if the context is down; any other
    error still propagates."""
    try:
        executor.spin()
    except RuntimeError:  # rclpy's RCLError is a RuntimeError
        if executor.context.ok():
            raise


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
        spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # `ros2 launch` forwards Ctrl-C to a node that may already have it from the
        # terminal: a second SIGINT must not interrupt the clean-up with a traceback.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
