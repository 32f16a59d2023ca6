"""Several task models answered from one upload (``EdgeClient(..., tasks=[...]).infer_many``).

Models fine-tuned from one backbone compute the same head up to some cut ``s``: their segments
``0..s-1`` are equal (same graphs, weights and constants) and so are their frontiers there. A
client holding such models (its own bundle, then the tasks) computes the head once, sends its
frontier once, and the cloud runs every model's tail from it (the ``tasks`` of the wire's
request header, splitinfer/protocol.py); the answer carries every model's outputs.

The decision is priced for it (:func:`task_policy`): the client's own policy, over the cuts up to
``s`` (and all-on-device), with one upload, the head's shared part computed once on the cloud
(the server batches it once: cloud/_compute.py) and each model's own tail and answer added, and
on the device the head once plus every model's own rest. A lossy codec is a candidate only where
it meets the budget for every model. When the cloud cannot serve, every model's answer is
computed on the device from the frontier already computed.

Torch-free at import: segments are compared (:func:`shared_cut`) with torch only where they were
loaded on torch; on ONNX Runtime the models share cut 0 (the input) only.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from splitinfer import _pytree, protocol
from splitinfer.bundle import Bundle
from splitinfer.compression import get_codec
from splitinfer.edge._config import ClientConfig
from splitinfer.errors import (
    AuthError,
    CloudError,
    CloudUnavailableError,
    CodecError,
    ConfigError,
    ProtocolError,
)
from splitinfer.partitioner import Decision, Estimates, Policy, hedge_after
from splitinfer.partitioner._costs import CostModel, is_lossless
from splitinfer.partitioner._policy import TablePolicy
from splitinfer.tensors import specs_of

if TYPE_CHECKING:
    from splitinfer.edge._client import EdgeClient, Trace
    from splitinfer.edge._transport import TransportResponse

__all__ = ["TaskSet", "ainfer_many", "make_tasks", "shared_cut", "task_policy"]

log = logging.getLogger("splitinfer.edge")

Flat = list[tuple[Any, ...]]


@dataclass(eq=False)
class TaskSet:
    """The models one upload answers: the client's bundle first, then its tasks."""

    bundles: tuple[Bundle, ...]
    #: Every model computes the same head up to this cut (segments ``0..shared_cut-1``).
    shared_cut: int
    #: The client's policy, priced for one upload and every model's tail (:func:`task_policy`).
    policy: TablePolicy
    #: Whether the device holds every model whole (it can answer them all when the cloud cannot).
    can_finish_locally: bool
    #: False once the cloud answered that it cannot serve them together: requests stay local.
    supported: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bundles)

    def run_from(self, k: int, frontier: Sequence[Any]) -> Flat:
        """Every model's outputs (flat) from the first model's frontier at cut ``k`` (at most
        ``shared_cut``): the shared part of the head once, then each model's own segments."""
        first, s = self.bundles[0], self.shared_cut
        shared = first.run_segments(k, s, frontier)
        return [b.run_segments(s, b.n_segments, shared) for b in self.bundles]

    def run_all(self, inputs: Sequence[Any]) -> Flat:
        """Every model's outputs (flat) for the model inputs, all on the device."""
        return self.run_from(0, self.bundles[0].flatten_inputs(inputs))


def make_tasks(
    bundle: Bundle,
    tasks: Sequence[str | os.PathLike[str] | Bundle],
    policy: Policy,
    config: ClientConfig,
    load: Callable[[str | os.PathLike[str] | Bundle], Bundle],
) -> TaskSet:
    """The task set of a client holding ``bundle`` with ``policy``; ConfigError if the tasks
    cannot share its uploads (other inputs, a repeated name, a custom policy)."""
    bundles = (bundle, *(load(t) for t in tasks))
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks must be models other than the client's and each other's, got {names}")
    s = shared_cut(bundles)
    if s > 0:
        log.info("models %s share their head up to cut %d (%s)", ", ".join(names), s, bundle.cuts[s].name)
    can_finish = all(b.can_head(b.last_cut) for b in bundles)
    return TaskSet(bundles, s, task_policy(policy, bundles, s, config), can_finish)


def shared_cut(bundles: Sequence[Bundle]) -> int:
    """The deepest cut up to which every bundle computes what the first one does: equal
    segments (the same object, or equal graphs and tensors) and equal frontiers. ConfigError if
    they do not take the same inputs (then not even cut 0 is shared)."""
    first = bundles[0]
    for b in bundles[1:]:
        if b.inputs != first.inputs or b.in_spec != first.in_spec:
            raise ConfigError(
                f"model {b.name!r} takes {', '.join(map(str, b.inputs))} and model {first.name!r} takes "
                f"{', '.join(map(str, first.inputs))}: tasks answered from one upload take the same inputs"
            )
    digests: dict[int, str | None] = {}
    top = min(b.last_cut for b in bundles)
    k = 0
    while k < top and all(
        b.cuts[k + 1].tensors == first.cuts[k + 1].tensors and _same_segment(first, b, k, digests)
        for b in bundles[1:]
    ):
        k += 1
    return k


