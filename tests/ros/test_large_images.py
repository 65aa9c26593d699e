"""Camera-size images over DDS: the shipped Fast DDS profile lets 720p frames arrive over
shared memory (the default 512 KB segment loses most of them with sensor-data QoS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ros_helpers import REPO

PROFILE = REPO / "config" / "fastdds_large_images.xml"
PEER = Path(__file__).parent / "large_image_peer.py"
FRAMES, RATE = 150, 15.0


def _received(profile: Path | None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDDS_DEFAULT_PROFILES_FILE",
                                                            "FASTRTPS_DEFAULT_PROFILES_FILE")}
    if profile is not None:  # Fast DDS 3 (Kilted) reads the first, Fast DDS 2 (Jazzy, Humble) the second
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    sub = subprocess.Popen([sys.executable, str(PEER), "sub", str(FRAMES), str(RATE)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)  # the subscriber first, as a node is up before its camera streams
    pub = subprocess.run([sys.executable, str(PEER), "pub", str(FRAMES), str(RATE)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert pub.returncode == 0, pub.stderr[-2000:]
    time.sleep(1.0)  # the last frames in flight
    sub.send_signal(signal.SIGINT)
    out, _ = sub.communicate(timeout=60)
    return int(out.strip().splitlines()[-1].split()[-1])


def test_720p_frames_arrive_with_the_shipped_profile_on_both_sides():
    without = _received(None)
    with_profile = _received(PROFILE)
    print(f"\n1280x720 rgb8 at {RATE:g} Hz, {FRAMES} frames: {without} received with Fast DDS's defaults, "
          f"{with_profile} with config/fastdds_large_images.xml")
    assert with_profile >= 0.9 * FRAMES
