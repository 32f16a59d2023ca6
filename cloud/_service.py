"""The one inference service: the path every inference request takes, whatever its protocol.

KServe's ``protocol/dataplane.py`` is the model. The protocol adapters (``/v1`` in
:mod:`._handlers`, ``/v2`` in :mod:`._oip`) turn their wire into a :class:`Call` (how to read
the body and how to turn it into :class:`Work`) and the service's :class:`Result` back into
their wire. The service owns the rest, in this order::

    admit (drain, queue bound, body limit) -> hold the pinned version -> read -> parse
    -> deadline -> decode (small frames here, shared frontiers off the loop) -> schedule one job
    per model -> await (withdraw if the client leaves) -> encode -> stage times, metrics,
    Server-Timing

It knows no HTTP: errors are :class:`~._problem.Problem`, which each adapter answers in its own
form. Version pinning (by graph hash or by version) and the task models that share a request's
frontier are looked up here, so both protocols pin alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from splitinfer.cloud._batcher import Batcher, Job
from splitinfer.cloud._compute import SMALL_BYTES, Answer, Frame, decode_frame
from splitinfer.cloud._problem import Problem
from splitinfer.cloud._repository import Served

if TYPE_CHECKING:
    from splitinfer.cloud._state import ServerState

__all__ = ["Call", "InferenceService", "Reply", "Result", "Work", "batchable", "server_timing"]

log = logging.getLogger("splitinfer.cloud")

T = TypeVar("T")

#: The stages every answer reports, in Server-Timing's order (then ``receive`` and ``total``).
STAGES = ("queue", "decode", "compute", "encode")


@dataclass(frozen=True)
class Reply:
    """An adapter's encoded answer: the body, its media type and any headers of the protocol."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Work:
    """A parsed request in the service's terms: the frontier to compute and for which versions."""

    #: The version it is pinned to (its outputs come first).
    served: Served
    frame: Frame
    #: Turns the answers (one per model: ``served``, then ``tasks``) into the adapter's reply.
    respond: Callable[[Sequence[Answer]], Reply]
    #: Seconds the client grants the request from its arrival (None: no deadline).
    deadline_s: float | None = None
    #: Further models fed the same frontier (they share ``served``'s head up to the cut).
    tasks: tuple[Served, ...] = ()
    #: The codec label of the payload metrics.
    label: str = ""

    @property
    def targets(self) -> tuple[Served, ...]:
        return (self.served, *self.tasks)


@dataclass(frozen=True)
class Call:
    """One inference request as its adapter hands it over."""

    #: Reads the whole body (the adapter's wire: Content-Length, chunks, timeouts).
    read: Callable[[], Awaitable[bytes]]
    #: Turns the body into work (may use the service's lookups to pin a version).
    parse: Callable[[bytes], Awaitable[Work]]
    #: Bytes the body declares, if it does (refused before reading when over the limit).
    declared_bytes: int | None = None
    #: Refusals on the wire's metadata alone (media type, encoding), after admission.
    check: Callable[[], None] = lambda: None
    #: A version named before the body (by the URL), kept loaded from admission to the answer.
    hold: Served | None = None


@dataclass(frozen=True)
class Result:
    """What the service answers: the adapter's reply, the stage times and the Server-Timing."""

    reply: Reply
    stages: dict[str, float]
    timing: str


def server_timing(stages: Mapping[str, float]) -> str:
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in stages.items())


def batchable(bundle: Any, cut: int) -> bool:
    """Whether frontiers at ``cut`` and the outputs are batch-leading (dim 0 dynamic)."""
    specs = (*bundle.cuts[cut].tensors, *bundle.cuts[bundle.last_cut].tensors)
    return all(s.shape and s.shape[0] is None for s in specs)


def _nbytes(answers: Sequence[Answer]) -> int:
    return sum(o.numel() * o.element_size() for a in answers for o in a.outputs or [])


