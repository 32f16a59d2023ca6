"""EdgeClient: the SDK's facade over the request pipeline (edge/_pipeline.py), sync and async."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from splitinfer.bundle import Bundle
from splitinfer.edge import _build
from splitinfer.edge._breaker import CircuitBreaker
from splitinfer.edge._cloud_api import CloudAPI
from splitinfer.edge._config import ClientConfig
from splitinfer.edge._device import Device, make_emulation
from splitinfer.edge._hedging import Hedger
from splitinfer.edge._link import Link, LinkProber
from splitinfer.edge._metrics import EdgeMetrics
from splitinfer.edge._observe import Observer
from splitinfer.edge._pipeline import Decider, Pipeline
from splitinfer.edge._targets import OneModel, TaskSet, make_tasks
from splitinfer.edge._trace import Trace
from splitinfer.edge._transport import Transport
from splitinfer.errors import ClientClosedError, ConfigError
from splitinfer.partitioner import Policy

__all__ = ["EdgeClient", "Trace"]

T = TypeVar("T")


class EdgeClient:
    """The edge SDK. Use it as a context manager, sync (``infer``) or async (``ainfer``).

    ``EdgeClient(url, bundle=..., policy=..., deadline_s=..., cut=..., ...)``: the keywords
    after ``bundle``, ``policy``, ``config``, ``registry``, ``transport``, ``breaker`` and
    ``tasks`` are settings, collected in a :class:`ClientConfig` (``self.config``, checked when
    built; its docstring says what each does); any other keyword is an option of the named
    ``policy`` (:func:`splitinfer.partitioner.make_policy`: ``cut=``/``codec=`` for static,
    ``privacy_floor=``, ...), and a keyword that is neither raises ConfigError.
    ``config=ClientConfig(...)`` passes them whole (keywords then override it). ``policy`` is
    a name (``adaptive``, ``static``, ``local``, ``cloud``, ``neurosurgeon``) or a Policy.

    ``max_cut`` bounds the cuts the edge may choose and so the segments it loads; below the
    last cut the device cannot finish a request alone, and a cloud failure raises instead of
    falling back. ``device_slowdown=N`` emulates a device N times slower: the device's model
    and codec work (not the client's own overhead) takes N times its time here.

    A cloud that sheds a request (503) with ``Retry-After: S`` is left alone for S seconds:
    requests meanwhile finish on the device (fallback reason ``backoff``), or, when the device
    cannot finish them, are still sent. Every request sent is registered with the estimator
    while it is in flight, so one hanging on a dead link lowers the uplink estimate before it
    ends. With ``probe`` (by default unless the policy is ``static`` or ``local``), the client
    measures the link in the background when its estimates are stale (``POST
    /v1/link-probe``): an empty request for the round trip when it has no recent sample, and an
    upload of ``Estimator.probe_bytes()`` when the uplink estimate is stale and the request at
    hand stays on the device. At most one probe runs at a time; none while the cloud asked to
    be left alone.

    Hedged requests (``hedge=True``, the default when the client holds the whole model): a sent
    request whose answer is not back ``hedge_after(decision, estimates)`` seconds after sending
    is finished on the device from the frontier it already computed, while the cloud request
    goes on; the first of the two answers is used (then the trace's fallback is ``hedge``).

    ``tasks``: other models (bundles or their directories) that share this bundle's head up to
    some cut: :meth:`infer_many` computes the head once, sends one frontier and returns every
    model's outputs (docs/server.md, "One upload, several tasks").
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
        self.config = config = ClientConfig.build(config, settings)
        self.bundle = _build.load_bundle(bundle, config.max_cut, config.runtime)
        self.max_cut = _build.max_cut(self.bundle, config.max_cut)
        self.policy: Policy = _build.make_client_policy(policy, self.bundle, config)
        #: The models infer_many answers from one upload (this bundle first), or None.
        self.tasks: TaskSet | None = None
        if tasks:
            load = lambda b: _build.load_bundle(b, None, config.runtime)  # noqa: E731
            self.tasks = make_tasks(self.bundle, tasks, self.policy, config, load)
        #: Offered codecs this environment cannot encode (logged once; no request uses them).
        self.unencodable = _build.warn_unencodable(self.tasks.bundles if self.tasks else (self.bundle,))
        self.deadline_s = config.deadline_s
        self.device_slowdown = float(config.device_slowdown)
        self.estimator = _build.make_estimator(self.bundle, config)
        self.transport: Transport = transport or _build.http_transport(url, config)
        self.breaker = breaker or CircuitBreaker()
        self.metrics = EdgeMetrics(registry) if registry is not None else None
        self._target = OneModel(self.bundle, self.policy)
        self.can_finish_locally = self._target.can_finish_locally
        self._api = CloudAPI(self.transport, url)
        self._observer = Observer(self.bundle.name, self.bundle.last_cut, self.metrics)
        link = Link(self._api, self.estimator, time.monotonic)
        probe = self.policy.name not in ("static", "local") if config.probe is None else config.probe
        self._prober = LinkProber(link, self._observer, probe)
        decider = Decider(self.bundle.last_cut, self.max_cut, self.deadline_s, self.breaker, link)
        self._device = Device(make_emulation(config.emulate, self.device_slowdown))
        self._hedger = Hedger()
        self._pipeline = Pipeline(
            decider, self._device, self.estimator, link, self._prober, self._hedger,
            self._observer, self.breaker, self.deadline_s, config.hedge,
        )  # fmt: skip
        #: The server's description of this client's model, from the last metadata check.
        self.server_metadata: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._url = url

    def __repr__(self) -> str:
        return (
            f"EdgeClient({self._url!r}, model={self.bundle.name!r}, policy={self.policy.name!r}, "
            f"cuts 0..{self.bundle.last_cut} (max_cut {self.max_cut}), deadline_s={self.deadline_s}, "
            f"{'closed' if self._closed else 'open'})"
        )

    @property
    def last_trace(self) -> Trace | None:
        """The latest request's trace (concurrent requests overwrite it: use return_trace)."""
        return self._observer.last_trace

    @property
    def refusals(self) -> Counter[str]:
        """Answers of the cloud that say this client is misconfigured, by kind."""
        return self._observer.refusals

    @property
    def probe(self) -> bool:
        """Whether the client probes the link (it stops for a server without link probes)."""
        return self._prober.enabled

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(
                "this EdgeClient has been closed: make a new one (it does not reopen its connections)"
            )

    # -- requests --------------------------------------------------------------------------

    async def ainfer(self, *inputs: Any, return_trace: bool = False) -> Any:
        """The model's outputs for ``inputs``, computed across the device and the cloud; with
        ``return_trace=True``, ``(outputs, trace)``: this request's own :class:`Trace`."""
        self._check_open()
        result, trace = await self._pipeline.run(self._target, inputs)
        return (result, trace) if return_trace else result

    async def ainfer_many(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Every model's outputs for ``inputs`` by model name (this bundle's and each task's),
        from one upload (or all on the device); with ``return_trace=True``, ``(outputs, trace)``."""
        self._check_open()
        if self.tasks is None:
            raise ConfigError(
                "this client has no tasks: make it with EdgeClient(url, bundle=..., tasks=[other bundles]) "
                "to answer several models from one upload"
            )
        result, trace = await self._pipeline.run(self.tasks, inputs)
        return (result, trace) if return_trace else result

    async def awarm_up(self, *inputs: Any) -> float:
        """Run the whole model on the device twice (once to build its runners, once timed), so the
        device's speed is known before the first decision; a client that probes also measures
        the round trip. Returns the device's seconds for the whole model. Needs the full model."""
        self._check_open()
        if not self.can_finish_locally:
            raise ConfigError("warm_up runs the whole model on the device; this client holds only a head")
        await self._check_server()
        last = self.bundle.last_cut
        await asyncio.to_thread(self.bundle.head, last, *inputs)
        seconds = await self._device.time_head(
            self.bundle, last, inputs, self._target.profiled_head(last, inputs)
        )
        self.estimator.observe_head(last, seconds)
        if self._prober.enabled and self.estimator.needs_rtt_probe():  # while no request is on the link
            await self._prober.probe_part("rtt", b"")
        return seconds

    async def amodel_metadata(self) -> dict[str, Any]:
        """The server's description of this client's model (``GET /v1/models/{name}``), checked
        against the bundle. AuthError for 401/403; RemoteRequestError (``unknown_model``) when
        the server does not host the model, GraphMismatchError when it hosts another graph
        under its name; CloudUnavailableError or CloudTimeoutError when it cannot be reached."""
        self._check_open()
        self.server_metadata = await self._api.model_metadata(self.bundle)
        return self.server_metadata

    async def aserver_ready(self) -> bool:
        """Whether the server answers ``GET /v2/health/ready`` with 200."""
        self._check_open()
        return await self._api.ready()

    async def _check_server(self) -> None:
        """The metadata check on entering and on warm-up (CloudAPI.check_model)."""
        self.server_metadata = (
            await self._api.check_model(self.bundle, self._observer.warn_once) or self.server_metadata
        )

    async def aclose(self) -> None:
        self._closed = True
        await self._hedger.close()
        await self._prober.close()
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

    # -- the sync bridge: a private event loop in a daemon thread -------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="splitinfer-edge", daemon=True
                )
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Synchronous :meth:`ainfer`; safe to call from several threads."""
        self._check_open()
        return self._run(self.ainfer(*inputs, return_trace=return_trace))

    def infer_many(self, *inputs: Any, return_trace: bool = False) -> Any:
        """Synchronous :meth:`ainfer_many`; safe to call from several threads."""
        self._check_open()
        return self._run(self.ainfer_many(*inputs, return_trace=return_trace))

    def warm_up(self, *inputs: Any) -> float:
        """Synchronous :meth:`awarm_up`."""
        return self._run(self.awarm_up(*inputs))

    def model_metadata(self) -> dict[str, Any]:
        """Synchronous :meth:`amodel_metadata`."""
        return self._run(self.amodel_metadata())

    def server_ready(self) -> bool:
        """Synchronous :meth:`aserver_ready`."""
        return self._run(self.aserver_ready())

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
