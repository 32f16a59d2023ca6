"""The live part of a policy comparison: edge clients through link emulators to a real server.

:func:`run_session` runs every policy side by side over the same stretch of a trace: one
:class:`~splitinfer.netem.LinkEmulator` and one :class:`~splitinfer.edge.EdgeClient` per policy,
all started together against one cloud server, each policy sending one request at a time (at
most one every ``interval_s``) until ``duration_s`` has passed on the trace's clock. Before the
trace starts, every client warms up in turn (``EdgeClient.awarm_up``: the device's speed, and the
round trip for the policies that probe), so no estimate starts from a cold, contended first
request. It returns one :class:`~splitinfer.lab._report.Record` per request; :func:`run_priced`
also prices them in hindsight. :func:`live_stack` starts what a session runs against (the
server, the edge's bundle, photos and their reference classes, all warmed up). Used by
``splitinfer demo`` and ``benchmarks/bench_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitinfer.bundle import Bundle
from splitinfer.errors import ConfigError
from splitinfer.lab._server import ServerProcess
from splitinfer.netem import BandwidthTrace

__all__ = [
    "POLICIES",
    "LiveStack",
    "Session",
    "live_stack",
    "reference_classes",
    "run_priced",
    "run_session",
    "stop_all",
    "warm_up",
    "warm_up_server",
]

POLICIES = ("adaptive", "neurosurgeon", "cloud", "local", "static")
#: An extra row a session can run beside :data:`POLICIES`: a static configuration tuned in
#: hindsight on the very stretch it is scored on (``Session.hindsight``). No deployment has that
#: baseline; it is named for what it is and kept to show how little a perfect static would win.
HINDSIGHT = "static-hindsight"


@dataclass
class Session:
    """One live comparison: the server URL, the edge's bundle and what to replay."""

    url: str
    bundle: Bundle
    trace: BandwidthTrace
    duration_s: float
    device_slowdown: float
    static: tuple[int, str]
    images: torch.Tensor
    reference: list[int]
    budget: float = 0.99
    delay_s: float = 0.04
    interval_s: float = 0.25
    deadline_s: float | None = 10.0
    policies: Sequence[str] = POLICIES
    seed: int = 0
    progress: bool = True
    label: str = "policies"
    counts: dict[str, int] = field(default_factory=dict)
    #: The (cut, codec) of the ``static-hindsight`` row, when ``policies`` has it.
    hindsight: tuple[int, str] | None = None


@dataclass(frozen=True)
class LiveStack:
    """What a live session runs against: the server and the edge's side, warmed up."""

    server: ServerProcess
    bundle: Bundle
    #: Real photos (normalised, one crop each) and the uncompressed model's top-1 for each.
    images: torch.Tensor
    reference: list[int]

    def session(self, **settings: Any) -> Session:
        """A :class:`Session` against this stack (``settings``: the other Session fields)."""
        return Session(
            url=self.server.url, bundle=self.bundle, images=self.images, reference=self.reference, **settings
        )


@contextlib.contextmanager
def live_stack(
    repo: Path, model: str, image_size: int, *, meanwhile: Callable[[Bundle], None] | None = None
) -> Iterator[LiveStack]:
    """``splitinfer serve`` of ``repo`` (one compute thread, in a session of its own so that a
    Ctrl-C reaches only this process, which stops it) and the edge's bundle ``model``, 16 real
    photos and their reference classes, every head and every tail warmed up. ``meanwhile``
    runs with the bundle while the server starts (choices that take a while to compute)."""
    from splitinfer.lab._images import photo_batch

    options = ("--compute-threads", "1", "--torch-threads", "1", "--drain-timeout-s", "2")
    server = ServerProcess(repo, *options, new_session=True, stop_timeout_s=5.0, keep_lines=50)
    with contextlib.ExitStack() as stack:
        server.launch()  # it starts while the edge gets ready
        stack.callback(server.stop)
        bundle = Bundle.load(repo / model)
        if meanwhile is not None:
            meanwhile(bundle)
        images = photo_batch(16, size=image_size, seed=2)
        reference = reference_classes(bundle, images)
        warm_up(bundle, images[:1])
        server.wait_ready()
        asyncio.run(warm_up_server(server.url, bundle, images[:1]))
        yield LiveStack(server, bundle, images, reference)


def run_priced(session: Session) -> tuple[list[Any], float]:
    """:func:`run_session`, every request then priced in hindsight (``_report.price``): the
    records and the device slowdown the run really had."""
    from splitinfer.lab._report import price

    records = asyncio.run(run_session(session))
    return price(
        records,
        session.bundle,
        session.trace,
        device_slowdown=session.device_slowdown,
        rtt_s=2 * session.delay_s,
        budget=session.budget,
    )


def reference_classes(bundle: Bundle, images: torch.Tensor) -> list[int]:
    """Top-1 of the uncompressed model (the whole segment chain, exact) for each image."""
    with torch.inference_mode():
        out = bundle.run_segments(0, bundle.n_segments, bundle.flatten_inputs((images,)))
    return [int(i) for i in out[0].argmax(dim=-1)]


def warm_up(bundle: Bundle, image: torch.Tensor) -> None:
    """Build every head runner once, so no request pays for it (the server warms its own)."""
    for k in range(bundle.last_cut + 1):
        bundle.head(k, image)


