"""One side of the camera-size image test, as its own process (a DDS profile is read when
a process's first participant starts): `pub N HZ` publishes N 1280x720 rgb8 frames with
sensor-data QoS; `sub N HZ` counts the distinct frames it receives until SIGINT and prints the count."""

from __future__ import annotations

import sys
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image


def main(role: str, count: int, rate: float) -> None:
    rclpy.init()
    node = rclpy.create_node(f"large_image_{role}")
    if role == "pub":
        from instructsam_ros.conversions import numpy_to_image

        pub = node.create_publisher(Image, "/large_image_test", qos_profile_sensor_data)
        msg = numpy_to_image(np.zeros((720, 1280, 3), np.uint8), "rgb8")
        deadline = time.monotonic() + 20
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the match settle on both sides
        for i in range(count):
            msg.header.stamp.sec = i
            pub.publish(msg)
            time.sleep(1.0 / rate)
        time.sleep(1.0)
    else:
        seen: set[int] = set()
        node.create_subscription(Image, "/large_image_test", lambda m: seen.add(m.header.stamp.sec),
                                 qos_profile_sensor_data)
        deadline = time.monotonic() + count / rate + 25
        try:  # until all arrived, the deadline, or SIGINT (the publisher is done)
            while time.monotonic() < deadline and len(seen) < count:
                rclpy.spin_once(node, timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):  # Kilted / Jazzy's SIGINT handling
            pass
        print(f"received {len(seen)}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