def _same_segment(a: Bundle, b: Bundle, i: int, digests: dict[int, str | None]) -> bool:
    sa, sb = a.segments[i], b.segments[i]
    if sa is None or sb is None:
        return False
    if sa is sb:
        return True
    for seg in (sa, sb):
        if id(seg) not in digests:
            digests[id(seg)] = segment_digest(seg)
    return digests[id(sa)] is not None and digests[id(sa)] == digests[id(sb)]


def segment_digest(segment: object) -> str | None:
    """A digest of a loaded torch segment's code and every tensor it reads (None for anything
    else): two segments with equal digests compute the same function."""
    import torch

    if not isinstance(segment, torch.fx.GraphModule):
        return None
    h = hashlib.sha256(segment.code.encode())
    for node in segment.graph.nodes:
        if node.op != "get_attr":
            continue
        value: Any = segment
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            return None
        t = value.detach().cpu().contiguous()
        h.update(f"{node.target}:{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# -- pricing -------------------------------------------------------------------------------


def task_policy(policy: Policy, bundles: Sequence[Bundle], s: int, config: ClientConfig) -> TablePolicy:
    """``policy`` (one of make_policy's) over the candidates of one upload for every model.

    Rows are the first model's (cut, codec) candidates; a row is allowed if ``policy`` allows
    it, its cut is at most ``s`` (or it is all-on-device), and a lossy codec meets the budget
    for every model. Its costs: the first model's head and encode on the device, one upload,
    on the cloud its tail plus every other model's own tail from ``s``, every model's answer;
    on the device (all local, or finishing a hedged request) the first model's rest plus every
    other model's segments from ``s``.
    """
    if not isinstance(policy, TablePolicy):
        raise ConfigError(
            "tasks are priced with one of make_policy's policies (adaptive, static, local, cloud, "
            f"neurosurgeon); this client's policy is a {type(policy).__name__}"
        )
    first = policy.model
    cloud_batch = int(config.policy_options.get("cloud_batch", 1))  # type: ignore[call-overload]
    others = []
    for b in bundles[1:]:
        profile = first.profile_name if first.profile_name in b.profiles else None
        other = CostModel(b, profile=profile, cloud_batch=cloud_batch)
        if first.profiled and not other.profiled:
            raise ConfigError(
                f"task {b.name!r} has no profile, so its tail cannot be priced: profile it "
                "(`splitinfer profile BUNDLE`) like the client's bundle"
            )
        others.append(other)
    model = _priced(first, others, s)
    budget = config.fidelity_budget if policy.name in ("adaptive", "cloud") else 0.0
    floor = config.policy_options.get("privacy_floor")
    excluded = model.exclusions(budget, floor if isinstance(floor, int) else None)
    chosen = np.zeros(len(model), dtype=bool)
    chosen[policy.rows] = True
    for i in range(len(model)):
        if excluded[i]:
            continue
        if model.sent[i] and model.cut[i] > s:
            excluded[i] = f"the tasks' heads differ here (shared up to cut {s})"
        elif not chosen[i]:
            excluded[i] = f"not a {policy.name} candidate"
    allowed = np.array([not r for r in excluded])
    seed = config.policy_options.get("seed")
    return TablePolicy(
        policy.name,
        model,
        allowed,
        excluded,
        energy_weight=policy.energy_weight,
        energy=policy.energy,
        explore=policy.explore,
        explore_margin=policy.explore_margin,
        seed=seed if isinstance(seed, int) else None,
        settings=f"{policy.settings}; {len(bundles)} models from one upload, heads shared up to cut {s}",
        objective=policy.objective,
        hedged=policy.hedged,
    )


def _priced(first: CostModel, others: list[CostModel], s: int) -> CostModel:
    """A copy of ``first`` whose rows price one upload answered by every model (see task_policy)."""
    model = copy.copy(first)
    shared = (model.cut <= s) & (model.sent > 0)
    extra_tail = sum(_tail_at(m, s) for m in others)
    extra_local = sum(_head_at(m, m.n) - _head_at(m, s) for m in others)
    tail = np.where(shared, first.tail + extra_tail, first.tail)
    head = first.head.copy()
    head[model.local] += extra_local
    fidelity = first.fidelity.copy()
    for i in np.flatnonzero(shared):
        k, spec = int(model.cut[i]), model.codec(int(i))
        if not is_lossless(spec):
            fidelity[i] = min([float(first.fidelity[i]), *(_fidelity_at(m, k, spec) for m in others)])
    model.tail, model.head, model.fidelity = _frozen(tail), _frozen(head), _frozen(fidelity)
    model.response_bytes = first.response_bytes + sum(m.response_bytes for m in others)
    sent = model.sent
    model.features = _frozen(
        np.column_stack(
            [
                model.head + model.encode,
                model.decode + model.tail,
                np.nan_to_num(model.bytes) * 8.0,
                sent,
                sent * model.response_bytes * 8.0,
            ]
        )
    )
    return model


def _head_at(m: CostModel, k: int) -> float:
    return float(m.head[int(np.flatnonzero(m.cut == k)[0])])


def _tail_at(m: CostModel, k: int) -> float:
    rows = np.flatnonzero((m.cut == k) & (m.sent > 0))
    return float(m.tail[int(rows[0])]) if rows.size else 0.0


def _fidelity_at(m: CostModel, k: int, spec: str) -> float:
    if spec not in m.codecs:
        return math.nan
    rows = np.flatnonzero((m.cut == k) & (m.codec_index == m.codecs.index(spec)))
    return float(m.fidelity[int(rows[0])]) if rows.size else math.nan


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# -- the request ---------------------------------------------------------------------------


async def ainfer_many(client: EdgeClient, inputs: tuple[Any, ...]) -> tuple[dict[str, Any], Trace]:
    """Every model's outputs for ``inputs`` (by model name), and the request's trace."""
    from splitinfer.edge._client import Trace

    client._check_open()
    tasks = client.tasks
    if tasks is None:
        raise ConfigError(
            "this client has no tasks: make it with EdgeClient(url, bundle=..., tasks=[other bundles]) "
            "to answer several models from one upload"
        )
    started = time.perf_counter()
    first = client.bundle
    last = first.last_cut
    est = client.estimator.estimates()
    decision, local_reason = client._decide(est, tasks.policy)
    if decision.cut != last and not local_reason and not tasks.supported and tasks.can_finish_locally:
        local_reason = "tasks_refused"
    k = last if local_reason else decision.cut
    client._maybe_probe(sending=k != last)
    stages: dict[str, float] = {}
    trace = Trace(
        uuid.uuid4().hex, decision.cut, decision.codec, 0, 0, dict(decision.stages), stages, local_reason
    )
    if k == last:
        model = tasks.policy.model
        profiled = float(model.head[model.local])
        flat, stages["head"] = await client._emulated(
            tasks.run_all, inputs, profiled_s=profiled if math.isfinite(profiled) else None
        )
    else:
        frontier, stages["head"] = await client._emulated(
            first.head, k, *inputs, profiled_s=client._profiled_head(k, inputs)
        )
        try:
            flat, trace = await _remote(client, tasks, decision, est, frontier, trace, started)
        except AuthError:
            raise
        except (CloudError, ProtocolError, CodecError) as exc:
            flat, trace = await _fall_back(client, tasks, decision, est, frontier, trace, exc)
    stages["total"] = time.perf_counter() - started
    client._record(trace, decision)
    outputs = {b.name: _pytree.unflatten(list(out), b.out_spec) for b, out in zip(tasks.bundles, flat)}
    return outputs, trace


async def _remote(
    client: EdgeClient,
    tasks: TaskSet,
    decision: Decision,
    est: Estimates,
    frontier: tuple[Any, ...],
    trace: Trace,
    started: float,
) -> tuple[Flat, Trace]:
    """One request carrying the frontier for every model; their outputs from its answer."""
    first = client.bundle
    payload, remaining = await client._encode(decision, est, frontier, trace, started)
    header = protocol.RequestHeader(
        model=first.name,
        graph=first.graph_hash,
        cut=decision.cut,
        codec=decision.codec,
        tensors=specs_of(frontier),
        request_id=trace.request_id,
        payload_nbytes=len(payload),
        deadline_s=remaining,
        tasks=tuple((b.name, b.graph_hash) for b in tasks.bundles[1:]),
    )
    body = protocol.encode_request(header, payload)
    send = asyncio.ensure_future(
        client._post_measured(
            f"/v1/models/{first.name}/infer",
            body,
            {"Content-Type": protocol.FRAME_CONTENT_TYPE},
            remaining,
            # no cut: the answer's compute is several models' tails, which would read as a slow
            # cloud against the first model's profiled tail (the queue is still learned)
            cut=None,
            answer_bytes=tasks.policy.model.response_bytes,
        )
    )
    if client.config.hedge and tasks.can_finish_locally:
        hedge_s = hedge_after(decision, est)
        if math.isfinite(hedge_s):
            trace.predicted["hedge_after"] = hedge_s
            hedged = await _hedge(client, tasks, send, hedge_s, decision, est, frontier, trace)
            if hedged is not None:
                return hedged
    resp = await send
    trace.stages["network"] = resp.ended - resp.started
    if resp.status != 200:
        exc = protocol.error_from_problem(resp.status, resp.body, resp.headers.get("Retry-After"))
        client._refused(resp.status, "request", exc)
        raise exc
    flat = _read_answer(tasks, resp, frontier, trace)
    client.breaker.success()
    return flat, replace(
        trace, bytes_up=len(body), bytes_down=len(resp.body), retried=resp.retried, ran_on="cloud"
    )


def _read_answer(tasks: TaskSet, resp: TransportResponse, frontier: tuple[Any, ...], trace: Trace) -> Flat:
    """Every model's outputs from the cloud's answer; its Server-Timing into the trace."""
    t0 = time.perf_counter()
    rheader, rpayload = protocol.decode_response(resp.body)
    if [name for name, _ in rheader.models] != list(tasks.names):
        if not rheader.models:  # a server from before tasks answered the first model alone
            tasks.supported = False
        raise ProtocolError(
            f"the cloud answered models {[n for n, _ in rheader.models] or 'without naming them'} to a "
            f"request for {list(tasks.names)}; it may predate requests for several models"
        )
    response_codec = get_codec(rheader.codec)
    numpy = bool(frontier) and all(type(t).__module__ == "numpy" for t in frontier)
    decode = response_codec.decode_numpy if numpy else response_codec.decode
    outputs = decode(rpayload, max_nbytes=sum(s.nbytes() for s in rheader.tensors))
    flat, at = [], 0
    for _, count in rheader.models:
        flat.append(tuple(outputs[at : at + count]))
        at += count
    trace.stages["response_decode"] = time.perf_counter() - t0
    cloud = protocol.parse_server_timing(resp.headers.get("Server-Timing"))
    trace.stages.update({f"cloud_{k}": v for k, v in cloud.items()})
    for ours, theirs in (("queue", "queue"), ("decode", "decode"), ("tail", "compute")):
        if theirs in cloud:
            trace.stages[ours] = cloud[theirs]
    own = cloud.get("total", sum(v for k, v in cloud.items() if k != "total"))
    trace.stages["link"] = max(0.0, trace.stages["network"] - own)
    return flat


def _local_finish(decision: Decision, est: Estimates) -> float | None:
    """The profiled seconds of finishing every model on the device from the decision's cut."""
    return decision.finish_s / est.device_slowdown if math.isfinite(decision.finish_s) else None


async def _hedge(
    client: EdgeClient,
    tasks: TaskSet,
    send: asyncio.Future[TransportResponse],
    hedge_s: float,
    decision: Decision,
    est: Estimates,
    frontier: tuple[Any, ...],
    trace: Trace,
) -> tuple[Flat, Trace] | None:
    """As EdgeClient._hedge, for every model: past ``hedge_s`` the device races the cloud."""
    done, _ = await asyncio.wait({send}, timeout=hedge_s)
    if done:
        return None
    t0 = time.perf_counter()
    local = asyncio.ensure_future(
        client._emulated(tasks.run_from, decision.cut, frontier, profiled_s=_local_finish(decision, est))
    )
    try:
        racing: set[asyncio.Future[Any]] = {send, local}
        done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        local.cancel()
        send.cancel()
        raise
    if send in done:
        local.cancel()
        return None
    flat, _ = local.result()
    trace.stages["local_tail"] = time.perf_counter() - t0
    client._ignored.add(send)
    send.add_done_callback(client._forget)
    return flat, replace(trace, fallback="hedge")


async def _fall_back(
    client: EdgeClient,
    tasks: TaskSet,
    decision: Decision,
    est: Estimates,
    frontier: tuple[Any, ...],
    trace: Trace,
    exc: Exception,
) -> tuple[Flat, Trace]:
    """Every model finished on the device from the frontier computed; raise if it cannot."""
    from splitinfer.edge._client import _reason

    reason = "tasks_refused" if getattr(exc, "code", None) == "head_not_shared" else _reason(exc)
    if reason == "tasks_refused":
        tasks.supported = False  # the cloud's models differ from ours: it will refuse again
    client._log_fallback(reason, exc)
    if reason not in ("graph_mismatch", "bad_request", "tasks_refused"):
        client.breaker.failure()
    if isinstance(exc, CloudUnavailableError) and exc.retry_after_s:
        client._cloud_back_at = max(client._cloud_back_at, time.monotonic() + min(exc.retry_after_s, 300.0))
    if not tasks.can_finish_locally:
        raise exc
    flat, trace.stages["local_tail"] = await client._emulated(
        tasks.run_from, decision.cut, frontier, profiled_s=_local_finish(decision, est)
    )
    return flat, replace(trace, fallback=reason)
