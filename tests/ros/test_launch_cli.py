"""The user's own commands, as separate processes, as a user types them: `ros2 launch`,
`ros2 topic pub/echo`, `ros2 param`, `ros2 lifecycle`, and Ctrl-C to the launch.

One launch per module (namespace /robot, the image remapped, a params file of our own,
RViz off); a test client publishes camera frames and collects the results.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ros_helpers import CONFIG, REPO, wait_for

NS = "/robot"
NODE = f"{NS}/instructsam"
IMAGE = "/cam/image"
RVIZ = REPO / "rviz" / "perception.rviz"


def ros2(exe: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a `ros2` verb without the daemon (none outlives the test), giving discovery time.

    Without the daemon each command discovers the graph itself; on a busy machine that can
    take longer than its spin time, and the verb answers "Node not found" having done
    nothing. Such a command is run again (up to `timeout`), as a user would.
    """
    verb = args[:2]
    extra = []
    if "--no-daemon" in args:
        extra = ["--timeout", "20"] if verb in (("param", "get"), ("param", "set")) else ["--spin-time", "5"]
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run([exe, *args, *extra], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if "Node not found" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def ros2_until(exe: str, *args: str, expect: str, timeout: float = 60.0) -> str:
    """Repeat a discovery-dependent `ros2` query until its output holds `expect`."""
    return wait_for(lambda: (lambda out: out if expect in out else None)(ros2(exe, *args).stdout), timeout,
                    interval=0.5, what=f"`ros2 {' '.join(args)}` to show {expect!r}")


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    """config/perception.yaml with two values of our own, to prove the launch uses it."""
    doc = yaml.safe_load(CONFIG.read_text())
    doc["/**"]["ros__parameters"].update(score_threshold=0.0, max_rate=20.0)
    path = tmp_path_factory.mktemp("params") / "robot.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def launch(ros2_cli, params_file, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("launch") / "launch.log"
    log = open(log_path, "w")
    cmd = [ros2_cli, "launch", "instructsam_ros", "perception.launch.py", "checkpoint:=tiny", "device:=cpu",
           f"image:={IMAGE}", f"params_file:={params_file}", f"namespace:={NS}", "rviz:=false"]
    # Its own process group, as a terminal gives it: Ctrl-C goes to the whole group.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.log = lambda: log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    wait_for(lambda: "active: model 'tiny'" in proc.log() or proc.poll() is not None, 120, interval=0.2,
             what="the launched node to become active")
    assert proc.poll() is None, proc.log()
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    ros2(ros2_cli, "daemon", "stop")  # `ros2 topic pub` starts one; it must not outlive the tests


@pytest.fixture(scope="module")
def camera(launch, client):
    """A test camera publishing frames to IMAGE at 5 Hz, and the results collected."""
    import threading

    from instructsam_core.sample_images import tabletop_scene
    from instructsam_ros.conversions import numpy_to_image
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.qos import output_qos
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    n = client.node
    pub = n.create_publisher(Image, IMAGE, output_qos())
    results = client.collector(InstanceSegmentation, f"{NODE}/instances")
    stop = threading.Event()

    def stream():
        sec = 0
        while not stop.is_set():
            sec += 1
            header = Header(frame_id="camera_color_optical_frame")
            header.stamp.sec = sec
            pub.publish(numpy_to_image(tabletop_scene(128, 96, seed=sec % 3).image, "rgb8", header))
            stop.wait(0.2)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    yield results
    stop.set()
    thread.join(timeout=5)
    n.destroy_publisher(pub)


def test_launch_starts_the_node_with_its_arguments(ros2_cli, launch):
    assert ros2_until(ros2_cli, "lifecycle", "get", NODE, "--no-daemon", expect="active").startswith("active")
    assert "String value is: tiny" in ros2(ros2_cli, "param", "get", NODE, "checkpoint", "--no-daemon").stdout
    # from our params file, not the default one
    assert "Double value is: 0.0" in ros2(ros2_cli, "param", "get", NODE, "score_threshold", "--no-daemon").stdout
    ros2_until(ros2_cli, "topic", "info", IMAGE, "--no-daemon", expect="Subscription count: 1")  # the remap


def test_instruction_from_topic_pub_once_then_repeating_keeps_its_id(ros2_cli, launch, camera):
    out = ros2(ros2_cli, "topic", "pub", "--once", "/instruction", "std_msgs/msg/String", "data: 'the red mug'")
    assert out.returncode == 0, out.stderr
    first = wait_for(lambda: next((r for r in list(camera) if r.instruction == "the red mug"), None), 60,
                     what="a result for 'the red mug'")
    # the repeating form, as users type it (a message every 0.5 s)
    out = ros2(ros2_cli, "topic", "pub", "-r", "2", "-t", "4", "/instruction", "std_msgs/msg/String",
               "data: 'the red mug'")
    assert out.returncode == 0, out.stderr
    count = len(camera)
    wait_for(lambda: len(camera) > count + 2, 30, what="more results")
    assert {r.instruction_id for r in list(camera)[count:]} == {first.instruction_id}  # repeats keep the id
    echoed = ros2(ros2_cli, "topic", "echo", "--once", "--no-arr", f"{NODE}/instances",
                  "instructsam_ros/msg/InstanceSegmentation", timeout=60)
    assert echoed.returncode == 0 and "instruction: the red mug" in echoed.stdout and "status: ok" in echoed.stdout
    # a volatile publisher meets the transient-local subscription: expected, and not a warning
    assert "incompatible QoS" not in launch.log()


