"""Soak: a real ``splitinfer serve`` process at 70% of its measured capacity, for a while.

The load is paced: 16 clients send at most 70% of the capacity measured at the start, each
waiting for its answer before its next request, so that when the machine's other work slows
the server the clients slow down too, rather than piling up a backlog (shedding under overload
is test_overload.py's subject).

No request may fail, and the server's resident memory may grow by less than 5% from the end of
the warm-up to the end of the run. The suite soaks for 10 s; ``make bench`` for 10 minutes.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
import torch

from tests.support.cloud import INFER, outputs
from tests.support.faults import (
    ServeProcess,
    closed_loop,
    heavy_frame,
    paced_loop,
    percentile,
    report,
    scale,
)

pytestmark = pytest.mark.slow

ROWS = 4
QUEUE = 1024


async def test_soak_at_seventy_percent_of_capacity(repository, cnn_bundle, cnn):
    seconds = scale(10.0, 600.0)
    warmup = min(5.0, seconds / 4)
    x, body = heavy_frame(cnn_bundle, ROWS, seed=1)
    with torch.no_grad():
        want = cnn(x)
    options = ("--compute-threads", "1", "--torch-threads", "1", "--max-batch-size", "8")
    # a queue that absorbs the slowdowns of a shared machine: the soak is about staying healthy
    # for long, not about shedding (test_overload.py)
    options += ("--max-queue-length", str(QUEUE))
    with ServeProcess(repository, *options) as server:
        url = server.url + INFER
        await closed_loop(url, body, 8, 2.0)  # warm up
        capacity = (await closed_loop(url, body, 16, scale(3.0, 20.0))).rate(200)
        rate = 0.7 * capacity
        samples: list[tuple[float, int]] = []
        load = asyncio.ensure_future(paced_loop(url, body, rate, seconds))
        t0 = time.perf_counter()
        while not load.done():
            samples.append((time.perf_counter() - t0, server.rss()))
            await asyncio.wait([load], timeout=1.0)
        run = load.result()
        samples.append((time.perf_counter() - t0, server.rss()))
        assert server.tracebacks() == []
    errors = len(run.outcomes) - run.count(200)
    baseline = statistics.median(rss for t, rss in samples if warmup <= t <= warmup + 3.0)
    final = statistics.median(rss for _, rss in samples[-3:])
    growth = (final - baseline) / baseline
    for o in [o for o in run.outcomes if o.status == 200][:: max(1, len(run.outcomes) // 50)]:
        assert torch.allclose(outputs(o.body)[0], want, atol=1e-5)
    report(
        "soak",
        {
            "seconds": seconds,
            "max_queue_length": QUEUE,
            "capacity_rps": round(capacity, 1),
            "offered_rps": round(rate, 1),
            "achieved_rps": round(len(run.outcomes) / seconds, 1),
            "requests": len(run.outcomes),
            "errors": errors,
            "statuses": {str(k): v for k, v in run.statuses().items()},
            "p50_ms": round(percentile(run.latencies(), 50) * 1000, 1),
            "p99_ms": round(percentile(run.latencies(), 99) * 1000, 1),
            "rss_after_warmup_bytes": int(baseline),
            "rss_final_bytes": int(final),
            "rss_growth": round(growth, 4),
            "rss_samples": [(round(t, 1), rss) for t, rss in samples[:: max(1, len(samples) // 60)]],
        },
    )
    assert errors == 0, run.statuses()
    assert growth < 0.05, (baseline, final)
