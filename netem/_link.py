"""The link emulator: a TCP proxy on 127.0.0.1 that shapes each direction by a trace.

Each direction of every connection runs through a *link*: bytes are released at the rate the
bandwidth trace gives at that moment (integrated exactly over the trace, so stretches near
zero stall the link as a real one would), then delivered ``delay_s`` later (one-way delay).
The links are shared by all connections through the proxy, like one radio. A bounded buffer per
connection pushes back on the sender through TCP, as a router queue does.

>>> async with LinkEmulator(upstream=("127.0.0.1", 8080), uplink=BandwidthTrace.constant(2e6),
...                         delay_s=0.04) as emulator:
...     url = f"http://127.0.0.1:{emulator.port}"
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from splitinfer.errors import ConfigError
from splitinfer.netem._trace import BandwidthTrace

__all__ = ["LinkEmulator"]


class _Link:
    """One direction: release times from the trace (shared by all connections), then a delay."""

    def __init__(self, trace: BandwidthTrace, delay_s: float, started: float):
        self.trace = trace
        self.delay_s = delay_s
        self.started = started
        self.free_at = 0.0  # trace time at which the link is next idle

    def schedule(self, nbytes: int, now: float) -> float:
        """Monotonic time at which ``nbytes`` arriving now reach the other end."""
        t = max(self.free_at, now - self.started)
        self.free_at = self.trace.finish_time(t, nbytes * 8)
        return self.started + self.free_at + self.delay_s

    def chunk(self, now: float) -> int:
        """Bytes to read at once: about 5 ms of the current rate, 512 B to 64 KiB."""
        rate = self.trace.rate_at(now - self.started)
        return int(min(65536, max(512, rate / 8 * 0.005)))


class LinkEmulator:
    """A shaping TCP proxy; use ``async with`` (or start/stop) inside a running event loop."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        uplink: BandwidthTrace,
        downlink: BandwidthTrace | None = None,
        delay_s: float = 0.0,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        buffer_bytes: int = 256 * 1024,
        disconnects: Sequence[float] = (),
    ):
        if delay_s < 0:
            raise ConfigError(f"delay must be >= 0 s, got {delay_s}")
        self.upstream = upstream
        self.listen = listen
        self.uplink_trace = uplink
        self.downlink_trace = downlink or uplink
        self.delay_s = delay_s
        self.buffer_bytes = buffer_bytes
        self.disconnects = sorted(disconnects)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._stopping = False

    async def start(self) -> LinkEmulator:
        started = time.monotonic()
        self._up = _Link(self.uplink_trace, self.delay_s, started)
        self._down = _Link(self.downlink_trace, self.delay_s, started)
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        for at in self.disconnects:
            self._spawn(self._disconnect_later(started + at))
        return self

    def rewind(self) -> None:
        """Start both traces over from their time 0 now (open connections stay open)."""
        started = time.monotonic()
        for link in (self._up, self._down):
            link.started, link.free_at = started, 0.0

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.disconnect_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def disconnect_all(self) -> int:
        """Cut every open connection (both ends see a reset); returns how many were cut."""
        cut = 0
        for writer in list(self._writers):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
                cut += 1
        return cut

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _disconnect_later(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.disconnect_all()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:  # so that stop() ends open connections too
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, up_w))
        try:
            await asyncio.gather(
                self._pump(client_r, up_w, self._up),
                self._pump(up_r, client_w, self._down),
                return_exceptions=True,
            )
        finally:
            for w in (client_w, up_w):
                self._writers.discard(w)
                # A finished connection closes after its buffered bytes; a stopped one at once.
                w.transport.abort() if self._stopping else w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=max(2, self.buffer_bytes // 512))
        deliver = asyncio.ensure_future(self._deliver(queue, writer))
        try:
            while True:
                data = await reader.read(link.chunk(time.monotonic()))
                if not data:
                    break
                await queue.put((link.schedule(len(data), time.monotonic()), data))
            await queue.put((0.0, b""))
            await deliver
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await deliver

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        while True:
            at, data = await queue.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
