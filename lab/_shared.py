"""A shared cloud: many edge devices and a background tenant against one ``splitinfer serve``.

:func:`run_shared` runs one policy at a time on the same scenario: ``devices`` edge clients
(each with its own real trace stretch through its own :class:`~splitinfer.netem.LinkEmulator`
and its own device speed, emulated from the profile), each sending one request after another
(at most one every ``interval_s``), while a background tenant sends the whole model's input
to the same server at a rate that ramps from 0 to ``tenant_peak_rps`` at half time and back
to 0. The tenant's peak is chosen by the caller beyond what the server can compute, so the
devices meet a cloud that is idle, then swamped (queueing, then 503 with Retry-After), then
idle again. Per policy it reports mean and p95 latency, goodput (requests answered within
``slo_s`` per second) and the cloud's utilisation over time (the server process's CPU seconds
per second, sampled every second from /proc: what the cloud spends, whoever asked for it).

Used by ``benchmarks/bench_shared_cloud.py`` and, short, by tests/integration/lab/test_shared_cloud.py.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitinfer.bundle import Bundle
from splitinfer.netem import BandwidthTrace

__all__ = ["Device", "SharedResult", "run_shared", "tenant_rate"]


@dataclass(frozen=True)
class Device:
    """One edge device: its link (a trace stretch) and its slowdown against the profile."""

    trace: BandwidthTrace
    slowdown: float


@dataclass
class SharedResult:
    """What one policy's phase of the shared-cloud run measured."""

    policy: str
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    #: Per request: the device index, start time (s into the phase), latency, where it ended.
    requests: list[tuple[int, float, float, str]] = field(default_factory=list)
    tenant_sent: int = 0
    tenant_ok: int = 0
    tenant_shed: int = 0
    #: (seconds into the phase, the server's CPU cores busy, tenant requests/s asked for).
    utilisation: list[tuple[float, float, float]] = field(default_factory=list)
    agree: int = 0

    def summary(self, slo_s: float) -> dict[str, float]:
        xs = self.latencies
        good = sum(1 for x in xs if x <= slo_s)
        cloud = sum(1 for r in self.requests if r[3] == "cloud")
        return {
            "requests": float(len(xs)),
            "mean_s": statistics.mean(xs) if xs else math.nan,
            "p95_s": float(np.percentile(xs, 95)) if xs else math.nan,
            "goodput_rps": good / self.duration_s,
            "throughput_rps": len(xs) / self.duration_s,
            "cloud_share": cloud / len(xs) if xs else math.nan,
            "agreement": self.agree / len(xs) if xs else math.nan,
            "tenant_ok_rps": self.tenant_ok / self.duration_s,
            "tenant_shed": float(self.tenant_shed),
            "mean_utilisation": statistics.mean(u[1] for u in self.utilisation) if self.utilisation else 0.0,
        }


