"""The aiohttp Application: routes, middlewares, and the lifecycle that loads models and runs batchers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from splitinfer._version import __version__
from splitinfer.cloud import _handlers as h
from splitinfer.cloud import _oip
from splitinfer.cloud._auth import TokenSet
from splitinfer.cloud._batcher import Scheduler
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._drain import Drain
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._repository import load_repository, reload_models
from splitinfer.cloud._service import InferenceService
from splitinfer.cloud._state import CONFIG, METRICS, SERVICE, STATE, TOKENS, ServerState
from splitinfer.errors import ConfigError

__all__ = ["create_app", "create_probe_app"]

log = logging.getLogger("splitinfer.cloud")

#: Seconds between checks of the token file for rotation.
TOKEN_RELOAD_S = 5.0


def create_app(config: ServerConfig, registry: CollectorRegistry | None = None) -> web.Application:
    """The tail server as an aiohttp Application, for ``web.run_app``, an AppRunner or tests.

    Models load, and the compute pool and batchers start, when the application starts (its
    cleanup context); they stop when it cleans up. Metrics go to ``registry`` (a fresh one when
    None). With ``config.metrics_port`` set, /metrics is left to :func:`create_probe_app`.
    """
    if not isinstance(config, ServerConfig):
        raise ConfigError(f"create_app needs a ServerConfig, got {type(config).__name__}")
    config.torch_device()  # a CUDA device torch cannot see is refused now, before anything starts
    tokens = TokenSet(config.token_file) if config.token_file is not None else None
    open_paths = h.PROBE_PATHS if config.public_probes else frozenset()
    app = web.Application(
        middlewares=[h.problem_middleware, h.auth_middleware(open_paths)],
        client_max_size=config.max_body_bytes,
        # Bodies are read as sent: a gzip or deflate Content-Encoding is refused (415), never
        # inflated by aiohttp outside the limits the codecs enforce.
        handler_args={"auto_decompress": False},
    )
    app[CONFIG] = config
    app[METRICS] = ServerMetrics(CollectorRegistry() if registry is None else registry, __version__)
    if tokens is not None:
        app[TOKENS] = tokens
    app.cleanup_ctx.append(_lifecycle)
    if tokens is not None:
        app.cleanup_ctx.append(_token_reloader)
    app.router.add_post(
        "/v1/models/{name}/infer", h.infer, name=h.INFER_ROUTE, expect_handler=h.expect_continue
    )
    app.router.add_post("/v1/link-probe", h.link_probe)
    app.router.add_get("/v1/models", h.list_models)
    app.router.add_get("/v1/models/{name}", h.get_model)
    app.router.add_get("/v2/health/live", h.live)
    app.router.add_get("/v2/health/ready", h.ready)
    _oip.add_routes(app)  # the Open Inference Protocol (KServe v2) beside /v1
    if config.metrics_port is None:
        app.router.add_get("/metrics", h.metrics)
    return app


def create_probe_app(app: web.Application) -> web.Application:
    """A small Application serving /metrics and health for ``app`` (on the separate metrics port).

    Call it after ``app`` started: it shares the running server's state. No token is asked.
    """
    probe = web.Application(middlewares=[h.problem_middleware])
    probe[CONFIG] = app[CONFIG]
    probe[METRICS] = app[METRICS]
    if STATE in app:
        probe[STATE] = app[STATE]
    probe.router.add_get("/metrics", h.metrics)
    probe.router.add_get("/v2/health/live", h.live)
    probe.router.add_get("/v2/health/ready", h.ready)
    return probe


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    compute_threads, torch_threads = config.threads()
    device = config.torch_device()
    torch_before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)  # process-wide: restored when the app cleans up
    pool = ThreadPoolExecutor(compute_threads, thread_name_prefix="splitinfer-compute")
    try:
        repository = await asyncio.get_running_loop().run_in_executor(
            pool,
            load_repository,
            config.repository,
            device,
            config.max_versions,
            config.share_weights,
            config.runtime,
            torch_threads,
        )
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(torch_before)
        raise
    scheduler = Scheduler(
        pool,
        compute_threads=compute_threads,
        max_batch_size=config.max_batch_size,
        max_delay_s=config.max_queue_delay_ms / 1000.0,
        device=device,
        inline_below_s=config.inline_below_ms / 1000.0,
        on_batch=metrics.observe_batch,
    )
    repository.on_load = metrics.observe_load
    repository.on_release = lambda served: scheduler.forget(served.name, served.tag)
    state = ServerState(config, metrics, repository, pool, scheduler, Drain())
    metrics.bind(
        inflight=lambda: state.drain.inflight,
        waiting=lambda: scheduler.waiting,
        ready=lambda: float(state.ready),
    )
    app[STATE] = state
    app[SERVICE] = InferenceService(state)
    log.info(
        "loaded %d model(s): %s; on %s, %d compute thread(s) of %d torch thread(s)",
        len(repository.models),
        ", ".join(f"{s.name} {s.version}" for s in repository),
        device,
        compute_threads,
        torch_threads,
    )
    poller = None
    if config.poll_repository_s > 0:
        poller = asyncio.get_running_loop().create_task(_poll(state), name="splitinfer repository poller")
    try:
        yield
    finally:
        state.drain.begin()
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        try:  # each cleanup step runs even if the one before failed
            await scheduler.close()
        except Exception:
            log.exception("stopping the batchers failed")
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(torch_before)


async def reload(state: ServerState, name: str | None = None) -> list[str]:
    """Hot-reload the repository (every model, or ``name``): what SIGHUP, polling and
    POST /v2/repository/models/{name}/load do. BundleError if ``name`` is not on disk."""
    return await reload_models(state.repository, state.pool, name)


async def _poll(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.poll_repository_s)
        try:
            await reload(state)
        except Exception:  # the poller never dies of one bad scan
            log.exception("reloading the repository failed; serving what was loaded")


async def _token_reloader(app: web.Application) -> AsyncIterator[None]:
    tokens = app[TOKENS]

    async def watch() -> None:
        while True:
            await asyncio.sleep(TOKEN_RELOAD_S)
            try:
                tokens.reload_if_changed()
            except Exception:  # the watcher never dies of one bad read
                log.exception("checking the token file failed")

    task = asyncio.get_running_loop().create_task(watch(), name="splitinfer token reloader")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
