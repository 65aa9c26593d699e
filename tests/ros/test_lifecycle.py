"""Lifecycle transitions, start-up failures, SIGINT, the installed executable, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ros_helpers import REPO, publish_until, wait_for, with_stamp

NS = "/t_life"
NODE = f"{NS}/instructsam"


def _change(client, transition_id: int) -> bool:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    req = ChangeState.Request(transition=Transition(id=transition_id))
    return client.call(ChangeState, f"{NODE}/change_state", req, timeout=120).success


def test_manual_lifecycle_without_autostart(start_node, client, make_image):
    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.qos import instruction_qos, output_qos
    from lifecycle_msgs.msg import Transition
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from diagnostic_msgs.msg import DiagnosticArray

    node = start_node(NS, {"autostart": False})
    diags = client.collector(DiagnosticArray, "/diagnostics")
    assert wait_for(lambda: node.state(client, timeout=2.0), 60, what="get_state") == "unconfigured"
    results = client.collector(InstanceSegmentation, f"{NODE}/instances")
    image = client.node.create_publisher(Image, f"{NS}/image", output_qos())
    instr = client.node.create_publisher(String, "/instruction", instruction_qos())
    instr.publish(String(data="the yellow banana"))  # latched: reaches the node at configure
    try:
        assert _change(client, Transition.TRANSITION_CONFIGURE)
        assert node.state(client) == "inactive"
        msg, _ = make_image(stamp=(700, 0))
        for _ in range(3):
            image.publish(msg)
            time.sleep(0.2)
        assert not results  # inactive: not subscribed, nothing published

        assert _change(client, Transition.TRANSITION_ACTIVATE)
        assert node.state(client) == "active"
        r = publish_until(image, make_image(stamp=(701, 0))[0], with_stamp(results, (701, 0)))
        assert r.instruction == "the yellow banana"  # the late joiner got the latched one

        assert _change(client, Transition.TRANSITION_DEACTIVATE)
        assert node.state(client) == "inactive"
        assert "deactivated: model unloaded" in node.log()
        n = len(results)
        for _ in range(3):
            image.publish(make_image(stamp=(702, 0))[0])
            time.sleep(0.2)
        assert len(results) == n

        assert _change(client, Transition.TRANSITION_ACTIVATE)  # reloads the model
        # The counters restart at activation: the first rate must not come out negative
        # (against the previous activation's count) and pass for "running".
        seen = len(diags)
        first = wait_for(lambda: next((d.status[0] for d in diags[seen:] if d.status and
                                       d.status[0].name == f"{NODE}: instructsam perception"
                                       and not d.status[0].message.startswith("inactive")),
                                      None), 10, what="diagnostics after re-activation")
        values = {kv.key: kv.value for kv in first.values}
        assert values["frames_received"] == "0"
        assert float(values["input_rate_hz"]) == 0.0
        assert (first.level, first.message) == (first.WARN, "no images arriving")
        publish_until(image, make_image(stamp=(703, 0))[0], with_stamp(results, (703, 0)))
        assert _change(client, Transition.TRANSITION_DEACTIVATE)
        assert _change(client, Transition.TRANSITION_CLEANUP)
        assert node.state(client) == "unconfigured"
    finally:
        client.node.destroy_publisher(instr)
        client.node.destroy_publisher(image)
    assert node.stop() == 0


def _run_node(args, env=None, timeout=120):
    cmd = [sys.executable, "-m", "instructsam_ros.perception_node", "--ros-args", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_missing_checkpoint_is_a_fatal_error_naming_the_path():
    r = _run_node(["-r", "__ns:=/t_bad", "-p", "checkpoint:=/nonexistent/InstructSAM-2B",
                   "-p", "device:=cpu"])
    assert r.returncode == 1
    assert "cannot load the InstructSAM model from checkpoint '/nonexistent/InstructSAM-2B'" in r.stderr
    assert "FATAL" in r.stderr


def test_empty_checkpoint_and_bad_parameter_fail_clearly():
    r = _run_node(["-r", "__ns:=/t_bad2", "-p", "checkpoint:=''"])
    assert r.returncode == 1 and "parameter 'checkpoint' is empty" in r.stderr
    r = _run_node(["-r", "__ns:=/t_bad3", "-p", "checkpoint:=tiny", "-p", "device:=gpu0"])
    assert r.returncode == 1 and "device 'gpu0'" in r.stderr


def test_sigint_while_streaming_shuts_down_cleanly(start_node, client, make_image):
    """Ctrl-C lands while frames are being processed: a clean exit, no tracebacks."""
    import threading

    from instructsam_ros.msg import InstanceSegmentation
    from instructsam_ros.qos import instruction_qos, output_qos
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    node = start_node("/t_sigint")
    results = client.collector(InstanceSegmentation, "/t_sigint/instructsam/instances")
    image = client.node.create_publisher(Image, "/t_sigint/image", output_qos())
    instr = client.node.create_publisher(String, "/instruction", instruction_qos())
    stop = threading.Event()

    frame = make_image(stamp=(800, 0), size=(480, 640))[0]

    def stream():  # ~50 Hz, faster than the model: the worker is always busy
        while not stop.is_set():
            frame.header.stamp.nanosec += 1
            image.publish(frame)
            stop.wait(0.02)

    streamer = threading.Thread(target=stream, daemon=True)
    try:
        instr.publish(String(data="the green apple"))
        node.wait_active(client)
        streamer.start()
        wait_for(lambda: len(results) >= 2, 60, what="results while streaming")
        t0 = time.monotonic()
        assert node.stop(timeout=20) == 0
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        if streamer.is_alive():
            streamer.join(timeout=5)
        client.node.destroy_publisher(instr)
        client.node.destroy_publisher(image)
    log = node.log()
    assert "Traceback" not in log and "frame failed" not in log, log


def test_installed_executable_runs_from_the_install_prefix(tmp_path):
    """`ros2 run instructsam_ros perception_node` runs lib/instructsam_ros/perception_node."""
    import instructsam_ros.msg as generated

    site = Path(generated.__file__).resolve().parents[2]  # <prefix>/lib/python3.11/site-packages
    prefix = site.parents[2]
    exe = prefix / "lib" / "instructsam_ros" / "perception_node"
    assert exe.is_file() and os.access(exe, os.X_OK)
    for sub in ("launch/perception.launch.py", "config/perception.yaml", "rviz/perception.rviz",
                "msg/InstanceSegmentation.msg", "srv/Segment.srv"):
        assert (prefix / "share" / "instructsam_ros" / sub).is_file(), sub
    stray = [str(p) for p in (prefix / "share" / "instructsam_ros").rglob("*")
             if p.name == "__pycache__" or p.suffix == ".pyc"]
    assert not stray, stray
    # Only the install prefix (plus instructsam_core) on the path: not the checkout.
    import instructsam_core

    core = tmp_path / "core"
    core.mkdir()
    (core / "instructsam_core").symlink_to(Path(instructsam_core.__file__).parent)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{core}")
    r = subprocess.run([str(exe), "--ros-args", "-r", "__ns:=/t_exe",
                        "-p", "checkpoint:=/nonexistent/ckpt", "-p", "device:=cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "checkpoint '/nonexistent/ckpt'" in r.stderr
    probe = subprocess.run([sys.executable, "-c", "import instructsam_ros, instructsam_ros.msg, "
                            "instructsam_ros.perception_node as n; print(n.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(site))


def test_demo_streams_scenes_and_instructions_and_writes_what_it_got(tmp_path):
    """The README's main job: the default model over DDS, a new instruction per frame."""
    import json

    from PIL import Image

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "instructsam_ros.demo", "--frames", "3", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "default model" in r.stdout and "3/3 frames answered" in r.stdout and "mean IoU" in r.stdout
    assert "its held-out scores (MODEL_CARD.md): T-acc" in r.stdout  # what the model can do, from its card
    from instructsam_core.postprocess import mask_iou
    from instructsam_ros.demo import demo_steps

    rows = json.loads((out / "summary.json").read_text())
    steps = demo_steps(3, 240, 320)
    assert [row["kind"] for row in rows] == ["colour", "attribute", "category"] == [s.kind for s in steps]
    for row, step in zip(rows, steps):
        stem = out / f"frame_{row['frame']:02d}"
        assert Image.open(f"{stem}_overlay.png").size == (320, 240)
        labels = np.asarray(Image.open(f"{stem}_labels.png"))
        message = json.loads(Path(f"{stem}_instances.json").read_text())
        assert message["instruction"] == row["instruction"] == step.instruction
        assert row["targets"] == step.targets and (step.targets > 0) == bool(step.truth.any())
        assert message["header"]["frame_id"] == "camera_color_optical_frame"
        assert len(message["instances"]) == row["found"]
        assert set(np.unique(labels).tolist()) <= set(range(row["found"] + 1))  # ids 1..found, 0 = background
        assert row["iou"] == mask_iou(labels > 0, step.truth)  # the table's IoU is against the scene's truth


def test_demo_with_the_untrained_model_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "instructsam_ros.demo", "--checkpoint", "tiny", "--frames", "1",
                        "--size", "96x128", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UNTRAINED" in r.stdout and "1/1 frames answered" in r.stdout
