"""The aiohttp tail server: routes, request handling and the application's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry
from torch.utils import _pytree as pytree

from splitinfer import protocol
from splitinfer._version import __version__
from splitinfer.bundle import Bundle
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._repository import load_repository
from splitinfer.compression import get_codec
from splitinfer.errors import BundleError, CodecError, ConfigError, ProtocolError
from splitinfer.tensors import TensorSpec, specs_of

__all__ = ["create_app"]

log = logging.getLogger("splitinfer.cloud")


class Problem(Exception):
    """An error answer: a stable problem code and a message that says what to fix."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


@dataclass
class ServerState:
    """What the application holds while it runs, bound to its lifecycle."""

    config: ServerConfig
    metrics: ServerMetrics
    models: dict[str, Bundle]
    pool: ThreadPoolExecutor
    ready: bool = False


CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", ServerMetrics)
STATE = web.AppKey("state", ServerState)


def problem_response(code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    status, body = protocol.problem_body(code, detail)
    return web.Response(
        status=status,
        body=body,
        content_type=protocol.PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as problem+json; nothing leaks a stack trace."""
    try:
        return await handler(request)
    except Problem as p:
        return problem_response(p.code, p.detail, p.headers)
    except web.HTTPNotFound:
        return problem_response("not_found", f"no route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return problem_response(
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; "
            f"use {', '.join(sorted(exc.allowed_methods))}",
            {"Allow": ",".join(sorted(exc.allowed_methods))},
        )
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        return problem_response("too_large", f"request body exceeds {limit} bytes")
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return problem_response("internal", "the server failed to handle this request; see its log")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 before reading when it declares more than ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise Problem("too_large", f"body of {request.content_length} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    while True:
        chunk = await request.content.read(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise Problem("too_large", f"streamed body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_request(bundle: Bundle, header: protocol.RequestHeader, name: str) -> None:
    if header.model != name:
        raise Problem("malformed_frame", f"frame names model {header.model!r} but was posted to {name!r}")
    if header.graph != bundle.graph_hash:
        raise Problem(
            "graph_mismatch",
            f"model {name!r} here has graph {bundle.graph_hash}, the request was made for "
            f"{header.graph}: reload the bundle on the edge",
        )
    if header.cut > bundle.last_cut:
        raise Problem("bad_cut", f"model {name!r} has cuts 0..{bundle.last_cut}, got {header.cut}")
    if header.codec not in bundle.codecs:
        raise Problem(
            "bad_codec",
            f"model {name!r} accepts codecs {', '.join(bundle.codecs)}; got {header.codec!r}",
        )
    expected = bundle.cuts[header.cut].tensors
    if len(header.tensors) != len(expected) or not all(
        want.matches(got) for want, got in zip(expected, header.tensors)
    ):
        raise Problem(
            "bad_shape",
            f"cut {header.cut} of {name!r} carries {', '.join(map(str, expected))}; the frame "
            f"declares {', '.join(map(str, header.tensors)) or 'nothing'}",
        )
    batches = {t.shape[0] for t in header.tensors if t.shape}
    if len(batches) > 1:
        raise Problem("bad_shape", f"frontier tensors disagree on the batch size: {sorted(batches)}")


def _compute(
    bundle: Bundle,
    header: protocol.RequestHeader,
    payload: memoryview,
    response_codec: str,
) -> tuple[bytes, tuple[TensorSpec, ...], dict[str, float]]:
    """Decode, run the tail, encode: the work done off the event loop."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    max_nbytes = sum(s.nbytes() for s in header.tensors)
    try:
        frontier = get_codec(header.codec).decode(payload, max_nbytes=max_nbytes)
    except CodecError as exc:
        raise Problem("malformed_frame", f"payload does not decode with {header.codec}: {exc}") from None
    if specs_of(frontier) != header.tensors:
        raise Problem("malformed_frame", "payload tensors differ from those the frame header declares")
    t1 = time.perf_counter()
    outputs = bundle.run_segments(header.cut, bundle.n_segments, frontier)
    t2 = time.perf_counter()
    body = get_codec(response_codec).encode(outputs)
    t3 = time.perf_counter()
    timings.update(decode=t1 - t0, compute=t2 - t1, encode=t3 - t2)
    return body, specs_of(outputs), timings


def server_timing(stages: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in stages.items())


async def infer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    started = time.perf_counter()
    code = "ok"
    try:
        bundle = state.models.get(name)
        if bundle is None:
            raise Problem("unknown_model", f"no model {name!r} here; GET /v1/models lists them")
        body = await read_body(request, state.config.max_body_bytes)
        try:
            header, payload = protocol.decode_request(body, max_payload=state.config.max_body_bytes)
        except ProtocolError as exc:
            raise Problem(exc.code, str(exc)) from None
        _check_request(bundle, header, name)
        if header.deadline_s is not None and time.perf_counter() - started > header.deadline_s:
            raise Problem("deadline_exceeded", "the request's deadline passed before compute began")
        queued = time.perf_counter()
        loop = asyncio.get_running_loop()
        out, specs, stages = await loop.run_in_executor(
            state.pool, _compute, bundle, header, payload, state.config.response_codec
        )
        stages = {"queue": queued - started, **stages}
        response_header = protocol.ResponseHeader(
            request_id=header.request_id,
            codec=state.config.response_codec,
            tensors=specs,
            payload_nbytes=len(out),
        )
        state.metrics.observe_request(name, header.cut, header.codec, stages, len(body))
        stages["total"] = time.perf_counter() - started
        return web.Response(
            body=protocol.encode_response(response_header, out),
            content_type=protocol.FRAME_CONTENT_TYPE,
            headers={"Server-Timing": server_timing(stages)},
        )
    except Problem as p:
        code = p.code
        raise
    finally:
        state.metrics.requests.labels(model=name, code=code).inc()


def _describe(bundle: Bundle) -> dict[str, object]:
    return {
        "name": bundle.name,
        "version": bundle.version,
        "graph_hash": bundle.graph_hash,
        "cuts": [c.to_json() for c in bundle.cuts],
        "codecs": bundle.codecs,
        "inputs": [s.to_json() for s in bundle.inputs],
        "outputs": pytree.treespec_loads(bundle.out_spec).num_leaves,
    }


async def list_models(request: web.Request) -> web.Response:
    models = request.app[STATE].models
    return web.json_response({"models": [_describe(b) for b in models.values()]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    bundle = request.app[STATE].models.get(name)
    if bundle is None:
        raise Problem("unknown_model", f"no model {name!r} here; GET /v1/models lists them")
    return web.json_response(_describe(bundle))


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    if state is None or not state.ready:
        raise Problem("not_ready", "the server is loading or draining", {"Retry-After": "1"})
    return web.json_response({"ready": True, "models": sorted(state.models)})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_app(config: ServerConfig, registry: CollectorRegistry | None = None) -> web.Application:
    """The server as an aiohttp Application; bundles load when it starts, in a cleanup context."""
    if not isinstance(config, ServerConfig):
        raise ConfigError(f"create_app needs a ServerConfig, got {type(config).__name__}")
    app = web.Application(middlewares=[problem_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = ServerMetrics(CollectorRegistry() if registry is None else registry, __version__)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        pool = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="splitinfer-compute")
        try:
            models = await asyncio.get_running_loop().run_in_executor(
                pool, load_repository, config.repository
            )
        except BundleError:
            pool.shutdown(wait=False)
            raise
        state = ServerState(config, app[METRICS], models, pool)
        app[STATE] = state
        state.ready = True
        log.info("serving %d model(s): %s", len(models), ", ".join(sorted(models)))
        try:
            yield
        finally:
            state.ready = False
            pool.shutdown(wait=True)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/models/{name}/infer", infer)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
