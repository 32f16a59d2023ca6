"""Readiness and graceful drain: after SIGTERM, finish what was admitted, refuse the rest."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["Drain"]

log = logging.getLogger("splitinfer.cloud")


class Drain:
    """Counts inference requests in flight and knows whether the server is draining.

    While draining, readiness answers 503 and new inference requests are refused with 503
    (``not_ready`` and ``Retry-After``), so a load balancer moves traffic to other replicas;
    the requests already admitted run to completion.
    """

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def begin(self) -> None:
        if not self.draining:
            log.info("draining: readiness is now 503; %d request(s) in flight", self.inflight)
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every admitted request finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            log.warning("drain timeout: %d request(s) still in flight", self.inflight)
            return False
        return True
