"""Helpers for the ROS 2 tests: a spinning rclpy client, the node as a subprocess, and
small predicates over received messages. Real rclpy and DDS throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "perception.yaml"


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Client:
    """An rclpy node spun in a background thread, with helpers to talk to the node."""

    def __init__(self, name: str):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.node = rclpy.create_node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._stop = False
        self._thread.start()

    def _spin(self):
        while not self._stop:
            self.executor.spin_once(timeout_sec=0.05)

    def collector(self, msg_type, topic: str, qos=None):
        """Subscribe and return a list that fills with received messages."""
        from instructsam_ros.qos import output_qos

        received: list = []
        self.node.create_subscription(msg_type, topic, received.append, qos or output_qos())
        return received

    def call(self, srv_type, name: str, request, timeout: float = 60.0):
        """Call a service and wait for the response."""
        cli = self.node.create_client(srv_type, name)
        try:
            assert cli.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            future = cli.call_async(request)
            wait_for(future.done, timeout, what=f"response of {name}")
            return future.result()
        finally:
            self.node.destroy_client(cli)

    def close(self):
        self._stop = True
        self._thread.join(timeout=5)
        self.executor.remove_node(self.node)
        self.node.destroy_node()


class NodeProcess:
    """The perception node as a subprocess; its log goes to a file the tests can read."""

    def __init__(self, namespace: str, log_path: Path, params: dict | None = None,
                 extra_args: list[str] | None = None):
        self.namespace = namespace
        self.log_path = log_path
        values = {"checkpoint": "tiny", "device": "cpu", "score_threshold": 0.0}
        values.update(params or {})
        cmd = [sys.executable, "-m", "instructsam_ros.perception_node", "--ros-args",
               "--params-file", str(CONFIG), "-r", f"__ns:={namespace}"]
        for k, v in values.items():
            cmd += ["-p", f"{k}:={_ros_arg(v)}"]
        cmd += extra_args or []
        self.cmd = cmd
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_active(self, client: Client, timeout: float = 120.0) -> None:
        """Wait until the node's lifecycle state is 'active' (model loaded)."""
        def active():
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            return self.state(client, timeout=2.0) == "active"

        wait_for(active, timeout, interval=0.2, what="the node to become active")

    def state(self, client: Client, timeout: float = 10.0) -> str | None:
        from lifecycle_msgs.srv import GetState

        cli = client.node.create_client(GetState, f"{self.namespace}/instructsam/get_state")
        try:
            if not cli.wait_for_service(timeout_sec=timeout):
                return None
            fut = cli.call_async(GetState.Request())
            deadline = time.monotonic() + timeout
            while not fut.done() and time.monotonic() < deadline:
                time.sleep(0.02)  # the node answers only between transitions
            return fut.result().current_state.label if fut.done() else None
        finally:
            client.node.destroy_client(cli)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT, like Ctrl-C; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _ros_arg(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and v == "":
        return "''"
    return str(v)


def stamp_of(msg) -> tuple[int, int]:
    return (msg.header.stamp.sec, msg.header.stamp.nanosec)


def publish_until(pub, msg, done, timeout: float = 60.0, period: float = 0.5):
    """Publish `msg` every `period` s until `done()` is truthy (covers discovery and
    best-effort loss); returns done()'s value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(msg)
        end = time.monotonic() + period
        while time.monotonic() < end:
            value = done()
            if value:
                return value
            time.sleep(0.02)
    raise AssertionError(f"no answer within {timeout} s")


def with_stamp(received: list, stamp: tuple[int, int]):
    """Predicate factory: the first received message whose header stamp is `stamp`."""
    def find():
        for m in list(received):
            if stamp_of(m) == stamp:
                return m
        return None
    return find


def full_mask(instance, height: int, width: int):
    """The full-size bool mask of an Instance (its mask is cropped to its roi)."""
    import numpy as np

    roi, m = instance.roi, instance.mask
    crop = np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.step)[:, :m.width]
    out = np.zeros((height, width), bool)
    out[roi.y_offset:roi.y_offset + roi.height, roi.x_offset:roi.x_offset + roi.width] = crop > 0
    return out
