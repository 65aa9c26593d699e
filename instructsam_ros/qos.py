"""QoS profiles of the node's topics (see docs/ros.md, "QoS")."""

from __future__ import annotations

from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)


def image_qos(reliability: str, depth: int) -> QoSProfile:
    """Camera inputs: best effort, keep last 1 by default (sensor-data QoS).

    Best effort subscriptions also match reliable publishers, so the default works with
    either kind of camera driver.
    """
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=(ReliabilityPolicy.RELIABLE if reliability == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT),
        durability=DurabilityPolicy.VOLATILE,
    )


def instruction_qos() -> QoSProfile:
    """/instruction: reliable + transient local, depth 1, so a node that starts after
    the instruction was published still receives the last one (publishers should use
    the same profile)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )


def output_qos() -> QoSProfile:
    """Outputs: reliable, keep last 5, volatile - every processed frame is delivered
    to a subscriber that keeps up."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=5,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )
