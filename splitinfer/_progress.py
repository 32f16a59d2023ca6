"""A small progress bar on stderr (no dependency): ``with Progress(total, "label") as p: p.step()``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Redraws at most ten times a second; prints nothing when ``enabled`` is False."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None):
        self.total = max(1, total)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def step(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.done == self.total):
            self._drawn = now
            self._draw(note)

    def _draw(self, note: str) -> None:
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self._started
        bar = "#" * filled + "-" * (width - filled)
        text = f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {note[:40]:<40}"
        self.stream.write(text)
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw("")
            self.stream.write("\n")
            self.stream.flush()
