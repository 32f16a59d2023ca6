"""Dynamic batching per (model, cut), on a bounded pool of compute threads.

Every (model, cut) pair gets a :class:`Batcher` (or, for models whose segments are shared,
every (cut, shared segment) pair: see below): a FIFO of jobs and one task that forms
batches. A batch is dispatched when it is full (``max_batch_size`` rows), when its oldest job
has waited ``max_queue_delay``, or as soon as it holds its share of the requests to be expected:
the recent peak of concurrent requests, less those computing, spread over the free compute
threads. So a lone client never waits for company, while C clients in a closed loop get batches
of about C / threads. Dispatching takes one of ``compute_threads`` slots; while
every slot is busy, jobs keep queueing and the next batch takes as many as fit. Jobs in a batch
share the cut and the non-batch shapes of their tensors; their codecs may differ, since frames
are decoded before they are concatenated.

A job whose deadline passes while it is queued is answered 504 at once and never computed.

With ``inline_below_s`` set, a batch whose predicted compute time (CPU time per row measured
so far, times its rows) is below it runs on the event loop instead: for a very light tail the
two thread handoffs cost more than the tail. The first batch of every (model, cut) goes to a
compute thread to be measured.

Models that share segments (fine-tuned from one backbone, loaded once: docs/server.md,
"Weights shared across models") share batchers too: a request whose tail begins with a shared
segment is queued by that segment's key and the cut, whatever its model, so requests of
several models batch together. The batch runs the segments they all share once, then splits
to each model's own (``run_batch(bundles=...)``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from splitinfer.bundle import Bundle
from splitinfer.cloud._compute import Answer, Frame, finish, run_batch
from splitinfer.cloud._problem import Problem

__all__ = ["Job", "Scheduler"]

log = logging.getLogger("splitinfer.cloud")

#: Seconds over which the peak of concurrent requests is remembered (see Batcher._expecting).
PEAK_WINDOW_S = 1.0

#: Called after each batch with (model, cut, rows in the batch, models in the batch): once per
#: model of a batch that mixed several.
BatchHook = Callable[[str, int, int, int], None]


@dataclass(eq=False)
class Job:
    """One admitted request, waiting in a batcher for its answer."""

    frame: Frame
    #: perf_counter time the job was queued, and by when it must start (None: no deadline).
    enqueued: float
    deadline: float | None
    future: asyncio.Future[Answer]
    #: Run this job in a batch of its own (at a cut whose tensors are not batch-leading).
    alone: bool = False
    #: The model it is for, in a batcher shared by several models (None: the batcher's own).
    bundle: Bundle | None = None
    #: Shapes of its tensors without the batch dim: jobs batch only with equal signatures
    #: (None: the job runs alone).
    signature: tuple[tuple[int | None, ...], ...] | None = field(init=False)
    timer: asyncio.TimerHandle | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        specs = self.frame.tensors
        self.signature = None if self.alone else tuple(tuple(s.shape[1:]) for s in specs)

    def fail(self, problem: Problem) -> None:
        if not self.future.done():
            self.future.set_exception(problem)


class Batcher:
    """The queue and batch-forming task of one (model, cut)."""

    def __init__(self, scheduler: Scheduler, bundle: Bundle, cut: int, *, shared: bool = False):
        self.scheduler = scheduler
        #: The model of its jobs; in a shared batcher, the first one's (jobs name their own).
        self.bundle = bundle
        self.cut = cut
        #: Whether its jobs may be of several models (each job's ``bundle`` says which).
        self.shared = shared
        self.queue: collections.deque[Job] = collections.deque()
        self.rows = 0
        #: Compute CPU seconds per row: follows cheaper batches at once, dearer ones slowly,
        #: since a busy machine inflates the measure (None until a batch was measured).
        self.cost_per_row: float | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.filling = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher {bundle.name}@{cut}")

    def submit(self, job: Job) -> None:
        if self.shared and job.bundle is not None:  # hold a version that is in use, not an old one
            self.bundle = job.bundle
        self.queue.append(job)
        self.rows += job.frame.rows
        self.scheduler.queued += 1
        if job.deadline is not None:
            loop = asyncio.get_running_loop()
            delay = job.deadline - time.perf_counter()
            job.timer = loop.call_at(loop.time() + max(0.0, delay), self._expire, job)
        self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _remove(self, job: Job) -> None:
        self.queue.remove(job)
        self.rows -= job.frame.rows
        self.scheduler.queued -= 1
        if job.timer is not None:
            job.timer.cancel()

    def _expire(self, job: Job) -> None:
        if job in self.queue:
            self._remove(job)
            job.fail(
                Problem("deadline_exceeded", "the request's deadline passed while it waited in the queue")
            )

    def withdraw(self, job: Job) -> None:
        """Forget a job whose client went away, if it has not started."""
        if job in self.queue:
            self._remove(job)

    async def _sleep(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        handle = None if timeout is None else loop.call_later(timeout, self.wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def _fill(self) -> None:
        """Wait while the batch is short, its oldest job fresh, and more jobs are to be expected."""
        sched = self.scheduler
        until = self.queue[0].enqueued + sched.max_delay_s
        self.filling = True
        try:
            while self.queue and self.rows < sched.max_batch_size and self._expecting():
                remaining = until - time.perf_counter()
                if remaining <= 0:
                    break
                await self._sleep(remaining)
        finally:
            self.filling = False

    def _expecting(self) -> bool:
        """Whether this batch is short of its share of the requests to be expected: the recent
        peak of concurrent requests, less those computing, spread over the free compute threads
        (so that on a CPU every thread gets a batch rather than one thread a big one)."""
        sched = self.scheduler
        free = max(1, sched.threads - len(sched.running))
        return self.rows * free < sched.recent_peak() - sched.computing

    def _take(self, *, share: bool = True) -> list[Job]:
        """The next batch: the oldest job and the following ones that fit it.

        With ``share``, a batch takes at most its share of the queued rows over the free compute
        threads, so that C requests arriving together become one batch per thread rather than one
        big batch while the other threads idle (in a closed loop they would stay in lockstep on
        one core: measured at the mid cut, 0.97 cores of 2 used at C = 8)."""
        sched = self.scheduler
        limit = sched.max_batch_size
        if share:
            free = max(1, sched.threads - len(sched.running))
            limit = min(limit, max(1, -(-self.rows // free)))
        now = time.perf_counter()
        for job in [j for j in self.queue if j.deadline is not None and j.deadline <= now]:
            self._expire(job)
        if not self.queue:
            return []
        head = self.queue[0]
        batch: list[Job] = []
        rows = 0
        for job in self.queue:
            if rows >= limit or (batch and head.signature is None):
                break
            if batch and (job.signature != head.signature or rows + job.frame.rows > limit):
                continue
            batch.append(job)
            rows += job.frame.rows
        if head.signature is not None:  # one frontier for several models: its jobs go together
            frames = {id(job.frame) for job in batch}
            taken = set(map(id, batch))
            batch += [j for j in self.queue if id(j.frame) in frames and id(j) not in taken]
        for job in batch:
            self._remove(job)
        return batch

    async def _run(self) -> None:
        sched = self.scheduler
        while True:
            if not self.queue:
                await self._sleep(None)
                continue
            if sched.max_batch_size > 1:
                await self._fill()
            if self._light():
                self._run_inline(self._take(share=False))
                await asyncio.sleep(0)  # let the loop serve others between inline batches
                continue
            await sched.slots.acquire()
            batch = self._take() if self.queue else []
            if not batch:  # every job expired or was withdrawn meanwhile
                sched.slots.release()
                continue
            sched.computing += len(batch)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            sched.running.add(task)
            task.add_done_callback(sched.running.discard)

    def _light(self) -> bool:
        """Whether the next batch is cheaper to compute here than to hand to a thread."""
        limit = self.scheduler.inline_below_s
        if limit <= 0 or self.cost_per_row is None or not self.queue:
            return False
        if any(job.frame.frontier is None for job in self.queue):  # large frames decode on a thread
            return False
        return self.cost_per_row * min(self.rows, self.scheduler.max_batch_size) <= limit

    def _run_inline(self, batch: list[Job]) -> None:
        if not batch:
            return
        dispatched = time.perf_counter()
        try:
            results = run_batch(
                self.bundle,
                self.cut,
                [job.frame for job in batch],
                dispatched,
                self.scheduler.device,
                self._owners(batch),
            )
        except Exception:  # run_batch answers per job; this is a bug
            log.exception("a batch of %s at cut %d failed", self.bundle.name, self.cut)
            results = [_internal()] * len(batch)
        self._deliver(batch, results, dispatched)

    async def _execute(self, batch: list[Job]) -> None:
        sched = self.scheduler
        dispatched = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                sched.pool,
                run_batch,
                self.bundle,
                self.cut,
                [job.frame for job in batch],
                dispatched,
                sched.device,
                self._owners(batch),
            )
        except Exception:  # run_batch answers per job; this is a broken pool or a bug
            log.exception("a batch of %s at cut %d failed", self.bundle.name, self.cut)
            results = [_internal()] * len(batch)
        finally:
            sched.slots.release()
            sched.computing -= len(batch)
        self._deliver(batch, results, dispatched)

    def _owners(self, batch: list[Job]) -> list[Bundle] | None:
        """Each job's model, for a batch of a shared batcher (None: all are this batcher's)."""
        return [job.bundle or self.bundle for job in batch] if self.shared else None

    def _deliver(self, batch: list[Job], results: list[Answer | Problem], dispatched: float) -> None:
        rows, cpu, models = 0, None, 1
        for job, result in zip(batch, results):
            if isinstance(result, Answer):
                rows, cpu = result.batch_rows, result.compute_cpu / max(1, result.batch_rows)
                models = max(models, result.batch_models)
                if job.frame.encoder is not None:
                    result = self._finish(job, result)
            if isinstance(result, Problem):
                job.fail(result)
                continue
            result.stages["queue"] += dispatched - job.enqueued
            if not job.future.done():
                job.future.set_result(result)
        if cpu is not None:  # follows a cheaper sample at once, a dearer one slowly (noise inflates)
            old = self.cost_per_row
            self.cost_per_row = cpu if old is None else min(cpu, 0.9 * old + 0.1 * cpu)
        if rows:
            names = dict.fromkeys((job.bundle or self.bundle).name for job in batch) if models > 1 else {}
            for name in names or [self.bundle.name]:
                self.scheduler.observe_batch(name, self.cut, rows, models)

    def _finish(self, job: Job, answer: Answer) -> Answer | Problem:
        try:
            finish(answer, job.frame)
        except Exception:
            log.exception("encoding the outputs of request %s failed", job.frame.request_id)
            return Problem("internal", "the server failed to encode the outputs; see its log")
        return answer


def _internal() -> Problem:
    return Problem("internal", "the server failed to compute this batch; see its log")


class Scheduler:
    """The compute pool, its slots, the batchers and the counters of admitted work.

    Counters (read by admission control, readiness and metrics):
    ``arriving``: admitted requests whose body is still being read or checked;
    ``queued``: jobs waiting in a batcher; ``computing``: jobs in a running batch.
    """

    def __init__(
        self,
        pool: Executor,
        *,
        compute_threads: int,
        max_batch_size: int,
        max_delay_s: float,
        device: torch.device,
        inline_below_s: float = 0.0,
        on_batch: BatchHook | None = None,
    ):
        self.pool = pool
        #: Where the tails run (the served bundles' segments were loaded there).
        self.device = device
        self.threads = compute_threads
        self.slots = asyncio.Semaphore(compute_threads)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.inline_below_s = inline_below_s
        self.on_batch = on_batch
        #: By (model, cut, tag of the served version: cloud._repository.Served.tag); a batcher
        #: shared by models is keyed ("", cut, key of the shared segment).
        self.batchers: dict[tuple[str, int, str], Batcher] = {}
        self.running: set[asyncio.Task[None]] = set()
        self.arriving = 0
        self.queued = 0
        self.computing = 0
        self._peak, self._peak_at = 0, 0.0

    @property
    def waiting(self) -> int:
        """Admitted requests not yet computing (what the queue bound limits)."""
        return self.arriving + self.queued

    def batcher(self, bundle: Bundle, cut: int, tag: str = "1", share: str | None = None) -> Batcher:
        """The batcher of ``bundle``'s version ``tag`` at ``cut``; with ``share`` (the key of the
        tail's first segment, when it is shared across models), the one every model whose tail
        from ``cut`` begins with that segment uses (its jobs must name their ``bundle``)."""
        key = (bundle.name, cut, tag) if share is None else ("", cut, share)
        batcher = self.batchers.get(key)
        if batcher is None:
            batcher = self.batchers[key] = Batcher(self, bundle, cut, shared=share is not None)
        return batcher

    def admit(self) -> None:
        """One request was admitted (its body is to be read); tracks the peak of concurrency."""
        self.arriving += 1
        active = self.arriving + self.queued + self.computing
        now = time.perf_counter()
        if active >= self._peak or now - self._peak_at > PEAK_WINDOW_S:
            self._peak, self._peak_at = active, now

    def recent_peak(self) -> int:
        """Most requests admitted at once lately (within about PEAK_WINDOW_S)."""
        return self._peak if time.perf_counter() - self._peak_at <= 2 * PEAK_WINDOW_S else 0

    def arrived(self) -> None:
        """One admitted request stopped arriving (it was queued or refused)."""
        self.arriving -= 1
        if self.arriving == 0:
            for batcher in self.batchers.values():
                if batcher.filling:
                    batcher.wake()

    def observe_batch(self, model: str, cut: int, rows: int, models: int = 1) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(model, cut, rows, models)
            except Exception:  # a metrics hook never fails a request
                log.exception("the batch hook failed")

    def forget(self, model: str, tag: str) -> None:
        """Stop the batchers of a released version (their queues are empty: nothing is in flight)."""
        for key, shared in [(k, b) for k, b in self.batchers.items() if b.shared]:
            if shared.bundle.name == model:  # it must not keep that version loaded
                if shared.queue:  # other models' requests: it goes on with one of theirs
                    shared.bundle = shared.queue[0].bundle or shared.bundle
                else:  # made again by the next request
                    del self.batchers[key]
                    shared.task.cancel()
        for key in [k for k in self.batchers if k[0] == model and k[2] == tag]:
            batcher = self.batchers.pop(key)
            batcher.task.cancel()
            while batcher.queue:  # never: a version is released after its last request
                job = batcher.queue[0]
                batcher._remove(job)
                job.fail(Problem.unavailable("not_ready", "this model version was unloaded; retry"))

    async def close(self) -> None:
        """Stop forming batches; answer queued jobs 503; wait for running batches."""
        for batcher in self.batchers.values():
            batcher.task.cancel()
            while batcher.queue:
                job = batcher.queue[0]
                batcher._remove(job)
                job.fail(Problem.unavailable("not_ready", "the server is shutting down; retry elsewhere"))
        await asyncio.gather(*(b.task for b in self.batchers.values()), return_exceptions=True)
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
