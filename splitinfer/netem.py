"""A trace-driven link emulator: a TCP proxy on 127.0.0.1 that shapes each direction.

Each direction of every connection runs through a *link*: bytes are released at the rate the
bandwidth trace gives at that moment (integrated exactly over the trace, so stretches near
zero stall the link as a real one would), then delivered ``delay_s`` later (one-way delay).
The links are shared by all connections through the proxy, like one radio. A bounded buffer per
connection pushes back on the sender through TCP, as a router queue does.

>>> async with LinkEmulator(upstream=("127.0.0.1", 8080), uplink=BandwidthTrace.constant(2e6),
...                         delay_s=0.04) as emulator:
...     url = f"http://127.0.0.1:{emulator.port}"

Traces are ``<seconds> <Mbit/s>`` per line (looped); :data:`PROFILES` names typical networks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from splitinfer.errors import ConfigError

__all__ = ["PROFILES", "BandwidthTrace", "LinkEmulator", "NetworkProfile", "parse_duration", "parse_rate"]

_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(bit|bps|b)?(/s)?\s*$")
_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*$")


def parse_rate(text: str) -> float:
    """``2Mbit``, ``500kbit``, ``1.5Gbit``, ``800000`` (bits per second) to bits per second."""
    match = _RATE_RE.match(str(text))
    if match is None:
        raise ConfigError(f"a rate is a number with an optional k/M/G and 'bit', e.g. 2Mbit; got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    return float(match.group(1)) * scale


def parse_duration(text: str) -> float:
    """``40ms``, ``0.1s``, ``250us`` or a bare number of seconds, to seconds."""
    match = _TIME_RE.match(str(text))
    if match is None:
        raise ConfigError(f"a duration is a number with ms, s or us, e.g. 40ms; got {text!r}")
    return float(match.group(1)) * {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}[match.group(2)]


@dataclass(frozen=True)
class BandwidthTrace:
    """A piecewise-constant rate over time, looped: ``rates_bps[i]`` holds from ``times[i]``."""

    times: tuple[float, ...]
    rates_bps: tuple[float, ...]
    period: float
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.rates_bps):
            raise ConfigError("a trace needs as many rates as times, at least one")
        if self.times[0] != 0 or any(b <= a for a, b in zip(self.times, self.times[1:])):
            raise ConfigError("trace times must start at 0 and increase")
        if self.period <= self.times[-1] or any(r < 0 for r in self.rates_bps):
            raise ConfigError("a trace's period must exceed its last time, and rates must be >= 0")
        if max(self.rates_bps) <= 0:
            raise ConfigError("a trace must carry some bandwidth: every rate in it is zero")

    @classmethod
    def constant(cls, rate_bps: float) -> BandwidthTrace:
        if rate_bps <= 0:
            raise ConfigError(f"a link rate must be positive, got {rate_bps}")
        return cls((0.0,), (float(rate_bps),), 1.0, f"{rate_bps / 1e6:g}Mbit")

    @classmethod
    def parse(cls, text: str, name: str = "trace") -> BandwidthTrace:
        """``<seconds> <Mbit/s>`` lines; times may start anywhere (shifted to 0)."""
        times, rates = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            try:
                t, mbit = float(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise ConfigError(
                    f"{name} line {number}: expected '<seconds> <Mbit/s>', got {line!r}"
                ) from None
            times.append(t)
            rates.append(max(0.0, mbit) * 1e6)
        if not times:
            raise ConfigError(f"{name} holds no samples")
        start = times[0]
        times = [t - start for t in times]
        step = times[-1] / (len(times) - 1) if len(times) > 1 else 1.0
        return cls(tuple(times), tuple(rates), times[-1] + step, name)

    @classmethod
    def load(cls, name_or_path: str | Path) -> BandwidthTrace:
        """A trace file, or the name of a trace shipped with splitinfer (:func:`shipped_traces`)."""
        path = Path(name_or_path)
        if path.is_file():
            return cls.parse(path.read_text(), path.name)
        shipped = shipped_traces()
        if str(name_or_path) in shipped:
            return cls.parse(shipped[str(name_or_path)].read_text(), str(name_or_path))
        raise ConfigError(
            f"no trace file {str(name_or_path)!r}; shipped traces: {', '.join(sorted(shipped))}"
        )

    def rate_at(self, t: float) -> float:
        t %= self.period
        return self.rates_bps[bisect.bisect_right(self.times, t) - 1]

    def mean_bps(self) -> float:
        edges = [*self.times, self.period]
        return sum(r * (b - a) for r, a, b in zip(self.rates_bps, edges, edges[1:])) / self.period

    def finish_time(self, start: float, bits: float) -> float:
        """When a link following this trace, free at ``start``, has sent ``bits`` more bits."""
        t = start
        whole = self.mean_bps() * self.period
        loops = int(bits // whole) if whole > 0 else 0
        t += loops * self.period
        bits -= loops * whole
        # Walk the segments by index from the start's phase: recomputing the phase from a
        # growing float ``t`` can land a hair before a segment's end forever (t ~ 300 s), so the
        # phase is computed once and then advanced exactly.
        phase = t % self.period
        i = bisect.bisect_right(self.times, phase) - 1
        while bits > 1e-9:
            end = self.times[i + 1] if i + 1 < len(self.times) else self.period
            rate = self.rates_bps[i]
            span = max(0.0, end - phase)
            if rate * span >= bits:
                return t + bits / rate
            bits -= rate * span
            t += span
            i, phase = (i + 1, end) if i + 1 < len(self.times) else (0, 0.0)
        return t


def shipped_traces() -> dict[str, Path]:
    """The real traces that ship as package data, by name (file name without ``.txt``)."""
    folder = resources.files("splitinfer") / "traces"
    return {p.name.removesuffix(".txt"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt")}


@dataclass(frozen=True)
class NetworkProfile:
    """A named network: uplink and downlink rates and the one-way delay."""

    uplink_bps: float
    downlink_bps: float
    delay_s: float
    note: str


#: Typical uplinks of mobile devices (uplink is what split inference sends on); documented in
#: docs/netem.md with their sources.
PROFILES: dict[str, NetworkProfile] = {
    "3g": NetworkProfile(1.5e6, 6e6, 0.050, "HSPA uplink: ~1.5 Mbit/s up, 6 down, 100 ms RTT"),
    "lte": NetworkProfile(8e6, 30e6, 0.025, "LTE: ~8 Mbit/s up, 30 down, 50 ms RTT"),
    "wifi": NetworkProfile(40e6, 80e6, 0.005, "Wi-Fi 5 at range: ~40 Mbit/s up, 80 down, 10 ms RTT"),
    "5g": NetworkProfile(60e6, 300e6, 0.010, "5G mid-band: ~60 Mbit/s up, 300 down, 20 ms RTT"),
}


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

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _disconnect_later(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.disconnect_all()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:  # so that stop() ends open connections too
            self._tasks.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
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