async def warm_up_server(url: str, bundle: Bundle, image: torch.Tensor) -> None:
    """One request per cut straight to the server (no emulator): its tails are built before timing."""
    from splitinfer.edge import EdgeClient

    for k in range(bundle.last_cut):
        async with EdgeClient(url, bundle=bundle, policy="static", cut=k, codec="f32", deadline_s=60) as c:
            await c.ainfer(image)


async def run_session(session: Session) -> list[Any]:
    """Every policy side by side over the same stretch; one :class:`Record` per request."""
    from splitinfer._progress import Progress
    from splitinfer.edge import EdgeClient
    from splitinfer.lab._report import Record
    from splitinfer.netem import LinkEmulator

    host, port = session.url.removeprefix("http://").rsplit(":", 1)
    s = session
    emulators = [LinkEmulator((host, int(port)), uplink=s.trace, delay_s=s.delay_s) for _ in s.policies]
    clients: list[EdgeClient] = []
    drivers: list[asyncio.Future[None]] = []
    records: list[Record] = []
    try:
        for em in emulators:
            await em.start()
        for name, em in zip(s.policies, emulators):
            options: dict[str, Any] = {}
            if name in ("static", HINDSIGHT):
                choice = s.static if name == "static" else s.hindsight
                if choice is None:
                    raise ConfigError(
                        f"policy {HINDSIGHT!r} needs Session.hindsight, the (cut, codec) it runs"
                    )
                options = {"cut": choice[0], "codec": choice[1]}
            elif name == "adaptive":
                options = {"seed": s.seed}
            clients.append(
                EdgeClient(
                    f"http://127.0.0.1:{em.port}",
                    bundle=s.bundle,
                    policy="static" if name == HINDSIGHT else name,
                    device_slowdown=s.device_slowdown,
                    fidelity_budget=s.budget,
                    deadline_s=s.deadline_s,
                    # The product hedges (EdgeClient's default); the classic baselines do not.
                    hedge=name == "adaptive",
                    # Device time from the profile x the slowdown, not host time x the slowdown:
                    # the policies share this host, and its contention is not the device's.
                    emulate="profile",
                    **options,
                )
            )
        for client in clients:  # one at a time: the device speed measured without contention
            await client.awarm_up(s.images[:1])
        for em in emulators:
            em.rewind()
        t0 = time.monotonic()  # the trace's clock: every emulator is at its time 0 now
        s.counts = dict.fromkeys(s.policies, 0)
        drivers = [
            asyncio.ensure_future(_drive(name, client, t0, s, records))
            for name, client in zip(s.policies, clients)
        ]
        with Progress(round(s.duration_s), s.label, enabled=s.progress) as bar:
            while not all(d.done() for d in drivers):
                await asyncio.wait(drivers, timeout=0.5)
                elapsed = min(round(time.monotonic() - t0), bar.total)
                note = " ".join(f"{n[0]}{c}" for n, c in s.counts.items())
                bar.step(elapsed - bar.done, note)
        for d in drivers:
            d.result()  # raise what a driver raised
    finally:
        await stop_all(drivers, clients, emulators)
    return records


async def stop_all(
    tasks: Sequence[asyncio.Future[Any]], clients: Sequence[Any], emulators: Sequence[Any]
) -> None:
    """Stop a live run: its tasks, then its clients, then its link emulators."""
    # Cancel until every task is done: a cancellation that lands as an HTTP timeout fires is
    # turned into a timeout (and a fallback) on Python 3.11, and the task would go on sending
    # until the end of the run (a Ctrl-C that seemed ignored).
    while not all(t.done() for t in tasks):
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.aclose()
    # Cut the connections and let their handlers end before stopping the emulators: stop()
    # cancels live handlers, which Python 3.11's asyncio streams log as errors.
    for em in emulators:
        em.disconnect_all()
    if clients:
        await asyncio.sleep(0.2)
    for em in emulators:
        await em.stop()


async def _drive(name: str, client: Any, t0: float, s: Session, records: list[Any]) -> None:
    from splitinfer.lab._report import Record

    i = 0
    next_at = t0
    while True:
        now = time.monotonic()
        if now - t0 >= s.duration_s:
            return
        if now < next_at:
            await asyncio.sleep(next_at - now)
        t = time.monotonic() - t0
        j = i % len(s.reference)
        uplink = client.estimator.estimates().uplink_bps
        uplink_mean = client.estimator.uplink.value(math.nan)
        out = await client.ainfer(s.images[j : j + 1])
        trace = client.last_trace
        records.append(
            Record(
                policy=name,
                t=t,
                latency_s=trace.stages["total"],
                cut=trace.cut,
                codec=trace.codec,
                bytes_up=trace.bytes_up,
                bytes_down=trace.bytes_down,
                fallback=trace.fallback or "",
                agree=int(out.argmax()) == s.reference[j],
                predicted_s=sum(v for k, v in trace.predicted.items() if k != "hedge_after")
                if trace.predicted
                else math.nan,
                uplink_est_bps=uplink,
                uplink_mean_bps=uplink_mean,
            )
        )
        s.counts[name] += 1
        i += 1
        next_at = t0 + t + s.interval_s
