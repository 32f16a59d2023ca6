"""The edge's one request path: decide, run the head, encode, send (hedged), and read the
answer or finish on the device. It serves one model or several tasks (a :class:`Target`);
EdgeClient composes it from its parts (STYLE.md item 17)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.edge._breaker import CircuitBreaker
from splitinfer.edge._cloud_api import error_of, fallback_reason, link_stages, retry_after_s
from splitinfer.edge._device import Device, is_numpy
from splitinfer.edge._hedging import Hedger
from splitinfer.edge._link import Link, LinkProber
from splitinfer.edge._observe import Observer
from splitinfer.edge._targets import Flat, Target
from splitinfer.edge._trace import Trace, TraceBuilder
from splitinfer.edge._transport import TransportResponse
from splitinfer.errors import (
    AuthError,
    CloudError,
    CloudTimeoutError,
    CodecError,
    ConfigError,
    CutNotLoadedError,
    ProtocolError,
)
from splitinfer.partitioner import Decision, Estimates, Estimator, hedge_after
from splitinfer.tensors import specs_of

__all__ = ["Decider", "Pipeline"]


@dataclass
class Decider:
    """The decision for the next request, and why it stays on the device if it planned the
    cloud: over the deadline, the cloud asked to be left alone, or the breaker is open."""

    last_cut: int
    max_cut: int
    deadline_s: float | None
    breaker: CircuitBreaker
    link: Link

    def decide(self, target: Target, est: Estimates) -> tuple[Decision, str | None]:
        decision = target.policy.decide(est)
        if decision.cut > self.max_cut:
            raise ConfigError(f"policy chose cut {decision.cut}, beyond this client's max_cut {self.max_cut}")
        if decision.cut == self.last_cut:
            return decision, None
        shared = target.shared_cut
        if decision.cut > shared:
            raise ConfigError(
                f"policy {target.policy.name!r} chose cut {decision.cut}, beyond the cut its tasks share "
                f"({shared}): use one of make_policy's policies (they are priced for the tasks)"
            )
        local = target.can_finish_locally
        if not local:
            return decision, None
        if self.deadline_s is not None and decision.predicted_s > self.deadline_s:
            return decision, "deadline"
        if self.link.backing_off():
            return decision, "backoff"
        if not self.breaker.allow():
            return decision, "circuit_open"
        return decision, target.stay_local()


@dataclass
class Pipeline:
    """One request, start to end, for a :class:`Target` (see the module docstring)."""

    decider: Decider
    device: Device
    estimator: Estimator
    link: Link
    prober: LinkProber
    hedger: Hedger
    observer: Observer
    breaker: CircuitBreaker
    deadline_s: float | None
    hedge: bool

    async def run(self, target: Target, inputs: Sequence[Any]) -> tuple[Any, Trace]:
        """The target's result for ``inputs``, and the request's trace."""
        started = time.perf_counter()
        est = self.estimator.estimates()
        decision, local_reason = self.decider.decide(target, est)
        last = target.bundle.last_cut
        k = last if local_reason else decision.cut
        self.prober.maybe_probe(sending=k != last)
        trace = TraceBuilder(uuid.uuid4().hex, decision, local_reason)
        flat: Flat | None = None
        frontier: tuple[Any, ...] | None = None
        exit_cut = _exit_on_the_way(target, k)
        if exit_cut is not None:
            flat, frontier = await self._exit(target, exit_cut, k, inputs, trace)
        if flat is None and frontier is None and k == last:
            flat = await self._all_local(target, inputs, trace)
        elif flat is None:
            if frontier is None:
                frontier, trace.stages["head"] = await self.device.head(
                    target.bundle, k, inputs, target.profiled_head(k, inputs)
                )
            try:
                flat = await self._remote(target, decision, est, frontier, trace, started)
            except AuthError:
                raise
            except (CloudError, ProtocolError, CodecError) as exc:
                flat = await self._fall_back(target, decision, est, frontier, trace, exc)
        trace.stages["total"] = time.perf_counter() - started
        assert flat is not None
        done = trace.build()
        self.observer.record(done, decision, self.estimator.estimates)
        return target.result(flat), done

    async def _exit(
        self, target: Target, e: int, k: int, inputs: Sequence[Any], trace: TraceBuilder
    ) -> tuple[Flat | None, tuple[Any, ...] | None]:
        """The head to the early exit at cut ``e`` and the exit's head: its answer where it is
        confident for every row ((outputs, None)); otherwise the request goes on to cut ``k``:
        (None, the frontier at ``k``), or (outputs, None) finished on the device at the last cut."""
        bundle = target.bundle
        frontier, trace.stages["head"] = await self.device.head(
            bundle, e, inputs, target.profiled_head(e, inputs)
        )
        (logits, confident), trace.stages["exit"] = await self.device.run(bundle.run_exit, e, frontier)
        trace.exit_cut = e
        if all(confident):
            trace.exited = True
            return [logits], None
        rest = await self.device.run(bundle.run_segments, e, k, frontier)
        trace.stages["head"] += rest[1]
        if k == bundle.last_cut:
            return [rest[0]], None
        return None, rest[0]

    async def _all_local(self, target: Target, inputs: Sequence[Any], trace: TraceBuilder) -> Flat:
        """Every model on the device; one model's time is the device's head at the last cut."""
        bundle = target.bundle
        last, run = target.run_all()
        profiled = target.profiled_all(inputs)
        flat, trace.stages["head"] = await self.device.segments(
            run, 0, last, inputs, bundle.flatten_inputs, profiled
        )
        if not target.tasks:  # several models' time is not the head's (a request sent is observed at _encode)
            self.estimator.observe_head(last, trace.stages["head"])
        return flat

    async def _encode(
        self,
        bundle: Bundle,
        decision: Decision,
        est: Estimates,
        frontier: tuple[Any, ...],
        trace: TraceBuilder,
        started: float,
    ) -> tuple[bytes, float | None]:
        """The frontier encoded with the decision's codec (the device's work observed), and the
        seconds left of the deadline (None without one); CloudTimeoutError if none are left."""
        codec = bundle.codec_for(decision.cut, decision.codec)
        payload, trace.stages["encode"] = await self.device.run(
            codec.encode, list(frontier), profiled_s=decision.stages.get("encode", 0.0) / est.device_slowdown
        )
        # The device's work is the head and the encode (at cut 0, the encode alone): its profiled
        # time is the decision's prediction without the slowdowns that went into it (the head's
        # own, where the estimates correct it per cut). The head alone corrects its cut's price.
        factors, k = est.head_slowdown, decision.cut
        head_factor = factors[k] if len(factors) == bundle.last_cut + 1 else est.device_slowdown
        profiled = decision.stages.get("head", 0.0) / head_factor
        profiled += decision.stages.get("encode", 0.0) / est.device_slowdown
        self.estimator.observe_device(profiled, trace.stages["head"] + trace.stages["encode"])
        self.estimator.observe_head(k, trace.stages["head"], device=False)
        if self.deadline_s is None:
            return payload, None
        remaining = self.deadline_s - (time.perf_counter() - started)
        if remaining <= 0:
            raise CloudTimeoutError("the deadline passed before the request was sent", code="deadline")
        return payload, remaining

    async def _remote(
        self,
        target: Target,
        decision: Decision,
        est: Estimates,
        frontier: tuple[Any, ...],
        trace: TraceBuilder,
        started: float,
    ) -> Flat:
        """One request carrying the frontier; every model's outputs from its answer (or from
        the device, if a hedge won)."""
        bundle = target.bundle
        payload, remaining = await self._encode(bundle, decision, est, frontier, trace, started)
        body = _frame(target, decision, frontier, trace.request_id, payload, remaining)
        cut, answer_bytes = target.send_cut(decision), target.answer_bytes
        send = asyncio.ensure_future(
            self.link.send(body, remaining, model=bundle.name, cut=cut, answer_bytes=answer_bytes)
        )
        hedge_s = hedge_after(decision, est) if self.hedge and target.can_finish_locally else math.inf
        if math.isfinite(hedge_s):
            trace.predicted["hedge_after"] = hedge_s
            finish = lambda: self._finish(target, decision, est, frontier, trace)  # noqa: E731
            hedged = await self.hedger.race(send, hedge_s, finish)
            if hedged is not None:
                trace.fallback = "hedge"
                return hedged
        resp = await send
        trace.stages["network"] = resp.ended - resp.started
        if resp.status != 200:
            exc = error_of(resp)
            self.observer.refused(resp.status, "request", exc)
            raise exc
        flat = self._read(target, resp, frontier, trace)
        self.breaker.success()
        trace.bytes_up, trace.bytes_down, trace.retried, trace.ran_on = (
            len(body),
            len(resp.body),
            resp.retried,
            "cloud",
        )
        return flat

    def _read(
        self, target: Target, resp: TransportResponse, frontier: tuple[Any, ...], trace: TraceBuilder
    ) -> Flat:
        """Every model's outputs from a 200 answer (numpy for numpy frontiers); its stage times."""
        t0 = time.perf_counter()
        answer = self.link.api.read_answer(resp, numpy=is_numpy(frontier))
        flat = target.split(answer.outputs, answer.models)
        trace.stages["response_decode"] = time.perf_counter() - t0
        trace.stages.update(link_stages(answer.server_timing, trace.stages["network"]))
        return flat

    async def _finish(
        self,
        target: Target,
        decision: Decision,
        est: Estimates,
        frontier: tuple[Any, ...],
        trace: TraceBuilder,
    ) -> Flat:
        """Every model finished on the device from the frontier at the decision's cut."""
        profiled = target.profiled_finish(decision.cut, frontier, decision, est)
        flat, trace.stages["local_tail"] = await self.device.run(
            target.run_from, decision.cut, frontier, profiled_s=profiled
        )
        return flat

    async def _fall_back(
        self,
        target: Target,
        decision: Decision,
        est: Estimates,
        frontier: tuple[Any, ...],
        trace: TraceBuilder,
        exc: Exception,
    ) -> Flat:
        """Finish on the device from the frontier already computed; raise if it cannot."""
        reason = fallback_reason(exc)
        if reason == "tasks_refused":
            target.refused()
        self.observer.fallback(reason, exc)
        if reason not in ("graph_mismatch", "bad_request", "tasks_refused"):
            self.breaker.failure()
        back_off = retry_after_s(exc)
        if back_off is not None:
            self.link.back_off(back_off)
        if not target.can_finish_locally:
            raise exc
        try:
            flat = await self._finish(target, decision, est, frontier, trace)
        except CutNotLoadedError:
            raise exc from None
        trace.fallback = reason
        return flat


def _exit_on_the_way(target: Target, k: int) -> int | None:
    """The deepest early exit of a one-model target at or before cut ``k`` that this device
    loaded and that may answer (docs/learning.md), or None."""
    if getattr(target, "tasks", None):
        return None
    bundle = target.bundle
    cuts = [int(e["cut"]) for e in bundle.exits if int(e["cut"]) <= k and bundle.exit_at(int(e["cut"]))]
    return max(cuts) if cuts else None


def _frame(
    target: Target,
    decision: Decision,
    frontier: tuple[Any, ...],
    request_id: str,
    payload: bytes,
    remaining: float | None,
) -> bytes:
    """The request's body: the header (with the target's tasks) and the encoded frontier."""
    bundle = target.bundle
    header = protocol.RequestHeader(
        model=bundle.name,
        graph=bundle.graph_hash,
        cut=decision.cut,
        codec=decision.codec,
        tensors=specs_of(frontier),
        request_id=request_id,
        payload_nbytes=len(payload),
        deadline_s=remaining,
        tasks=target.tasks,
    )
    return protocol.encode_request(header, payload)
