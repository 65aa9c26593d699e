"""Match depth and camera_info messages to colour frames by stamp.

message_filters has no wheel here, and the node needs only one thing from it: "the
depth frame (and camera_info) whose stamp is nearest the colour frame's, if within a
tolerance". A small ring buffer per stream does that.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampBuffer:
    """The last `size` messages of one stream, looked up by nearest header stamp.

    Thread-safe: filled from subscription callbacks, read by the inference thread.
    """

    def __init__(self, size: int = 30):
        self._items: deque[tuple[int, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, msg) -> None:
        """Store a message that has a std_msgs/Header `header`."""
        with self._lock:
            self._items.append((stamp_ns(msg.header.stamp), msg))

    def nearest(self, stamp, tolerance_s: float):
        """The message whose stamp is nearest `stamp`, or None if none is within tolerance."""
        t = stamp_ns(stamp)
        tol = int(tolerance_s * 1e9)
        with self._lock:
            best = min(self._items, key=lambda it: abs(it[0] - t), default=None)
        if best is None or abs(best[0] - t) > tol:
            return None
        return best[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
