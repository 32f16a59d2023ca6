"""Hedged requests: past its hedge time, a sent request races the device finishing it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Hedger"]

T = TypeVar("T")
log = logging.getLogger("splitinfer.edge")


class Hedger:
    """Races the device against overdue cloud requests; keeps the cloud requests a hedge made
    moot until they end (they still measure the link), and cancels them on :meth:`close`."""

    def __init__(self) -> None:
        #: Cloud requests whose answer a hedge made moot, left to finish.
        self.moot: set[asyncio.Future[Any]] = set()

    async def race(
        self, send: asyncio.Future[Any], hedge_s: float, finish: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Wait ``hedge_s`` for ``send``; if it is still out, race ``finish()`` (the device)
        against it. The device's result if it finished first, else None: ``send`` is then done
        (answer or error) and the caller reads it."""
        done, _ = await asyncio.wait({send}, timeout=hedge_s)
        if done:
            return None
        local = asyncio.ensure_future(finish())
        try:
            racing: set[asyncio.Future[Any]] = {send, local}
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            local.cancel()
            send.cancel()
            raise
        if send in done:  # the cloud came back while the device worked: its answer is used
            local.cancel()
            return None
        self.moot.add(send)
        send.add_done_callback(self._forget)
        return local.result()

    def _forget(self, fut: asyncio.Future[Any]) -> None:
        """A moot cloud request ended: drop it, and read its outcome (nobody else will)."""
        self.moot.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("the cloud request a hedge made moot failed: %s", fut.exception())

    async def close(self) -> None:
        for fut in list(self.moot):
            fut.cancel()
        if self.moot:
            await asyncio.gather(*self.moot, return_exceptions=True)
