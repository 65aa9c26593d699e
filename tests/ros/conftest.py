"""Fixtures for the ROS 2 tests: real rclpy over Fast DDS on loopback, no fakes.

Every test run gets its own ROS_DOMAIN_ID and discovery stays on this machine, so
parallel runs (and other sessions) do not see each other. The node under test runs as a
subprocess (`python -m instructsam_ros.perception_node`) with the real engine and its
tiny untrained model at score threshold 0, so instances really flow; the tests talk to
it with an ordinary rclpy client node.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# Set before rclpy initialises anything in this process (and inherited by the node
# subprocesses). A random domain per run over the whole range Fast DDS's port mapping
# allows (0..232), leaving out the default 0, so parallel runs rarely collide.
os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 232))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"  # the same on Humble (no discovery range there)
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")

sys.path.insert(0, str(Path(__file__).parent))  # ros_helpers, whatever the import mode
from ros_helpers import Client, NodeProcess  # noqa: E402

try:  # the ROS wheels and the built interfaces (scripts/install_ros.sh + build_ros.sh)
    import rclpy  # noqa: F401
    from instructsam_ros.msg import InstanceSegmentation  # noqa: F401
    _ROS_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    _ROS_ERROR = (f"ROS 2 not available ({exc}); run scripts/install_ros.sh .venv && "
                  "scripts/build_ros.sh && . scripts/ros_env.sh")


if _ROS_ERROR and os.environ.get("CI"):  # CI must run these tests: fail, don't skip
    raise RuntimeError(_ROS_ERROR)
if _ROS_ERROR:  # a developer without ROS: leave the directory out and say why
    collect_ignore_glob = ["test_*.py"]

    def pytest_report_header(config):
        return f"tests/ros not collected: {_ROS_ERROR}"


@pytest.fixture(scope="session")
def ros():
    """rclpy initialised once per test session."""
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()


@pytest.fixture(scope="module")
def client(ros, request):
    c = Client(f"test_client_{request.module.__name__.split('.')[-1]}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def start_node(ros, tmp_path_factory):
    """Factory: start a perception node subprocess; all are stopped at module end."""
    started: list[NodeProcess] = []

    def start(namespace: str, params: dict | None = None, extra_args=None) -> NodeProcess:
        log = tmp_path_factory.mktemp("node") / f"{namespace.strip('/')}.log"
        proc = NodeProcess(namespace, log, params, extra_args)
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def make_image():
    """Factory for sensor_msgs/Image test frames (procedural scene, any encoding)."""
    from instructsam_core.sample_images import tabletop_scene
    from instructsam_ros.conversions import numpy_to_image
    from std_msgs.msg import Header

    def make(frame_id="camera_color_optical_frame", stamp=(100, 5), size=(96, 128), seed=0,
             encoding="rgb8"):
        rgb = tabletop_scene(size[1], size[0], seed).image
        header = Header(frame_id=frame_id)
        header.stamp.sec, header.stamp.nanosec = stamp
        arr = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1]}[encoding]
        return numpy_to_image(arr, encoding, header), rgb

    return make



@pytest.fixture(scope="session")
def ros2_cli() -> str:
    """The `ros2` command with its launch system (apt on a robot; ../shared/ros2_cli here,
    installed by `make setup-ros`). Missing: fail under CI, skip elsewhere."""
    import shutil

    exe = shutil.which("ros2")
    try:
        import launch_ros  # noqa: F401
        import ros2launch  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        message = "the ros2 CLI and launch system are not installed (make setup-ros installs them from ../shared/ros2_cli)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run these tests")
        pytest.skip(message)
    return exe
