"""The link emulator: rates within 10% over 1 s windows, delay within 2 ms, traces, disconnects."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitinfer.errors import ConfigError
from splitinfer.netem import (
    PROFILES,
    BandwidthTrace,
    LinkEmulator,
    parse_duration,
    parse_rate,
    shipped_traces,
)


class Sink:
    """A TCP server that reads everything and records (time, bytes) of each read."""

    def __init__(self):
        self.reads: list[tuple[float, int]] = []

    async def handle(self, reader, writer):
        while data := await reader.read(65536):
            self.reads.append((time.monotonic(), len(data)))
        writer.close()

    def windows(self, start: float, seconds: int) -> list[float]:
        """Bits per second in consecutive 1 s windows from ``start``."""
        out = []
        for w in range(seconds):
            lo, hi = start + w, start + w + 1
            out.append(sum(n for t, n in self.reads if lo <= t < hi) * 8.0)
        return out


async def _blast(port: int, seconds: float) -> float:
    """Send as fast as the proxy accepts for ``seconds``; returns when the sending started."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"\0" * 16384
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        writer.write(chunk)
        await writer.drain()
    writer.close()
    return start


@pytest.mark.parametrize("rate", [0.5e6, 5e6, 50e6])
async def test_throughput_within_ten_percent_over_one_second_windows(rate):
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    upstream = ("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        async with LinkEmulator(upstream, uplink=BandwidthTrace.constant(rate)) as em:
            await _blast(em.port, 4.0)
            await asyncio.sleep(0.3)
        first = sink.reads[0][0]
        windows = sink.windows(first + 0.5, 3)  # skip the first half second (buffers filling)
        for measured in windows:
            assert abs(measured - rate) / rate < 0.10, (rate, windows)
    finally:
        server.close()
        await server.wait_closed()


async def test_added_delay_within_two_ms():
    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream = ("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        rtts = {}
        for delay in (0.0, 0.040):
            async with LinkEmulator(upstream, uplink=BandwidthTrace.constant(100e6), delay_s=delay) as em:
                reader, writer = await asyncio.open_connection("127.0.0.1", em.port)
                samples = []
                for _ in range(15):
                    t0 = time.monotonic()
                    writer.write(b"x")
                    await reader.readexactly(1)
                    samples.append(time.monotonic() - t0)
                writer.close()
                rtts[delay] = sorted(samples)[len(samples) // 2]
        added_one_way = (rtts[0.040] - rtts[0.0]) / 2
        assert abs(added_one_way - 0.040) < 0.002, rtts
    finally:
        server.close()
        await server.wait_closed()


async def test_rate_follows_the_trace():
    trace = BandwidthTrace.parse("0 1.0\n1 4.0\n", "step")  # 1 Mbit/s for 1 s, then 4, looped (2 s)
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    try:
        async with LinkEmulator(("127.0.0.1", server.sockets[0].getsockname()[1]), uplink=trace) as em:
            start = await _blast(em.port, 4.2)
            await asyncio.sleep(0.2)
        slow = sink.windows(start + 2.0, 1)[0]  # the loop's slow second
        fast = sink.windows(start + 3.0, 1)[0]
        assert 0.8e6 < slow < 1.25e6 and 3.4e6 < fast < 4.6e6, (slow, fast)
    finally:
        server.close()
        await server.wait_closed()


async def test_disconnects_cut_open_connections():
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    try:
        async with LinkEmulator(
            ("127.0.0.1", server.sockets[0].getsockname()[1]),
            uplink=BandwidthTrace.constant(1e6),
            disconnects=[0.3],
        ) as em:
            reader, writer = await asyncio.open_connection("127.0.0.1", em.port)

            async def keep_sending():
                for _ in range(100):
                    writer.write(b"\0" * 8192)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                await reader.readexactly(1)

            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await keep_sending()
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_trace_arithmetic():
    trace = BandwidthTrace.parse("10 1\n11 0\n12 3\n", "t")  # shifted to start at 0; period 3 s
    assert trace.times == (0.0, 1.0, 2.0) and trace.period == 3.0
    assert trace.rate_at(0.5) == 1e6 and trace.rate_at(1.5) == 0 and trace.rate_at(3.5) == 1e6
    assert trace.mean_bps() == pytest.approx(4e6 / 3)
    # 2 Mbit from t=0: 1 Mbit in the first second, nothing in the second, 1 Mbit in 1/3 s.
    assert trace.finish_time(0.0, 2e6) == pytest.approx(2 + 1 / 3)


@pytest.mark.timeout(20)
def test_finish_time_terminates_and_is_exact_late_in_a_real_trace():
    # Recomputing the phase from a growing float time once looped forever here (t ~ 321 s).
    trace = BandwidthTrace.load("norway-3g-train-1")
    for start in (0.0, 321.0, 321.7, trace.period - 1e-9, 5 * trace.period + 0.3):
        for bits in (1.0, 8e4, 3e6, 2 * trace.mean_bps() * trace.period):
            end = trace.finish_time(start, bits)
            # Integrate the trace from start to end on a fine grid: it must carry ``bits``.
            steps = 20000
            dt = (end - start) / steps
            sent = sum(trace.rate_at(start + (k + 0.5) * dt) for k in range(steps)) * dt
            assert sent == pytest.approx(bits, rel=0.02, abs=trace.rates_bps[0] * dt * 4)


def test_shipped_traces_and_profiles():
    traces = shipped_traces()
    assert {"norway-3g-bus-1", "norway-3g-train-1", "fcc-hsdpa-ferry-10-part0"} <= set(traces)
    trace = BandwidthTrace.load("norway-3g-train-1")
    assert 0.5e6 < trace.mean_bps() < 5e6
    assert set(PROFILES) == {"3g", "lte", "wifi", "5g"}


@pytest.mark.parametrize(
    ("text", "value"), [("2Mbit", 2e6), ("500kbit", 5e5), ("1.5Gbit", 1.5e9), ("800kbit/s", 8e5)]
)
def test_parse_rate(text, value):
    assert parse_rate(text) == value  # the one parser of rates (splitinfer._units), as `plan` reads them


def test_parse_errors_say_the_form():
    with pytest.raises(ConfigError, match="2Mbit"):
        parse_rate("fast")
    with pytest.raises(ConfigError, match="2Mbit"):
        parse_rate("800000")  # a unit is required: bits, bytes?
    with pytest.raises(ConfigError, match="80ms"):
        parse_duration("soon")
    assert parse_duration("40ms") == pytest.approx(0.04)
    with pytest.raises(ConfigError, match="zero"):
        BandwidthTrace.parse("0 0\n1 0\n")
    with pytest.raises(ConfigError, match="shipped traces"):
        BandwidthTrace.load("no-such-trace")


async def test_rewind_starts_the_trace_over():
    """A trace that is dead for its first second, then fast: after a rewind the link is dead again."""
    from splitinfer.netem import BandwidthTrace, LinkEmulator

    trace = BandwidthTrace((0.0, 1.0), (0.0, 1e9), 2.0, "dead-then-fast")
    em = LinkEmulator(("127.0.0.1", 9), uplink=trace)
    await em.start()
    try:
        started = em._up.started
        assert em._up.schedule(1000, started + 1.5) - started < 1.6  # in the fast second: at once
        em.rewind()
        started = em._up.started
        # Time 0 again, and the link free: a chunk now waits out the dead second, and no more.
        assert 1.0 <= em._up.schedule(1000, started) - started < 1.1
    finally:
        await em.stop()
