"""Overload: offered load at 4x capacity against a real ``splitinfer serve`` process.

The server admits what its queue holds and refuses the rest at once with 503 + Retry-After, so
goodput stays near capacity and admitted requests keep a bounded latency; clients that honour
Retry-After (EdgeClient does) back off. The suite checks the behaviour (every answer a correct
200 or a 503 with Retry-After; clients back off); the figures (goodput against capacity, p99)
are recorded by ``make bench`` on the long run, since on a shared machine they are measurements,
not assertions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import aiohttp
import pytest
import torch

from splitinfer.cloud._state import STATE
from splitinfer.edge import CircuitBreaker, EdgeClient
from tests.support.cloud import INFER, compute_held, frame, outputs, post, running, until
from tests.support.faults import (
    LoadRun,
    ServeProcess,
    closed_loop,
    cpu_seconds,
    heavy_frame,
    open_loop,
    percentile,
    report,
    scale,
)

pytestmark = pytest.mark.slow

ROWS = 16  # samples per request: a tail of several ms, so that compute bounds the capacity
BATCH = 2 * ROWS
QUEUE = 16
#: A fleet: each device offers a small share of the load (fewer in the short run, so that each
#: sends several requests within a Retry-After).
CLIENTS = int(scale(32, 256))


async def test_four_times_capacity_is_shed_with_retry_after(repository, cnn_bundle, cnn):
    seconds = scale(2.0, 30.0)
    x, body = heavy_frame(cnn_bundle, ROWS)
    with torch.no_grad():
        want = cnn(x)
    options = ("--compute-threads", "1", "--torch-threads", "1", "--max-batch-size", str(BATCH))
    with ServeProcess(repository, *options, "--max-queue-length", str(QUEUE)) as server:
        url = server.url + INFER
        await closed_loop(url, body, 8, min(seconds, 2.0))  # warm up
        cpu: dict[str, tuple[float, float]] = {}  # CPU seconds per second: server, load generator

        async def measured(name: str, run: Awaitable[LoadRun]) -> LoadRun:
            before = cpu_seconds(server.pid), cpu_seconds()
            result = await run
            after = cpu_seconds(server.pid), cpu_seconds()
            cpu[name] = ((after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds)
            return result

        # never more clients than the queue admits: none is refused
        capacity_run = await measured("capacity", closed_loop(url, body, QUEUE, seconds))
        capacity = capacity_run.rate(200)
        assert capacity_run.statuses() == {200: len(capacity_run.outcomes)}
        offered = 4 * capacity
        overload = await measured("overload", open_loop(url, body, offered, seconds))
        backoff = await measured(
            "backoff", open_loop(url, body, offered, seconds, clients=CLIENTS, honour_retry_after=True)
        )
        assert server.tracebacks() == []
    for run in (overload, backoff):
        assert set(run.statuses()) <= {200, 503}, run.statuses()
        assert all(o.retry_after == "1" for o in run.outcomes if o.status == 503)
        for o in run.outcomes[:: max(1, len(run.outcomes) // 50)]:
            if o.status == 200:
                assert torch.allclose(outputs(o.body)[0], want, atol=1e-5)
    assert overload.count(503) > 0  # 4x capacity cannot all be admitted
    assert backoff.backed_off > 0  # clients told to come back later did
    sent = len(backoff.outcomes)
    report(
        "overload",
        {
            "seconds": seconds,
            "rows_per_request": ROWS,
            "max_batch_size": BATCH,
            "max_queue_length": QUEUE,
            "capacity_rps": round(capacity, 1),
            "capacity_p99_ms": round(percentile(capacity_run.latencies(), 99) * 1000, 1),
            "offered_rps": round(offered, 1),
            "sent_rps": round(len(overload.outcomes) / seconds, 1),
            "goodput_rps": round(overload.rate(200), 1),
            "goodput_over_capacity": round(overload.rate(200) / capacity, 3),
            "admitted_p50_ms": round(percentile(overload.latencies(), 50) * 1000, 1),
            "admitted_p99_ms": round(percentile(overload.latencies(), 99) * 1000, 1),
            "statuses": {str(k): v for k, v in overload.statuses().items()},
            "rejected_p99_ms": round(percentile(overload.latencies(503), 99) * 1000, 1),
            "cpu_per_s": {k: [round(v[0], 2), round(v[1], 2)] for k, v in cpu.items()},
            "backoff": {
                "clients": CLIENTS,
                "offered": sent + backoff.backed_off,
                "sent": sent,
                "backed_off": backoff.backed_off,
                "goodput_rps": round(backoff.rate(200), 1),
                "goodput_over_capacity": round(backoff.rate(200) / capacity, 3),
                "admitted_p99_ms": round(percentile(backoff.latencies(), 99) * 1000, 1),
                "statuses": {str(k): v for k, v in backoff.statuses().items()},
            },
        },
    )


async def test_edge_client_honours_retry_after(repository, cnn_bundle, cnn):
    """Shed once with Retry-After, the client finishes the next requests on its device without
    asking the server again until the time is up."""
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x)
    async with running(repository, max_queue_length=1) as server:
        breaker = CircuitBreaker(failures_to_open=100)  # only Retry-After keeps the client away
        async with (
            aiohttp.ClientSession() as s,
            EdgeClient(
                server.url, bundle=cnn_bundle, policy="static", cut=3, codec="f32+zstd1", breaker=breaker
            ) as client,
        ):
            async with compute_held(server):
                waiting = asyncio.ensure_future(post(s, server.url + INFER, frame(cnn_bundle, 3, x)))
                await until(lambda: server.app[STATE].scheduler.waiting == 1)
                out = await client.ainfer(x)
                assert client.last_trace.fallback == "shed"
                assert torch.allclose(out, want, atol=1e-5)
                for _ in range(3):
                    out = await client.ainfer(x)
                    assert client.last_trace.fallback == "backoff"
                    assert torch.allclose(out, want, atol=1e-5)
            status, _, _ = await waiting
            assert status == 200
        asked = server.registry.get_sample_value(
            "splitinfer_requests_total", {"model": "democnn", "code": "overloaded"}
        )
        assert asked == 1.0  # the three backed-off requests never reached the server
