"""The newest-frame slot and the inference worker that drains it (no rclpy here).

A slow model never builds a queue: a frame that arrives while the model is busy replaces
the waiting one (counted as dropped), so results always describe the newest scene. Frames
that fail the cheap checks never enter the slot, so a malformed frame cannot push out a
good one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Frame:
    """A colour frame waiting for the model."""

    msg: Any  # sensor_msgs/Image or CompressedImage
    compressed: bool
    received: float  # time.monotonic() at arrival


class LatestFrame:
    """A one-frame slot: a new frame replaces an unprocessed one (which counts as dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify()

    def take(self, timeout: float) -> Frame | None:
        """The newest frame, or None after `timeout` seconds or when closed."""
        with self._cond:
            if self._frame is None and not self._closed:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return None if self._closed else frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frame = None
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class FrameWorker:
    """A thread that hands each frame taken from `slot` to `handle`, until the slot closes.

    An exception from `handle` goes to `on_error` (one bad frame must not stop the stream).
    """

    def __init__(self, slot: LatestFrame, handle: Callable[[Frame], None],
                 on_error: Callable[[Frame, BaseException], None]):
        self.slot = slot
        self._handle = handle
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="instructsam-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self.slot.closed:
            frame = self.slot.take(timeout=0.5)
            if frame is None:
                continue
            try:
                self._handle(frame)
            except Exception as exc:  # noqa: BLE001 - reported by on_error, the stream goes on
                self._on_error(frame, exc)

    def stop(self, timeout: float = 30.0) -> None:
        """Close the slot and wait for the frame in progress to finish."""
        self.slot.close()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)


class RateLimit:
    """At most `rate` frames per second (0: no limit), measured on arrival."""

    def __init__(self) -> None:
        self._last = 0.0

    def allow(self, rate: float) -> bool:
        now = time.monotonic()
        if rate > 0.0 and now - self._last < 1.0 / rate:
            return False
        self._last = now
        return True
