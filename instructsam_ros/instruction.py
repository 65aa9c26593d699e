"""Instruction text checks and the instruction id counter (ROS-free)."""

from __future__ import annotations

import threading
import unicodedata
from dataclasses import dataclass


class InstructionError(ValueError):
    """An instruction the node refuses; the message says why."""


class InstructionTooLong(InstructionError):
    """An instruction over the `max_instruction_chars` limit (never cut silently)."""


def clean_instruction(text: str, max_chars: int) -> tuple[str, list[str]]:
    """Check and normalise an instruction.

    Returns the text to use ("" means "no instruction") and warnings to log (control
    characters replaced). Raises InstructionError for text that is not clean UTF-8
    (rclpy decodes a std_msgs/String with errors="replace", so invalid bytes arrive as
    U+FFFD) and InstructionTooLong for more than `max_chars` characters (the engine's
    limit of the same name).
    """
    warnings: list[str] = []
    if "\ufffd" in text:
        n = text.count("\ufffd")
        raise InstructionError(
            f"instruction is not valid UTF-8 ({n} invalid byte sequence(s)); send UTF-8 text")
    cleaned = "".join(
        ch if ch in "\t\n" or unicodedata.category(ch) not in ("Cc", "Cs") else " "
        for ch in text)
    if cleaned != text:
        warnings.append("instruction contained control characters; they were replaced by spaces")
    cleaned = " ".join(cleaned.split())  # collapse whitespace runs and newlines
    if len(cleaned) > max_chars:
        raise InstructionTooLong(
            f"instruction has {len(cleaned)} characters, more than the limit of {max_chars} "
            "(parameter max_instruction_chars)")
    return cleaned, warnings


@dataclass(frozen=True)
class Instruction:
    """The current instruction and its id (0 while there is none)."""

    text: str = ""
    id: int = 0


class InstructionState:
    """The latched instruction; the id rises only when the text changes.

    `ros2 topic pub` repeats the same message every second; repeating must not look
    like a new request to consumers that key on instruction_id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = Instruction()
        self._counter = 0

    def set(self, text: str) -> tuple[Instruction, bool]:
        """Latch `text` ("" clears). Returns the current instruction and whether it changed."""
        with self._lock:
            if text == self._current.text:
                return self._current, False
            if text:
                self._counter += 1
                self._current = Instruction(text, self._counter)
            else:
                self._current = Instruction()
            return self._current, True

    def get(self) -> Instruction:
        with self._lock:
            return self._current
