"""A circuit breaker: stop hammering a dead cloud, probe it now and then, come back when it heals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitinfer.errors import ConfigError

__all__ = ["CircuitBreaker"]


@dataclass
class CircuitBreaker:
    """Closed: requests go to the cloud. After ``failures_to_open`` consecutive failures it opens:
    requests run on the device. ``reset_after_s`` later it lets one probe request through
    (half-open); a success closes it, a failure opens it again for another ``reset_after_s``.
    """

    failures_to_open: int = 3
    reset_after_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    state: str = "closed"
    _failures: int = 0
    _opened_at: float = 0.0
    _probing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.failures_to_open < 1:
            raise ConfigError(f"failures_to_open must be >= 1, got {self.failures_to_open}")
        if self.reset_after_s <= 0:
            raise ConfigError(f"reset_after_s must be > 0, got {self.reset_after_s}")

    def allow(self) -> bool:
        """Whether this request may try the cloud (at most one probe at a time while half-open)."""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self.clock() - self._opened_at >= self.reset_after_s:
                self.state = "half_open"
            if self.state == "half_open" and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.state, self._failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self.state == "half_open" or self._failures >= self.failures_to_open:
                self.state, self._opened_at = "open", self.clock()
            self._probing = False