def test_param_set_applies_a_valid_value_and_refuses_a_bad_one_with_its_reason(ros2_cli, launch):
    ok = ros2(ros2_cli, "param", "set", NODE, "score_threshold", "0.3", "--no-daemon")
    assert "Set parameter successful" in ok.stdout, ok.stdout + ok.stderr
    assert "Double value is: 0.3" in ros2(ros2_cli, "param", "get", NODE, "score_threshold", "--no-daemon").stdout
    bad = ros2(ros2_cli, "param", "set", NODE, "dtype", "float64", "--no-daemon")
    assert "Setting parameter failed: dtype 'float64' is not one of auto, float32, bfloat16, float16" in (
        bad.stdout + bad.stderr)
    ros2(ros2_cli, "param", "set", NODE, "score_threshold", "0.0", "--no-daemon")


def test_lifecycle_deactivate_stops_results_and_activate_resumes_them(ros2_cli, launch, camera):
    out = ros2(ros2_cli, "lifecycle", "set", NODE, "deactivate", "--no-daemon")
    assert "Transitioning successful" in out.stdout, out.stdout + out.stderr
    time.sleep(1.0)  # a frame in flight may still land
    count = len(camera)
    time.sleep(2.0)
    assert len(camera) == count  # the camera streams on, nothing is segmented
    out = ros2(ros2_cli, "lifecycle", "set", NODE, "activate", "--no-daemon")
    assert "Transitioning successful" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: len(camera) > count, 60, what="results after activate")


# Every launch argument: a node parameter, a remapping, or a feature of the launch file.
LAUNCH_ARGUMENTS = {
    "checkpoint": "parameter", "device": "parameter", "backend": "parameter",
    "image": "remapping", "depth": "remapping", "camera_info": "remapping",
    "params_file": "feature: the node's parameters file",
    "namespace": "feature: the node's namespace",
    "rviz": "feature: starts rviz2 with rviz/perception.rviz",
}


def test_every_launch_argument_is_a_parameter_a_remapping_or_a_feature(ros2_cli, launch):
    shown = ros2(ros2_cli, "launch", "instructsam_ros", "perception.launch.py", "--show-args").stdout
    declared = set(re.findall(r"^    '(\w+)':", shown, re.M))
    assert declared == set(LAUNCH_ARGUMENTS)
    listed = ros2_until(ros2_cli, "param", "list", NODE, "--no-daemon", expect="checkpoint").split()
    for name, role in LAUNCH_ARGUMENTS.items():
        if role == "parameter":
            assert name in listed, name  # rclpy would ignore an undeclared one silently
    params = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    assert set(params) <= set(listed)


def test_the_rviz_config_shows_what_the_node_publishes(ros2_cli, launch):
    config = yaml.safe_load(RVIZ.read_text())
    classes, topics = set(), {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("Class"), str) and node["Class"]:
                classes.add(node["Class"])
            if isinstance(node.get("Topic"), dict):
                topics[node["Topic"]["Value"]] = node["Class"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    # classes rviz_common and rviz_default_plugins provide (rviz2 has no wheel to load the file with)
    provided = {"rviz_common/Displays", "rviz_common/Views", "rviz_common/Selection", "rviz_common/Time",
                "rviz_default_plugins/Image", "rviz_default_plugins/MarkerArray", "rviz_default_plugins/Marker",
                "rviz_default_plugins/TF", "rviz_default_plugins/Grid", "rviz_default_plugins/Interact",
                "rviz_default_plugins/MoveCamera", "rviz_default_plugins/Select", "rviz_default_plugins/Orbit",
                "rviz_default_plugins/FocusCamera", "rviz_default_plugins/Measure"}
    assert classes <= provided, classes - provided
    def published():  # discovery without the daemon can take a few tries on a busy machine
        listed = ros2(ros2_cli, "topic", "list", "-t", "--no-daemon").stdout.split("\n")
        found = dict(line.split(" [") for line in listed if " [" in line)
        return found if all(f"{NS}{t}" in found for t in topics) else None

    published = wait_for(published, 60, interval=0.5, what="the node's topics in `ros2 topic list`")
    expected_types = {"rviz_default_plugins/Image": "sensor_msgs/msg/Image]",
                      "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray]"}
    assert set(topics) == {"/instructsam/overlay", "/instructsam/label_image", "/instructsam/markers"}
    for topic, display in topics.items():  # under the launch's default namespace (here /robot)
        assert published[f"{NS}{topic}"] == expected_types[display], topic


def test_ctrl_c_stops_the_launch_and_its_node_cleanly(launch):
    node_pid = int(re.search(r"perception_node-1\]: process started with pid \[(\d+)\]", launch.log()).group(1))
    os.killpg(launch.pid, signal.SIGINT)
    launch.wait(timeout=10)
    log = launch.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "process has finished cleanly" in log
    with pytest.raises(ProcessLookupError):
        os.kill(node_pid, 0)  # no node process left behind
