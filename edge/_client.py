"""EdgeClient: decide, run the head, send the frontier, and never leave a request unanswered."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote

from prometheus_client import CollectorRegistry

from splitinfer import _pytree, protocol
from splitinfer.bundle import Bundle
from splitinfer.compression import get_codec
from splitinfer.edge._breaker import CircuitBreaker
from splitinfer.edge._config import ClientConfig
from splitinfer.edge._metrics import EdgeMetrics
from splitinfer.edge._multi import TaskSet, ainfer_many, make_tasks
from splitinfer.edge._transport import HttpTransport, Transport, TransportResponse, make_ssl_context
from splitinfer.errors import (
    AuthError,
    ClientClosedError,
    CloudError,
    CloudTimeoutError,
    CloudUnavailableError,
    CodecError,
    ConfigError,
    CutNotLoadedError,
    GraphMismatchError,
    ProtocolError,
    RemoteRequestError,
)
from splitinfer.partitioner import Decision, Estimates, Estimator, Policy, hedge_after, make_policy
from splitinfer.partitioner._profiles import chain_times
from splitinfer.tensors import specs_of

__all__ = ["EdgeClient", "Trace"]

T = TypeVar("T")
log = logging.getLogger("splitinfer.edge")

#: The server's endpoint for link probes (cloud/_handlers.py, ``link_probe``).
LINK_PROBE_PATH = "/v1/link-probe"
#: Seconds a link probe may take before it counts as failed.
PROBE_TIMEOUT_S = 10.0
#: Seconds the model metadata check (on entering, on warm-up) may take.
METADATA_TIMEOUT_S = 5.0
#: Seconds between two log lines about requests that fell back for the same reason.
FALLBACK_LOG_EVERY_S = 10.0
#: Answers that mean the client is misconfigured, not that the cloud is unwell: logged at
#: WARNING once per kind and counted (``EdgeClient.refusals``).
REFUSALS = {401: "unauthorized", 403: "forbidden", 404: "unknown_model", 409: "graph_mismatch"}


@dataclass(frozen=True)
class Trace:
    """What happened to one request (``client.ainfer(x, return_trace=True)`` returns it with the
    outputs; ``client.last_trace`` holds the latest, which concurrent requests overwrite).

    ``predicted`` holds the cost model's stages (``head``, ``encode``, ``rtt``, ``uplink``,
    ``queue``, ``decode``, ``tail``, ``downlink``; and ``hedge_after`` for a hedged request);
    ``stages`` the measured ones under the same keys where they can be measured: ``head`` and
    ``encode`` (on the device), ``queue``, ``decode`` and ``tail`` (on the cloud, from its
    ``Server-Timing``: queue, decode, compute), and ``link``, the wire's share (the request's time
    on the network less the cloud's own), which the link's three predicted stages add up to;
    :meth:`compared` pairs them. ``stages`` also holds ``network`` (request sent to answer read),
    ``response_decode`` (the answer's decode on the device), ``local_tail`` (a fallback's tail on
    the device), ``total`` and the raw ``Server-Timing`` stages, prefixed ``cloud_``. Seconds.
    """

    #: The request's id (also sent to the cloud).
    request_id: str
    #: The cut and codec the policy decided (the last cut and its codec: all on the device).
    cut: int
    codec: str
    #: Bytes of the request and of the answer on the wire (0, 0 when nothing was sent).
    bytes_up: int
    bytes_down: int
    #: Predicted seconds per stage, from the policy's cost model.
    predicted: dict[str, float] = field(default_factory=dict)
    #: Measured seconds per stage (see above).
    stages: dict[str, float] = field(default_factory=dict)
    #: Why the request finished on the device although the decision sent it to the cloud
    #: (``deadline``, ``backoff``, ``circuit_open`` before sending; ``timeout``, ``shed``,
    #: ``unreachable``, ``graph_mismatch``, ``bad_request``, ``cloud_error`` after trying;
    #: ``hedge``: its answer was overdue, see EdgeClient).
    fallback: str | None = None
    #: Whether the request was sent twice (a stale kept-alive connection).
    retried: bool = False
    #: Where the model's tail actually ran: ``"cloud"`` (from ``cut``, with ``codec``) or
    #: ``"device"`` (the decision was the last cut, or the request fell back).
    ran_on: str = "device"

    def compared(self) -> dict[str, tuple[float, float]]:
        """``{stage: (predicted, measured)}`` for every stage both hold (``link``: predicted
        as ``rtt + uplink + downlink``)."""
        predicted = dict(self.predicted)
        if "uplink" in predicted:
            predicted["link"] = sum(predicted.get(k, 0.0) for k in ("rtt", "uplink", "downlink"))
        keys = ("head", "encode", "link", "queue", "decode", "tail")
        return {k: (predicted[k], self.stages[k]) for k in keys if k in predicted and k in self.stages}


# How often the check on entering asks the server before a graph mismatch raises (see _check_server).
MISMATCH_ASKS = 8


class EdgeClient:
    """The edge SDK. Use it as a context manager, sync (``infer``) or async (``ainfer``).

    ``EdgeClient(url, bundle=..., policy=..., deadline_s=..., cut=..., ...)``: the keywords
    after ``bundle``, ``policy``, ``config``, ``registry``, ``transport`` and ``breaker`` are
    settings, collected in a :class:`ClientConfig` (``self.config``, checked when built):
    ``deadline_s``, ``device_slowdown``, ``fidelity_budget``, ``max_cut``, ``token``,
    ``ca_file``, ``client_cert``, ``client_key``, ``prior``, ``probe``, ``hedge``, ``runtime``
    (``auto``, ``onnxruntime`` or ``torch``: where the head and the fallback run); any other
    keyword is a policy option. ``config=ClientConfig(...)`` passes them whole (keywords then
    override it).

    ``policy`` is a name for :func:`splitinfer.partitioner.make_policy` (``adaptive``,
    ``static``, ``local``, ``cloud``, ``neurosurgeon``) or a Policy; policy options go to
    make_policy (``cut=``/``codec=`` for static, ``privacy_floor=``, ...). ``max_cut`` bounds
    the cuts the edge may choose and so the segments it loads; with ``max_cut`` below the last
    cut the device cannot finish a request alone, and a cloud failure raises instead of falling
    back. ``device_slowdown=N`` makes head and encode take N times their measured time: an
    emulation of a slower device for experiments on one machine.

    A cloud that sheds a request (503) with ``Retry-After: S`` is left alone for S seconds:
    requests meanwhile finish on the device (fallback reason ``backoff``), or, when the device
    cannot finish them, are still sent.

    Every request sent is registered with the estimator while it is in flight
    (``start_transfer``), so one hanging on a dead link lowers the uplink estimate before it
    ends. With ``probe`` (by default unless the policy is ``static`` or ``local``, which never
    look at the link), the client measures the link in the background when its estimates are
    stale, with requests to ``POST /v1/link-probe``: an empty one for the round trip when it has
    no recent sample (``Estimator.needs_rtt_probe``), and an upload of
    ``Estimator.probe_bytes()`` when the uplink estimate is stale (``Estimator.needs_probe``)
    and the request at hand stays on the device, so a client that keeps every request local
    notices when the link comes back. At most one probe runs at a time; none while the cloud
    asked to be left alone.

    Hedged requests (``hedge=True``, the default when the client holds the whole model): a sent
    request whose answer is not back ``hedge_after(decision, estimates)`` seconds after sending
    (the cloud's predicted time at its 95 % bound under the estimator's uncertainty) is finished
    on the device from the frontier it already computed, while the cloud request goes on; the
    first of the two answers is used. When the device wins, the trace's fallback is ``hedge``
    (and ``stages["local_tail"]``, ``predicted["hedge_after"]`` say when and how long); the
    cloud's late answer is ignored but still measures the link. ``deadline_s`` bounds both.

    ``tasks``: other models (bundles or their directories) that share this bundle's head up to
    some cut, fine-tuned from one backbone: :meth:`infer_many` computes the head once, sends one
    frontier and returns every model's outputs, with decisions priced for one upload and every
    tail (edge/_multi.py; docs/server.md, "One upload, several tasks").
    """

    def __init__(
        self,
        url: str,
        *,
        bundle: str | os.PathLike[str] | Bundle,
        policy: str | Policy = "adaptive",
        config: ClientConfig | None = None,
        registry: CollectorRegistry | None = None,
        transport: Transport | None = None,
        breaker: CircuitBreaker | None = None,
        tasks: Sequence[str | os.PathLike[str] | Bundle] = (),
        **settings: Any,
    ):
        self.config = ClientConfig.build(config, settings)
        self.bundle = _load_bundle(bundle, self.config.max_cut, self.config.runtime)
        self.max_cut = _max_cut(self.bundle, self.config.max_cut)
        self.policy: Policy = _make_policy(policy, self.bundle, self.config)
        #: The models infer_many answers from one upload (this bundle first), or None.
        self.tasks: TaskSet | None = None
        if tasks:
            runtime = self.config.runtime
            self.tasks = make_tasks(
                self.bundle, tasks, self.policy, self.config, lambda b: _load_bundle(b, None, runtime)
            )
        self.deadline_s = self.config.deadline_s
        self.device_slowdown = float(self.config.device_slowdown)
        self.can_finish_locally = self.bundle.can_head(self.bundle.last_cut)
        self.estimator = _make_estimator(self.bundle, self.config)
        chain = chain_times(self.bundle)
        #: Profiled batch-1 seconds of the head of every cut (emulate="profile"), if profiled.
        self._chain: list[float] | None = None if chain is None else chain[0]
        self.transport: Transport = transport or _http_transport(url, self.config)
        self.breaker = breaker or CircuitBreaker()
        self.metrics = EdgeMetrics(registry) if registry is not None else None
        self.last_trace: Trace | None = None
        probe = self.config.probe
        self.probe = self.policy.name not in ("static", "local") if probe is None else probe
        self._probe_task: asyncio.Task[None] | None = None
        #: Cloud requests whose answer a hedge made moot, left to finish (they measure the link).
        self._ignored: set[asyncio.Future[Any]] = set()
        #: Requests (and probe uploads) of this client on the link now.
        self._sending = 0
        #: time.monotonic() before which the cloud asked not to be sent requests (Retry-After).
        self._cloud_back_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: Answers of the cloud that say this client is misconfigured, by kind (:data:`REFUSALS`).
        self.refusals: Counter[str] = Counter()
        #: The server's description of this client's model, from the last metadata check.
        self.server_metadata: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._fallback_log: dict[str, tuple[float, int]] = {}
        self._url = url

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"EdgeClient({self._url!r}, model={self.bundle.name!r}, policy={self.policy.name!r}, "
            f"cuts 0..{self.bundle.last_cut} (max_cut {self.max_cut}), deadline_s={self.deadline_s}, {state})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(
                "this EdgeClient has been closed: make a new one (it does not reopen its connections)"
            )

    # -- the request ---------------------------------------------------------------------

    def _decide(self, est: Estimates, policy: Policy | None = None) -> tuple[Decision, str | None]:
        """The decision for the next request (by ``policy``, default this client's), and why it
        stays local if the plan was the cloud."""
        decision = (policy or self.policy).decide(est)
        last = self.bundle.last_cut
        if decision.cut > self.max_cut:
            raise ConfigError(f"policy chose cut {decision.cut}, beyond this client's max_cut {self.max_cut}")
        if decision.cut == last:
            return decision, None
        if self.deadline_s is not None and decision.predicted_s > self.deadline_s and self.can_finish_locally:
            return decision, "deadline"
        if self.can_finish_locally and time.monotonic() < self._cloud_back_at:
            return decision, "backoff"
        if not self.breaker.allow() and self.can_finish_locally:
            return decision, "circuit_open"
        return decision, None

    async def _emulated(
        self, fn: Callable[..., T], *args: object, profiled_s: float | None = None
    ) -> tuple[T, float]:
        """Run ``fn`` off the loop, then wait out the rest of an N-times-slower device.

        Only ``fn``'s own time (measured in the worker thread) is scaled: handing the work to
        the thread and back is this host's overhead, not the device's compute, and scaled by
        N it made a 1 ms encode look like 30 and turned event-loop jitter into device jitter.
        With ``emulate="profile"`` and the work's ``profiled_s`` known, the device takes
        ``profiled_s * N`` (or what the work really took, if longer): on a host shared by many
        emulated devices, contention is not multiplied by N into device time.
        """
        t0 = time.perf_counter()
        result, took = await asyncio.to_thread(_timed, fn, *args)
        if self.device_slowdown > 1.0:
            if self.config.emulate == "profile" and profiled_s is not None:
                await asyncio.sleep(max(0.0, profiled_s * self.device_slowdown - (time.perf_counter() - t0)))
            else:
                await asyncio.sleep(took * (self.device_slowdown - 1.0))
        return result, time.perf_counter() - t0

    def _profiled_tail(self, k: int, frontier: tuple[Any, ...]) -> float | None:
        """The profile's time for the device's tail from cut ``k`` (batch-1 time x rows)."""
        if self._chain is None:
            return None
        last = self._profiled_head(self.bundle.last_cut, frontier)
        head = self._profiled_head(k, frontier)
        return None if last is None or head is None else last - head

    def _profiled_head(self, k: int, inputs: tuple[Any, ...]) -> float | None:
        """The profile's time for the head of cut ``k`` on these inputs (batch-1 time x rows)."""
        if self._chain is None:
            return None
        first: Any = inputs[0] if inputs else None  # a torch tensor or a numpy array
        rows = first.shape[0] if getattr(first, "ndim", 0) else 1
        return self._chain[k] * rows

    @overload
    async def ainfer(self, *inputs: Any, return_trace: Literal[False] = ...) -> Any: ...

    @overload
    async def ainfer(self, *inputs: Any, return_trace: Literal[True]) -> tuple[Any, Trace]: ...

    async def ainfer(self, *inputs: Any, return_trace: bool = False) -> Any:
        """The model's outputs for ``inputs``, computed across the device and the cloud; with
        ``return_trace=True``, ``(outputs, trace)``: this request's own :class:`Trace` (safe
        under ``asyncio.gather``, unlike ``last_trace``)."""
        self._check_open()
        started = time.perf_counter()
        est = self.estimator.estimates()
        decision, local_reason = self._decide(est)
        last = self.bundle.last_cut
        k = last if local_reason else decision.cut
        self._maybe_probe(sending=k != last)
        request_id = uuid.uuid4().hex
        stages: dict[str, float] = {}
        frontier, stages["head"] = await self._emulated(
            self.bundle.head, k, *inputs, profiled_s=self._profiled_head(k, inputs)
        )
        if k == last:  # a request sent is observed with its encode (_remote)
            self.estimator.observe_head(k, stages["head"])
        trace = Trace(
            request_id, decision.cut, decision.codec, 0, 0, dict(decision.stages), stages, local_reason
        )
        if k == last:
            outputs = frontier
        else:
            try:
                outputs, trace = await self._remote(decision, est, frontier, trace, started)
            except AuthError:
                raise
            except (CloudError, ProtocolError, CodecError) as exc:
                outputs, trace = await self._fall_back(decision, frontier, trace, exc)
        stages["total"] = time.perf_counter() - started
        self._record(trace, decision)
        result = _pytree.unflatten(list(outputs), self.bundle.out_spec)
        return (result, trace) if return_trace else result

    async def _encode(
        self, decision: Decision, est: Estimates, frontier: tuple[Any, ...], trace: Trace, started: float
    ) -> tuple[bytes, float | None]:
        """The frontier encoded with the decision's codec (timed into ``trace``, the device's
        work observed), and the seconds left of the deadline (None without one); raises
        CloudTimeoutError if none are left. Shared by one-model and multi-task requests."""
        codec = self.bundle.codec_for(decision.cut, decision.codec)
        payload, trace.stages["encode"] = await self._emulated(
            codec.encode, list(frontier), profiled_s=decision.stages.get("encode", 0.0) / est.device_slowdown
        )
        # The device's work is the head and the encode (at cut 0, the encode alone): one sample,
        # so a tiny encode, mostly thread hand-off once emulated N times slower, weighs little.
        # Its profiled time is the decision's prediction without the slowdown that went into it.
        predicted = decision.stages.get("head", 0.0) + decision.stages.get("encode", 0.0)
        self.estimator.observe_device(
            predicted / est.device_slowdown, trace.stages["head"] + trace.stages["encode"]
        )
        if self.deadline_s is None:
            return payload, None
        remaining = self.deadline_s - (time.perf_counter() - started)
        if remaining <= 0:
            raise CloudTimeoutError("the deadline passed before the request was sent", code="deadline")
        return payload, remaining

    async def _remote(
        self,
        decision: Decision,
        est: Estimates,
        frontier: tuple[Any, ...],
        trace: Trace,
        started: float,
    ) -> tuple[tuple[Any, ...], Trace]:
        payload, remaining = await self._encode(decision, est, frontier, trace, started)
        header = protocol.RequestHeader(
            model=self.bundle.name,
            graph=self.bundle.graph_hash,
            cut=decision.cut,
            codec=decision.codec,
            tensors=specs_of(frontier),
            request_id=trace.request_id,
            payload_nbytes=len(payload),
            deadline_s=remaining,
        )
        body = protocol.encode_request(header, payload)
        send = asyncio.ensure_future(
            self._post_measured(
                f"/v1/models/{self.bundle.name}/infer",
                body,
                {"Content-Type": protocol.FRAME_CONTENT_TYPE},
                remaining,
                cut=decision.cut,
            )
        )
        hedge_s = hedge_after(decision, est) if self.config.hedge and self.can_finish_locally else math.inf
        if math.isfinite(hedge_s):
            trace.predicted["hedge_after"] = hedge_s
            hedged = await self._hedge(send, hedge_s, decision, frontier, trace)
            if hedged is not None:
                return hedged
        resp = await send
        trace.stages["network"] = resp.ended - resp.started
        if resp.status != 200:
            exc = protocol.error_from_problem(resp.status, resp.body, resp.headers.get("Retry-After"))
            self._refused(resp.status, "request", exc)
            raise exc
        t0 = time.perf_counter()
        rheader, rpayload = protocol.decode_response(resp.body)
        response_codec = get_codec(rheader.codec)
        # numpy in, numpy out (an ONNX Runtime head on numpy inputs needs no torch)
        decode = response_codec.decode_numpy if _all_numpy(frontier) else response_codec.decode
        outputs = decode(rpayload, max_nbytes=sum(s.nbytes() for s in rheader.tensors))
        trace.stages["response_decode"] = time.perf_counter() - t0
        cloud = protocol.parse_server_timing(resp.headers.get("Server-Timing"))
        trace.stages.update({f"cloud_{k}": v for k, v in cloud.items()})
        for ours, theirs in (("queue", "queue"), ("decode", "decode"), ("tail", "compute")):
            if theirs in cloud:
                trace.stages[ours] = cloud[theirs]
        own = cloud.get("total", sum(v for k, v in cloud.items() if k != "total"))
        trace.stages["link"] = max(0.0, trace.stages["network"] - own)
        self.breaker.success()
        return tuple(outputs), replace(
            trace, bytes_up=len(body), bytes_down=len(resp.body), retried=resp.retried, ran_on="cloud"
        )

    async def _hedge(
        self,
        send: asyncio.Future[TransportResponse],
        hedge_s: float,
        decision: Decision,
        frontier: tuple[Any, ...],
        trace: Trace,
    ) -> tuple[tuple[Any, ...], Trace] | None:
        """Wait ``hedge_s`` for ``send``; if it is still out, race the device's tail against it.

        Returns the device's outputs (and the trace, fallback ``hedge``) if the device finished
        first, else None: ``send`` is then done (answer or error) and the caller reads it.
        """
        done, _ = await asyncio.wait({send}, timeout=hedge_s)
        if done:
            return None
        t0 = time.perf_counter()
        local = asyncio.ensure_future(
            self._emulated(
                self.bundle.run_segments,
                decision.cut,
                self.bundle.n_segments,
                frontier,
                profiled_s=self._profiled_tail(decision.cut, frontier),
            )
        )
        try:
            racing: set[asyncio.Future[Any]] = {send, local}
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            local.cancel()
            send.cancel()
            raise
        if send in done:  # the cloud came back while the device worked: its answer is used
            local.cancel()
            return None
        outputs, _ = local.result()
        trace.stages["local_tail"] = time.perf_counter() - t0
        self._ignored.add(send)
        send.add_done_callback(self._forget)
        return outputs, replace(trace, fallback="hedge")

    def _forget(self, fut: asyncio.Future[Any]) -> None:
        """A moot cloud request ended: drop it, and read its outcome (nobody else will)."""
        self._ignored.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("the cloud request a hedge made moot failed: %s", fut.exception())

    async def _post_measured(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float | None,
        *,
        cut: int | None,
        answer_bytes: float | None = None,
    ) -> TransportResponse:
        """POST ``body``, in flight for the estimator until it ends; a 2xx answer feeds it.

        ``cut`` and ``answer_bytes`` (default: the profile's response size) say how long the
        cloud and the answer should take, which the in-flight cap sets aside.
        """
        transfer = self.estimator.start_transfer(
            len(body), time.perf_counter(), cut=cut, down_bytes=answer_bytes
        )
        self._sending += 1
        try:
            resp = await self.transport.post(path, body, headers, timeout_s)
        except BaseException:
            self.estimator.cancel_transfer(transfer)
            raise
        finally:
            self._sending -= 1
        if resp.status // 100 != 2:
            self.estimator.cancel_transfer(transfer)
            return resp
        self.estimator.observe_transfer(
            up_bytes=len(body),
            down_bytes=len(resp.body),
            start=resp.started,
            first_byte=resp.first_byte,
            end=resp.ended,
            server_timing=resp.headers.get("Server-Timing"),
            cut=cut,
            transfer_id=transfer,
        )
        return resp

    # -- link probes ---------------------------------------------------------------------

    def _maybe_probe(self, *, sending: bool) -> None:
        """Start a probe in the background if the estimates are stale (see the class docstring).

        The round trip is probed only while no request is on the link (it would queue behind
        the upload and look long); the uplink only when the request at hand stays on the device
        (one that is sent measures it).
        """
        if not self.probe or (self._probe_task is not None and not self._probe_task.done()):
            return
        if time.monotonic() < self._cloud_back_at:
            return
        rtt = self._sending == 0 and self.estimator.needs_rtt_probe()
        upload = not sending and self.estimator.needs_probe()
        if rtt or upload:
            self._probe_task = asyncio.ensure_future(self._probe(rtt=rtt, upload=upload))

    async def _probe(self, *, rtt: bool, upload: bool) -> None:
        """An empty probe for the round trip, then an upload of ``probe_bytes()``; never raises."""
        if rtt and not await self._probe_part("rtt", b""):
            return
        if upload:
            await self._probe_part("upload", bytes(self.estimator.probe_bytes()))

    async def _probe_part(self, part: str, body: bytes) -> bool:
        """One probe request, its measurement given to the estimator; whether it was answered."""
        try:
            if body:
                resp = await self._post_measured(
                    LINK_PROBE_PATH, body, {}, PROBE_TIMEOUT_S, cut=None, answer_bytes=0
                )
            else:
                resp = await self.transport.post(LINK_PROBE_PATH, body, {}, PROBE_TIMEOUT_S)
                if resp.status == 204:
                    server = sum(protocol.parse_server_timing(resp.headers.get("Server-Timing")).values())
                    self.estimator.observe_rtt(max(0.0, resp.first_byte - resp.started - server))
            ok = resp.status == 204
            if resp.status in (401, 403, 409):
                self._refused(
                    resp.status, f"link probe ({part})", protocol.error_from_problem(resp.status, resp.body)
                )
            if resp.status in (404, 405):
                self.probe = False  # a server from before link probes: do not ask again
                log.warning("the cloud does not answer link probes (HTTP %s); probing stops", resp.status)
        except (CloudError, ProtocolError) as exc:
            log.debug("link probe (%s) failed: %s", part, exc)
            ok = False
        if self.metrics is not None:
            outcome = "ok" if ok else "failed"
            self.metrics.probes.labels(model=self.bundle.name, part=part, outcome=outcome).inc()
        return ok

    async def _fall_back(
        self, decision: Decision, frontier: tuple[Any, ...], trace: Trace, exc: Exception
    ) -> tuple[tuple[Any, ...], Trace]:
        """Finish on the device from the frontier already computed; fail loudly if it cannot."""
        reason = _reason(exc)
        self._log_fallback(reason, exc)
        if reason not in ("graph_mismatch", "bad_request"):
            self.breaker.failure()
        if isinstance(exc, CloudUnavailableError) and exc.retry_after_s:
            back_at = time.monotonic() + min(exc.retry_after_s, 300.0)
            self._cloud_back_at = max(self._cloud_back_at, back_at)
        if not self.can_finish_locally:
            raise exc
        try:  # on the device, so as slow as the device is (device_slowdown)
            outputs, trace.stages["local_tail"] = await self._emulated(
                self.bundle.run_segments,
                decision.cut,
                self.bundle.n_segments,
                frontier,
                profiled_s=self._profiled_tail(decision.cut, frontier),
            )
        except CutNotLoadedError:
            raise exc from None
        return outputs, replace(trace, fallback=reason)

    def _refused(self, status: int, what: str, exc: CloudError) -> None:
        """Count an answer that says this client is misconfigured; log its kind once."""
        kind = REFUSALS.get(status)
        if kind is None:
            return
        self.refusals[kind] += 1
        if self.metrics is not None:
            self.metrics.refusals.labels(model=self.bundle.name, kind=kind).inc()
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "the cloud refused a %s of model %r with HTTP %s (%s): %s. Further ones are counted "
                "(client.refusals) but not logged",
                what,
                self.bundle.name,
                status,
                kind,
                exc,
            )

    def _log_fallback(self, reason: str, exc: Exception) -> None:
        """Log a request finished on the device, at most once per reason every few seconds."""
        now = time.monotonic()
        last, skipped = self._fallback_log.get(reason, (-FALLBACK_LOG_EVERY_S, 0))
        if now - last < FALLBACK_LOG_EVERY_S:
            self._fallback_log[reason] = (last, skipped + 1)
            return
        self._fallback_log[reason] = (now, 0)
        more = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning(
            "model %r: a request finishes on the device (%s): %s%s", self.bundle.name, reason, exc, more
        )

    def _record(self, trace: Trace, decision: Decision) -> None:
        self.last_trace = trace
        if self.metrics is None:
            return
        model = self.bundle.name
        self.metrics.decisions.labels(model=model, cut=str(trace.cut), codec=trace.codec).inc()
        self.metrics.latency.labels(model=model).observe(trace.stages["total"])
        if trace.fallback:
            self.metrics.fallbacks.labels(model=model, reason=trace.fallback).inc()
        elif trace.cut != self.bundle.last_cut and decision.predicted_s > 0:
            self.metrics.prediction_error.labels(model=model).observe(
                trace.stages["total"] / decision.predicted_s
            )
        if trace.retried:
            self.metrics.retries.labels(model=model, reason="stale_connection").inc()
        est = self.estimator.estimates()
        self.metrics.uplink.labels(model=model).set(est.uplink_bps / 8)
        self.metrics.rtt.labels(model=model).set(est.rtt_s)

    # -- warm-up ---------------------------------------------------------------------------

    async def awarm_up(self, *inputs: Any) -> float:
        """Run the whole model on the device twice: once to build its runners, once timed, so the
        device's speed is measured before the first decision (``Estimator.observe_head`` at the
        last cut) rather than from a first request slowed by cold start; a client that probes
        also measures the round trip then, before any request is on the link. Returns the
        seconds the device (with ``device_slowdown``: scaled, not waited out) takes for the
        whole model. Needs the full model."""
        self._check_open()
        last = self.bundle.last_cut
        if not self.can_finish_locally:
            raise ConfigError("warm_up runs the whole model on the device; this client holds only a head")
        await self._check_server()
        await asyncio.to_thread(self.bundle.head, last, *inputs)
        _, took = await asyncio.to_thread(_timed, self.bundle.head, last, *inputs)
        profiled = self._profiled_head(last, inputs) if self.config.emulate == "profile" else None
        seconds = max(took, profiled * self.device_slowdown) if profiled else took * self.device_slowdown
        self.estimator.observe_head(last, seconds)
        if self.probe and self.estimator.needs_rtt_probe():  # while no request is on the link
            await self._probe_part("rtt", b"")
        return seconds

    def warm_up(self, *inputs: Any) -> float:
        """Synchronous :meth:`awarm_up`."""
        return self._run(self.awarm_up(*inputs))

    # -- the server -----------------------------------------------------------------------

    async def amodel_metadata(self) -> dict[str, Any]:
        """The server's description of this client's model (``GET /v1/models/{name}``: version,
        graph hash, cuts, codecs, inputs, max batch size), checked against the bundle.

        AuthError for 401/403; RemoteRequestError (code ``unknown_model``) when the server does
        not host the model, GraphMismatchError when it hosts another graph under its name (both
        name both graph hashes); CloudUnavailableError or CloudTimeoutError when it cannot be
        reached.
        """
        self._check_open()
        name, ours = self.bundle.name, self.bundle.graph_hash
        resp = await self.transport.get(f"/v1/models/{quote(name, safe='')}", METADATA_TIMEOUT_S)
        if resp.status in (401, 403):
            exc = protocol.error_from_problem(resp.status, resp.body)
            raise AuthError(
                f"{exc}; check the client's token= (the server's --token-file lists the valid ones)",
                code=exc.code,
                status=resp.status,
            )
        if resp.status == 404:
            raise RemoteRequestError(
                f"the cloud at {self._url} hosts no model {name!r} (this client's bundle: graph {ours}): "
                "serve this bundle there (splitinfer serve --repository <its parent directory>), "
                "or point the client at a server that hosts it",
                code="unknown_model",
                status=404,
            )
        if resp.status != 200:
            raise protocol.error_from_problem(resp.status, resp.body, resp.headers.get("Retry-After"))
        try:
            doc = json.loads(resp.body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ProtocolError(f"the cloud at {self._url} describes model {name!r} with something not JSON")
        theirs = doc.get("graph_hash")
        # A server with several versions routes each frame by its graph hash (docs/server.md,
        # "Model versions and hot reload"): any served version's hash is this client's to use.
        versions = doc.get("versions")
        served = (
            {v.get("graph_hash") for v in versions if isinstance(v, dict)}
            if isinstance(versions, list)
            else set()
        )
        if theirs != ours and ours not in served:
            raise GraphMismatchError(
                f"the cloud's model {name!r} has graph {theirs}, this client's bundle has graph {ours}: "
                "load the same bundle on the edge and the cloud",
                code="graph_mismatch",
                status=409,
            )
        self.server_metadata = doc
        return doc

    def model_metadata(self) -> dict[str, Any]:
        """Synchronous :meth:`amodel_metadata`."""
        return self._run(self.amodel_metadata())

    async def aserver_ready(self) -> bool:
        """Whether the server answers ``GET /v2/health/ready`` with 200 (False when it is loading,
        draining or unreachable)."""
        self._check_open()
        try:
            resp = await self.transport.get("/v2/health/ready", METADATA_TIMEOUT_S)
        except CloudError:
            return False
        return resp.status == 200

    def server_ready(self) -> bool:
        """Synchronous :meth:`aserver_ready`."""
        return self._run(self.aserver_ready())

    async def _check_server(self) -> None:
        """The metadata check on entering and on warm-up: a misconfiguration raises; a cloud that
        cannot be reached (it may come later) is logged once."""
        try:
            for ask in range(MISMATCH_ASKS):
                try:
                    await self.amodel_metadata()
                    break
                except GraphMismatchError as exc:
                    # Behind a load balancer during a rolling update one replica may hold the new
                    # graph while others still serve ours: ask again (each ask may reach another
                    # replica) and raise only when every answer disagrees.
                    if ask == MISMATCH_ASKS - 1:
                        raise
                    if "partial_mismatch" not in self._warned:
                        self._warned.add("partial_mismatch")
                        log.warning(
                            "%s (asking again: behind a load balancer another replica may serve this "
                            "graph; the requests a mismatching replica gets finish on the device)",
                            exc,
                        )
        except (CloudUnavailableError, CloudTimeoutError) as exc:
            if "unreachable" not in self._warned:
                self._warned.add("unreachable")
                log.warning(
                    "cannot check model %r with the cloud at %s yet (%s); requests finish on the "
                    "device until it answers",
                    self.bundle.name,
                    self._url,
                    exc,
                )

    # -- async lifecycle -----------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        for fut in list(self._ignored):
            fut.cancel()
        if self._ignored:
            await asyncio.gather(*self._ignored, return_exceptions=True)
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await self.transport.close()

    async def __aenter__(self) -> EdgeClient:
        self._check_open()
        try:
            await self._check_server()
        except BaseException:
            await self.aclose()  # __aexit__ will not run: leave no session open
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sync API: a private event loop in a daemon thread -------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="splitinfer-edge", daemon=True
                )
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @overload
    def infer(self, *inputs: Any, return_trace: Literal[False] = ...) -> Any: ...

    @overload
    def infer(self, *inputs: Any, return_trace: Literal[True]) -> tuple[Any, Trace]: ...

    def infer(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Synchronous :meth:`ainfer`; safe to call from several threads."""
        self._check_open()
        if return_trace:
            return self._run(self.ainfer(*inputs, return_trace=True))
        return self._run(self.ainfer(*inputs))

    @overload
    async def ainfer_many(self, *inputs: Any, return_trace: Literal[False] = ...) -> dict[str, Any]: ...

    @overload
    async def ainfer_many(
        self, *inputs: Any, return_trace: Literal[True]
    ) -> tuple[dict[str, Any], Trace]: ...

    async def ainfer_many(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Every model's outputs for ``inputs`` by model name (this bundle's and each task's),
        from one upload (or all on the device); with ``return_trace=True``, ``(outputs, trace)``."""
        outputs, trace = await ainfer_many(self, inputs)
        return (outputs, trace) if return_trace else outputs

    @overload
    def infer_many(self, *inputs: Any, return_trace: Literal[False] = ...) -> dict[str, Any]: ...

    @overload
    def infer_many(self, *inputs: Any, return_trace: Literal[True]) -> tuple[dict[str, Any], Trace]: ...

    def infer_many(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Synchronous :meth:`ainfer_many`; safe to call from several threads."""
        self._check_open()
        if return_trace:
            return self._run(self.ainfer_many(*inputs, return_trace=True))
        return self._run(self.ainfer_many(*inputs))

    def close(self) -> None:
        if self._loop is None:
            self._closed = True
            return
        self._run(self.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> EdgeClient:
        self._check_open()
        try:
            self._run(self._check_server())
        except BaseException:
            self.close()  # __exit__ will not run: leave no session open
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_bundle(bundle: str | os.PathLike[str] | Bundle, max_cut: int | None, runtime: str | None) -> Bundle:
    """``bundle`` itself, or the bundle saved there with the segments up to ``max_cut``, on
    ``runtime`` (``auto``: ONNX Runtime when the bundle has ONNX and onnxruntime imports;
    None: torch when it is installed, else auto)."""
    if not isinstance(bundle, Bundle):
        if runtime is None:
            runtime = "torch" if _torch_installed() else "auto"
        return Bundle.load(Path(bundle), upto_cut=max_cut, runtime=runtime)
    if runtime not in (None, "auto", bundle.runtime):
        raise ConfigError(
            f"this bundle object runs on {bundle.runtime}; for runtime={runtime!r} pass its directory, "
            f"or Bundle.load(path, runtime={runtime!r})"
        )
    return bundle


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:  # a finder that refuses torch (tests/test_layering.py's BLOCK_TORCH)
        return False


def _all_numpy(frontier: tuple[Any, ...]) -> bool:
    """Whether a frontier is numpy arrays (so the answer is decoded to numpy too)."""
    return bool(frontier) and all(type(t).__module__ == "numpy" for t in frontier)


def _max_cut(bundle: Bundle, max_cut: int | None) -> int:
    """The deepest cut a client may choose (default: the last); ConfigError if its head is
    not loaded."""
    k = bundle.last_cut if max_cut is None else bundle.cut(max_cut).index
    if not bundle.can_head(k):
        raise ConfigError(f"the bundle holds no head for cut {k}; load it with upto_cut >= it")
    return k


def _make_policy(policy: str | Policy, bundle: Bundle, config: ClientConfig) -> Policy:
    """``policy`` itself, or the named one made for ``bundle`` with the config's options (and
    its fidelity budget, for the policies that have one)."""
    if not isinstance(policy, str):
        return policy
    options = dict(config.policy_options)
    if policy in ("adaptive", "cloud"):
        options.setdefault("fidelity_budget", config.fidelity_budget)
    if policy == "adaptive" and not (config.hedge and bundle.can_head(bundle.last_cut)):
        options.setdefault("hedge", False)  # a client that does not hedge: never price a hedge
    return make_policy(policy, bundle, **options)


def _make_estimator(bundle: Bundle, config: ClientConfig) -> Estimator:
    """An estimator starting from the config's prior, on an N-times-slower device."""
    prior = config.prior or Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.05)
    return Estimator(
        bundle,
        prior=replace(prior, device_slowdown=float(config.device_slowdown)),
        clock=time.perf_counter,
    )


def _http_transport(url: str, config: ClientConfig) -> HttpTransport:
    """The HTTP transport to ``url``, with TLS when the config names a CA or client certificate."""
    tls = config.ca_file or config.client_cert
    ssl_context = make_ssl_context(config.ca_file, config.client_cert, config.client_key) if tls else None
    return HttpTransport(url, token=config.token, ssl_context=ssl_context)


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """``fn(*args)`` and the seconds it took, measured where it runs (a worker thread)."""
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def _reason(exc: Exception) -> str:
    """A low-cardinality label for why the cloud could not serve a request."""
    code = exc.code if isinstance(exc, CloudError | ProtocolError) else None
    if code == "graph_mismatch":
        return "graph_mismatch"
    if code in ("overloaded", "not_ready"):
        return "shed"
    if code in ("deadline_exceeded", "deadline") or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "unreachable"
    if isinstance(exc, RemoteRequestError | ProtocolError | CodecError):
        return "bad_request"
    return "cloud_error"