class InferenceService:
    """Admission, drain, version pinning, scheduling, deadlines, stage times and metrics."""

    def __init__(self, state: ServerState):
        self.state = state

    # -- lookups -------------------------------------------------------------------------

    def find(self, name: str, version: str | None = None) -> Served:
        """Version ``version`` of ``name`` (the newest when None); Problem 404 if not served."""
        repo = self.state.repository
        served = repo.get(name, version)
        if served is not None:
            return served
        if repo.latest(name) is None:
            raise Problem("unknown_model", f"no model {name!r} here; GET /v1/models lists them")
        have = ", ".join(s.version for s in repo.versions(name))
        raise Problem("unknown_model", f"model {name!r} has version(s) {have} here, not {version!r}")

    def pin(self, name: str, graph: str) -> Served:
        """The served version of ``name`` whose graph the request was made for (edge clients on
        an older bundle keep being served by the older version while it is loaded)."""
        repo = self.state.repository
        served = repo.by_graph(name, graph)
        if served is not None:
            return served
        versions = repo.versions(name)
        if not versions:
            raise Problem("unknown_model", f"no model {name!r} here; GET /v1/models lists them")
        hashes = ", ".join(f"{s.bundle.graph_hash} (version {s.version})" for s in versions)
        raise Problem(
            "graph_mismatch",
            f"model {name!r} here has graph {hashes}; the request was made for {graph}: load the "
            "same bundle on the edge and the cloud",
        )

    def tasks(self, served: Served, cut: int, tasks: Sequence[tuple[str, str]]) -> tuple[Served, ...]:
        """The served versions of a request's task models (name, graph), each checked to share
        ``served``'s head up to ``cut`` (then the frontier is theirs too)."""
        out = []
        for task, graph in tasks:
            try:
                target = self.pin(task, graph)
            except Problem as p:
                raise Problem(p.code, f"task {task!r} of this request: {p.detail}") from None
            if not served.shares_head(target, cut):
                raise Problem("head_not_shared", _not_shared(served, target, cut))
            out.append(target)
        return tuple(out)

    # -- admission -----------------------------------------------------------------------

    def admit(self, declared_bytes: int | None) -> None:
        """Refuse before reading a body: draining, a full queue, a declared body over the limit."""
        state = self.state
        if state.drain.draining:
            raise Problem.unavailable("not_ready", "the server is draining; retry on another replica")
        if state.scheduler.waiting >= state.config.max_queue_length:
            raise Problem.unavailable(
                "overloaded",
                f"the queue is full ({state.config.max_queue_length} requests waiting); retry after a moment",
            )
        limit = state.config.max_body_bytes
        if declared_bytes is not None and declared_bytes > limit:
            raise Problem("too_large", f"body of {declared_bytes} bytes exceeds the limit of {limit}")

    async def offload(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` here when ``size`` bytes are few, else on a compute thread."""
        if size <= SMALL_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.state.pool, fn, *args)

    # -- the request path ----------------------------------------------------------------

    async def infer(self, call: Call) -> Result:
        """Serve one request from admission to its answer; Problem for every refusal."""
        started = time.perf_counter()
        self.admit(call.declared_bytes)
        call.check()
        self.state.drain.enter()
        if call.hold is not None:
            self.state.repository.enter(call.hold)  # it stays loaded until this request is answered
        try:
            return await self._infer(call, started)
        finally:
            if call.hold is not None:
                self.state.repository.leave(call.hold)
            self.state.drain.leave()

    async def _infer(self, call: Call, started: float) -> Result:
        scheduler = self.state.scheduler
        scheduler.admit()
        try:
            body = await call.read()
            received = time.perf_counter()
            work = await self._parse(call, body)
            submitted = self._submit(work, started)
        finally:
            scheduler.arrived()
        answers = await self._await(submitted)
        stages, reply = await self._respond(work, answers)
        stages["receive"] = received - started
        # "total" is the server's own time, from the last body byte to the answer: the time the
        # body spent arriving is the client's uplink, which the edge estimates from this header.
        stages["total"] = time.perf_counter() - received
        self._observe(work, stages, len(body), len(reply.body))
        rows, models = max(a.batch_rows for a in answers), max(a.batch_models for a in answers)
        timing = f'{server_timing(stages)}, batch;desc="rows={rows} models={models}"'
        return Result(reply, stages, timing)

    async def _parse(self, call: Call, body: bytes) -> Work:
        """The adapter's work, its frontier decoded here when that is cheap or shared by tasks
        (a frontier that arrives decoded was decoded by the parse, which is timed as decode)."""
        t0 = time.perf_counter()
        work = await call.parse(body)
        frame = work.frame
        if frame.frontier is not None:
            return replace(work, frame=replace(frame, decode_s=time.perf_counter() - t0))
        if len(frame.payload) > SMALL_BYTES and not work.tasks:
            return work  # decoded in the compute thread, with its batch
        t0 = time.perf_counter()
        bundle = work.served.bundle
        frontier = await self.offload(len(frame.payload), decode_frame, frame, frame.payload, bundle)
        return replace(work, frame=replace(frame, frontier=frontier, decode_s=time.perf_counter() - t0))

    def _submit(self, work: Work, started: float) -> list[tuple[Served, Job, Batcher]]:
        """One job per target model, queued in its batcher; each target stays loaded until answered."""
        now = time.perf_counter()
        deadline = None if work.deadline_s is None else started + work.deadline_s
        if deadline is not None and now >= deadline:
            raise Problem("deadline_exceeded", "the request's deadline passed before it was queued")
        repo, cut = self.state.repository, work.frame.cut
        future_of = asyncio.get_running_loop().create_future
        submitted = []
        for target in work.targets:
            alone = not batchable(target.bundle, cut)
            job = Job(work.frame, now, deadline, future_of(), alone=alone, bundle=target.bundle)
            share = repo.batch_key(target, cut)
            batcher = self.state.scheduler.batcher(target.bundle, cut, target.tag, share)
            batcher.submit(job)
            repo.enter(target)
            submitted.append((target, job, batcher))
        return submitted

    async def _await(self, submitted: list[tuple[Served, Job, Batcher]]) -> list[Answer]:
        """Every job's answer; the first failure raised; jobs withdrawn if the client leaves."""
        try:
            answers = await asyncio.gather(*(job.future for _, job, _ in submitted), return_exceptions=True)
        except asyncio.CancelledError:
            for _, job, batcher in submitted:
                batcher.withdraw(job)
            raise
        finally:
            for target, _, _ in submitted:
                self.state.repository.leave(target)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [a for a in answers if isinstance(a, Answer)]

    async def _respond(self, work: Work, answers: list[Answer]) -> tuple[dict[str, float], Reply]:
        """The stage times (the slowest model's) and the adapter's reply; outputs still held as
        tensors are encoded now (off the loop when large), and that is the encode stage."""
        stages = {k: max(a.stages.get(k, 0.0) for a in answers) for k in STAGES}
        t0 = time.perf_counter()
        reply = await self.offload(_nbytes(answers), work.respond, answers)
        if any(a.body is None for a in answers):
            stages["encode"] = time.perf_counter() - t0
        return stages, reply

    def _observe(self, work: Work, stages: dict[str, float], received: int, sent: int) -> None:
        try:
            self.state.metrics.observe_success(
                work.served.name, work.frame.cut, work.label, stages, received, sent
            )
        except Exception:  # metrics never fail a request
            log.exception("observing a request failed")


def _not_shared(served: Served, target: Served, cut: int) -> str:
    top = min(served.bundle.last_cut, target.bundle.last_cut)
    shared = max((k for k in range(top + 1) if served.shares_head(target, k)), default=None)
    where = "nowhere (their inputs differ)" if shared is None else f"up to cut {shared}"
    return (
        f"models {served.name!r} and {target.name!r} here do not share their head up to cut {cut} "
        "(their segments before it differ, or this server cannot tell: ONNX Runtime); they share "
        f"it {where}: send one request per model, or an earlier cut"
    )