def tenant_rate(t: float, duration_s: float, peak_rps: float) -> float:
    """The tenant's request rate at ``t``: 0 at the ends, ``peak_rps`` at half time (a triangle)."""
    if not 0 <= t <= duration_s:
        return 0.0
    return peak_rps * (1.0 - abs(2.0 * t / duration_s - 1.0))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_shared(
    *,
    url: str,
    server_pid: int,
    bundle: Bundle,
    repo_model: Path,
    policy: str,
    devices: Sequence[Device],
    images: torch.Tensor,
    reference: Sequence[int],
    duration_s: float,
    tenant_peak_rps: float,
    interval_s: float = 0.25,
    delay_s: float = 0.04,
    deadline_s: float = 10.0,
    static: tuple[int, str] | None = None,
    budget: float = 0.99,
    seed: int = 0,
    tenant_concurrency: int = 64,
) -> SharedResult:
    """One phase: ``policy`` on every device, the tenant ramping, for ``duration_s`` seconds.

    ``repo_model`` is the bundle's folder on disk (the tenant loads only its input side).
    """
    from splitinfer.edge import EdgeClient
    from splitinfer.errors import CloudError
    from splitinfer.lab._live import stop_all
    from splitinfer.netem import LinkEmulator

    host, port = url.removeprefix("http://").rsplit(":", 1)
    result = SharedResult(policy, duration_s)
    emulators = [LinkEmulator((host, int(port)), uplink=d.trace, delay_s=delay_s) for d in devices]
    clients: list[EdgeClient] = []
    tasks: list[asyncio.Future[None]] = []
    try:
        for em in emulators:
            await em.start()
        options: dict[str, Any] = {}
        if policy == "static":
            assert static is not None, "the static policy needs its (cut, codec)"
            options = {"cut": static[0], "codec": static[1]}
        elif policy == "adaptive":
            options = {"seed": seed}
        for i, (d, em) in enumerate(zip(devices, emulators)):
            clients.append(
                EdgeClient(
                    f"http://127.0.0.1:{em.port}",
                    bundle=bundle,
                    policy=policy,
                    device_slowdown=d.slowdown,
                    fidelity_budget=budget,
                    deadline_s=deadline_s,
                    hedge=policy == "adaptive",
                    emulate="profile",
                    **({**options, "seed": seed + i} if policy == "adaptive" else options),
                )
            )
        await asyncio.gather(*(c.awarm_up(images[:1]) for c in clients))
        tenant = EdgeClient(
            url, bundle=repo_model, policy="static", cut=0, codec="f32", max_cut=0, hedge=False
        )
        clients.append(tenant)
        for em in emulators:
            em.rewind()
        t0 = time.monotonic()

        async def device(i: int, client: EdgeClient) -> None:
            j = i
            while time.monotonic() - t0 < duration_s:
                start = time.monotonic()
                k = j % len(reference)
                out = await client.ainfer(images[k : k + 1])
                latency = time.monotonic() - start
                trace = client.last_trace
                assert trace is not None
                where = "device" if trace.cut == bundle.last_cut else (trace.fallback or "cloud")
                result.requests.append((i, start - t0, latency, where))
                result.latencies.append(latency)
                result.agree += int(out.argmax()) == reference[k]
                j += len(devices)
                rest = interval_s - (time.monotonic() - start)
                if rest > 0:
                    await asyncio.sleep(rest)

        slots = asyncio.Semaphore(tenant_concurrency)
        pending: set[asyncio.Future[None]] = set()

        async def one_tenant_request() -> None:
            try:
                await tenant.ainfer(images[:1])
                result.tenant_ok += 1
            except CloudError:
                result.tenant_shed += 1
            finally:
                slots.release()

        async def tenant_load() -> None:
            credit = 0.0
            last = time.monotonic()
            while (now := time.monotonic()) - t0 < duration_s:
                credit += tenant_rate(now - t0, duration_s, tenant_peak_rps) * (now - last)
                last = now
                while credit >= 1.0:
                    credit -= 1.0
                    if slots.locked():  # the tenant has too many in flight: it gives up this one
                        result.tenant_shed += 1
                        continue
                    await slots.acquire()
                    result.tenant_sent += 1
                    fut = asyncio.ensure_future(one_tenant_request())
                    pending.add(fut)
                    fut.add_done_callback(pending.discard)
                await asyncio.sleep(0.01)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        async def sample() -> None:
            cpu, at = _cpu_seconds(server_pid), time.monotonic()
            while at - t0 < duration_s:
                await asyncio.sleep(1.0)
                cpu2, at2 = _cpu_seconds(server_pid), time.monotonic()
                mid = (at + at2) / 2 - t0
                result.utilisation.append(
                    (mid, (cpu2 - cpu) / (at2 - at), tenant_rate(mid, duration_s, tenant_peak_rps))
                )
                cpu, at = cpu2, at2

        tasks = [asyncio.ensure_future(device(i, c)) for i, c in enumerate(clients[:-1])]
        tasks += [asyncio.ensure_future(tenant_load()), asyncio.ensure_future(sample())]
        await asyncio.gather(*tasks)
    finally:
        await stop_all(tasks, clients, emulators)
    return result
