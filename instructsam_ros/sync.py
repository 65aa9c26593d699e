"""Match depth and camera_info messages to colour frames by stamp.

message_filters has no wheel here, and the node needs only one thing from it: "the
depth frame (and camera_info) whose stamp is nearest the colour frame's, if within a
tolerance". A small time-bounded buffer per stream does that. Aligned depth is usually
published *after* its colour frame, so the reader can wait a bounded time for a match
(`wait_nearest`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampBuffer:
    """The messages of one stream from the last `keep_s` seconds (by header stamp),
    looked up by nearest stamp.

    Sized by time, not count, so a lookup works whatever the stream's rate; `max_items`
    only bounds memory for very fast streams. A stamp that jumps back by more than
    `keep_s` (a bag restarting, a simulator reset) empties the buffer.
    Thread-safe: filled from subscription callbacks, read by the inference thread.
    """

    def __init__(self, keep_s: float = 2.0, max_items: int = 120):
        self._keep = int(keep_s * 1e9)
        self._items: deque[tuple[int, Any]] = deque(maxlen=max_items)
        self._cond = threading.Condition()

    def add(self, msg) -> None:
        """Store a message that has a std_msgs/Header `header`."""
        t = stamp_ns(msg.header.stamp)
        with self._cond:
            if self._items and t < self._items[-1][0] - self._keep:
                self._items.clear()  # time went backwards
            self._items.append((t, msg))
            while self._items and self._items[0][0] < t - self._keep:
                self._items.popleft()
            self._cond.notify_all()

    def _lookup(self, t: int, tol: int) -> tuple[Any, bool]:
        """(match or None, whether the stream has moved past t + tol); lock held."""
        best = min(self._items, key=lambda it: abs(it[0] - t), default=None)
        passed = bool(self._items) and max(it[0] for it in self._items) > t + tol
        if best is None or abs(best[0] - t) > tol:
            return None, passed
        return best[1], passed

    def nearest(self, stamp, tolerance_s: float):
        """The message whose stamp is nearest `stamp`, or None if none is within tolerance."""
        with self._cond:
            return self._lookup(stamp_ns(stamp), int(tolerance_s * 1e9))[0]

    def wait_nearest(self, stamp, tolerance_s: float, timeout_s: float,
                     cancelled: Callable[[], bool] = lambda: False):
        """Like `nearest`, but wait up to `timeout_s` for a match to arrive.

        Returns early (None) when the stream already holds a message newer than
        `stamp + tolerance` (messages of a stream arrive in order, so the match would
        have come before it) or when `cancelled()` becomes true.
        """
        t, tol = stamp_ns(stamp), int(tolerance_s * 1e9)
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                match, passed = self._lookup(t, tol)
                if match is not None or passed or cancelled():
                    return match
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
