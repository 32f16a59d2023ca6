"""Helpers for the reliability suites (fuzz, faults, overload, soak); no tests here.

The suites run short by default (part of ``make test``). ``SPLITINFER_RELIABILITY=long`` makes
them run at full size, and ``SPLITINFER_RELIABILITY_REPORT=DIR`` makes each write its figures
to ``DIR/<name>.json``: ``benchmarks/bench_reliability.py`` runs them that way and turns the
reports into ``benchmarks/results/reliability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import torch

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.compression import get_codec
from splitinfer.lab import ServerProcess
from splitinfer.tensors import specs_of

LONG = os.environ.get("SPLITINFER_RELIABILITY", "").lower() == "long"
REPORT_DIR = os.environ.get("SPLITINFER_RELIABILITY_REPORT")


def scale(short: float, long: float) -> float:
    """``long`` when the suites run at full size, else ``short``."""
    return long if LONG else short


def report(name: str, figures: dict[str, object]) -> None:
    """Write ``figures`` to the report directory, if one is set (merging with what is there)."""
    if not REPORT_DIR:
        return
    path = Path(REPORT_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **figures}, indent=2, sort_keys=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process (default: this one) has used so far."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, field
    return int(match.group(1)) * 1024


class ServeProcess(ServerProcess):
    """The lab's real ``splitinfer serve`` subprocess, with its memory, killed (SIGKILL) on exit.

    ``port`` 0 picks a free one; pass a fixed port to restart a server where clients expect it.
    """

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def peak_rss(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def __exit__(self, *exc: object) -> None:
        self.kill()


def heavy_frame(bundle: Bundle, rows: int, seed: int = 0) -> tuple[torch.Tensor, bytes]:
    """An input of ``rows`` samples and its cut-0 frame: a request with a tail worth computing."""
    x = torch.rand(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    frontier = bundle.head(0, x)
    payload = get_codec("f32").encode(frontier)
    header = protocol.RequestHeader(
        model=bundle.name,
        graph=bundle.graph_hash,
        cut=0,
        codec="f32",
        tensors=specs_of(frontier),
        request_id="load",
        payload_nbytes=len(payload),
    )
    return x, protocol.encode_request(header, payload)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


# -- load ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of a load run: its status (0: no answer), seconds, Retry-After and body."""

    status: int
    seconds: float
    retry_after: str | None = None
    body: bytes = b""


@dataclass
class LoadRun:
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    #: Requests a client kept on the device because the server had asked it to back off.
    backed_off: int = 0

    def count(self, status: int) -> int:
        return sum(o.status == status for o in self.outcomes)

    def rate(self, status: int = 200) -> float:
        return self.count(status) / self.seconds

    def latencies(self, status: int = 200) -> list[float]:
        return [o.seconds for o in self.outcomes if o.status == status]

    def statuses(self) -> dict[int, int]:
        return dict(sorted(Counter(o.status for o in self.outcomes).items()))


async def _send(session: aiohttp.ClientSession, url: str, body: bytes) -> Outcome:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": protocol.FRAME_CONTENT_TYPE}) as r:
            answer = await r.read()
            return Outcome(r.status, time.perf_counter() - t0, r.headers.get("Retry-After"), answer)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Outcome(0, time.perf_counter() - t0)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> LoadRun:
    """``concurrency`` clients each sending the next request when the last is answered."""
    run = LoadRun(seconds)
    async with _session() as session:
        end = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                run.outcomes.append(await _send(session, url, body))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return run


async def open_loop(
    url: str, body: bytes, rate: float, seconds: float, *, clients: int = 1, honour_retry_after: bool = False
) -> LoadRun:
    """``clients`` clients sending ``rate`` requests per second in all, at fixed intervals,
    whether or not earlier ones were answered (offered load does not slow down with the server).

    With ``honour_retry_after`` a client told ``503 Retry-After: S`` sends nothing for S seconds
    (it would finish those requests on the device) and counts them as backed off.
    """
    run = LoadRun(seconds)
    period = clients / rate
    async with _session() as session:
        start = time.perf_counter()

        async def client(offset: float) -> None:
            quiet_until = [0.0]
            tasks: list[asyncio.Future[Outcome]] = []

            def note(task: asyncio.Future[Outcome]) -> None:
                outcome = task.result()
                if outcome.status == 503 and outcome.retry_after is not None:
                    quiet_until[0] = max(quiet_until[0], time.perf_counter() + float(outcome.retry_after))

            i = 0
            while (at := start + offset + i * period) < start + seconds:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                i += 1
                if honour_retry_after and time.perf_counter() < quiet_until[0]:
                    run.backed_off += 1
                    continue
                task = asyncio.ensure_future(_send(session, url, body))
                if honour_retry_after:
                    task.add_done_callback(note)
                tasks.append(task)
            run.outcomes.extend(await asyncio.gather(*tasks))

        await asyncio.gather(*(client(c * period / clients) for c in range(clients)))
    return run


async def paced_loop(url: str, body: bytes, rate: float, seconds: float, *, clients: int = 16) -> LoadRun:
    """``clients`` clients together sending ``rate`` requests per second at most: each sends its
    next request on its schedule, or as soon as its last one is answered if that is later (it
    does not catch up). A slower server slows them down instead of queueing a backlog."""
    run = LoadRun(seconds)
    period = clients / rate
    async with _session() as session:
        start = time.perf_counter()

        async def client(offset: float) -> None:
            at = start + offset
            while at < start + seconds:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                run.outcomes.append(await _send(session, url, body))
                at = max(at + period, time.perf_counter())

        await asyncio.gather(*(client(c * period / clients) for c in range(clients)))
    return run
