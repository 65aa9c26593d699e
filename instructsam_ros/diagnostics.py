"""The node's counters and its diagnostic status (what /diagnostics says)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Stats:
    """Counters since activation (written by callbacks and the worker; ints are atomic enough).

    `received` counts frames that reached the node: a frame lost in transport (e.g. too
    large for the DDS shared-memory segment) never shows up here, only as a lower input
    rate. `dropped` (in the slot) counts frames replaced by newer ones before the model
    got to them.
    """

    received: int = 0
    processed: int = 0
    invalid: int = 0  # frames skipped for bad input
    rate_limited: int = 0  # frames skipped by max_rate
    failed: int = 0  # frames the engine raised on
    depth_unmatched: int = 0
    last_latency: float = 0.0
    last_age: float = 0.0
    last_instances: int = 0


class InputRate:
    """Frames per second between two diagnostics publications."""

    def __init__(self) -> None:
        self._prev = (time.monotonic(), 0)

    def update(self, received: int) -> float:
        now = time.monotonic()
        t_prev, n_prev = self._prev
        self._prev = (now, received)
        return (received - n_prev) / max(now - t_prev, 1e-6)


def status_of(active: bool, instruction: str, rate: float, stats: Stats) -> tuple[str, str]:
    """(level, message): level is "OK" or "WARN"."""
    if not active:
        return "WARN", "inactive (no model loaded)"
    if not instruction:
        return "OK", "waiting for an instruction"
    if rate <= 0.0:
        return "WARN", "no images arriving"
    if stats.last_age > 1.0:
        return "WARN", "results are stale"
    return "OK", "running"


def status_values(instruction: str, instruction_id: int, rate: float, stats: Stats, dropped: int) -> dict[str, str]:
    """The key/value pairs of the diagnostic status."""
    values = {
        "instruction": instruction, "instruction_id": instruction_id,
        "input_rate_hz": f"{rate:.2f}", "frames_received": stats.received,
        "frames_processed": stats.processed, "frames_dropped": dropped,
        "frames_invalid": stats.invalid, "frames_rate_limited": stats.rate_limited,
        "frames_failed": stats.failed, "depth_unmatched": stats.depth_unmatched,
        "last_latency_s": f"{stats.last_latency:.4f}", "staleness_s": f"{stats.last_age:.4f}",
        "last_instances": stats.last_instances,
    }
    return {k: str(v) for k, v in values.items()}
