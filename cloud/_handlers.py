"""Route handlers and middlewares: the HTTP face of the server (DESIGN.md, "The wire")."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.cloud._auth import check_authorization
from splitinfer.cloud._compute import Answer, Encoder, Frame
from splitinfer.cloud._problem import Problem, error_response, oip_path, problem_response
from splitinfer.cloud._repository import Served
from splitinfer.cloud._service import (
    Call,
    InferenceService,
    Reply,
    Work,
    batchable,
    server_timing,
)
from splitinfer.cloud._state import CONFIG, METRICS, SERVICE, STATE, TOKENS, ServerState
from splitinfer.compression import get_codec
from splitinfer.errors import ProtocolError
from splitinfer.tensors import specs_of

__all__ = [
    "INFER_ROUTE",
    "auth_middleware",
    "batchable",
    "check_media",
    "encode_outputs",
    "expect_continue",
    "frame",
    "get_model",
    "infer",
    "link_probe",
    "list_models",
    "live",
    "metrics",
    "problem_middleware",
    "read_body",
    "reader",
    "ready",
    "server_timing",
]

log = logging.getLogger("splitinfer.cloud")

INFER_ROUTE = "infer"
#: Routes whose answers are counted in the request metrics (/v1's and the /v2 infer routes).
COUNTED_ROUTES = frozenset({INFER_ROUTE, "v2_infer", "v2_infer_version"})
#: Label for model names this server does not host (clients must not grow the label set).
UNKNOWN_MODEL = "_unknown"
PROBE_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
_FRAME_TYPES = frozenset(
    {protocol.FRAME_CONTENT_TYPE, "application/octet-stream", "application/msgpack", "application/x-msgpack"}
)

#: Set on a request whose body was refused part-way (its connection closes after the answer).
UNREAD_BODY = web.RequestKey("unread_body", bool)

#: What is read and dropped of a refused streamed body before answering (see _discard).
DISCARD_BYTES, DISCARD_S = 16 * 1024 * 1024, 2.0

#: aiohttp's own error answers that have a problem code.
_HTTP_CODES = {400: "malformed_frame", 413: "too_large", 415: "unsupported_media_type"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _model_label(request: web.Request) -> str:
    state = request.app.get(STATE)
    name = request.match_info.get("name", "")
    return name if state is not None and name in state.repository.models else UNKNOWN_MODEL


def _observe(request: web.Request, code: str) -> None:
    try:
        request.app[METRICS].observe_answer(_model_label(request), code)
    except Exception:  # metrics never fail a request
        log.exception("observing an answer failed")


# -- middlewares ---------------------------------------------------------------------------


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as problem+json, never as a stack trace; inference answers are counted."""
    started = time.perf_counter()
    problem: Problem | None = None
    try:
        response = await handler(request)
    except Problem as p:
        problem = p
    except web.HTTPNotFound:
        problem = Problem("not_found", f"no route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        problem = Problem(
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            {"Allow": ",".join(sorted(exc.allowed_methods))},
        )
    except web.HTTPException as exc:
        if exc.status not in _HTTP_CODES:
            raise
        problem = Problem(_HTTP_CODES[exc.status], exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        problem = Problem("internal", "the server failed to handle this request; see its log")
    code = "ok"
    if problem is not None:  # /v2 answers errors as the Open Inference Protocol says
        code = problem.code
        response = error_response(problem) if oip_path(request.path) else problem_response(problem)
    if request.match_info.route.name in COUNTED_ROUTES:
        _observe(request, code)
        if code != "ok":
            response.headers["Server-Timing"] = server_timing({"total": time.perf_counter() - started})
    state = request.app.get(STATE)
    if state is not None and state.drain.draining:
        response.force_close()  # send clients to another replica
    if request.get(UNREAD_BODY):
        response.force_close()
        if request.transport is not None:  # do not wait for the rest of the body
            asyncio.get_running_loop().call_later(1.0, request.transport.close)
    return response


def auth_middleware(open_paths: frozenset[str]) -> Middleware:
    """Bearer-token check before anything is read; ``open_paths`` skip it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        tokens = request.app.get(TOKENS)
        if tokens is not None and request.path not in open_paths:
            check_authorization(tokens, request.headers.get("Authorization"))
        return await handler(request)

    return middleware


# -- inference: the /v1 adapter of the inference service -----------------------------------


def check_media(request: web.Request, media_types: frozenset[str] = _FRAME_TYPES) -> None:
    """Refuse a Content-Encoding, or a Content-Type not in ``media_types`` (none is accepted)."""
    encoding = request.headers.get("Content-Encoding", "identity")
    if encoding.strip().lower() != "identity":  # aiohttp would inflate it: a decompression bomb
        raise Problem(
            "unsupported_media_type",
            f"Content-Encoding {encoding[:40]!r} is not accepted: a frame carries its own compression "
            "(its codec); send it as it is",
        )
    ctype = request.headers.get("Content-Type")
    if ctype and ctype.split(";")[0].strip().lower() not in media_types:
        wanted = (
            protocol.FRAME_CONTENT_TYPE if media_types is _FRAME_TYPES else " or ".join(sorted(media_types))
        )
        raise Problem("unsupported_media_type", f"send the body as {wanted}, not {ctype[:80]!r}")


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: check auth and limits before the client sends the body."""
    try:
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise Problem("malformed_frame", "only 'Expect: 100-continue' is understood")
        tokens = request.app.get(TOKENS)
        if tokens is not None:
            check_authorization(tokens, request.headers.get("Authorization"))
        service = request.app[SERVICE]
        service.find(request.match_info.get("name", ""))
        service.admit(request.content_length)
        check_media(request)
    except Problem as p:
        _observe(request, p.code)
        response = problem_response(p)
        response.force_close()  # the body was never sent: do not wait for it
        return response
    if request.version == (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response
    return None


async def read_body(request: web.Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body (Content-Length or chunked), refused with 413 as soon as it exceeds ``limit``.

    A body that has not fully arrived ``timeout_s`` seconds after reading began is refused with
    408 ``request_timeout`` and its connection is closed: a client trickling bytes (slow loris)
    holds a queue slot and a connection for at most that long.
    """
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        request[UNREAD_BODY] = True
        raise Problem(
            "request_timeout",
            f"the body did not arrive within {timeout_s:g} s; send it faster, or ask the operator "
            "to raise --read-timeout-s",
        ) from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    try:
        length = request.content_length
        if length is not None:
            return await request.content.readexactly(length)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                await _discard(request)
                raise Problem("too_large", f"streamed body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except (
        asyncio.IncompleteReadError,
        http_exceptions.HttpProcessingError,
        RequestPayloadError,
        ConnectionError,
    ) as exc:
        raise Problem(
            "malformed_frame", f"the body is truncated or its encoding is broken ({type(exc).__name__})"
        ) from None


async def _discard(request: web.Request) -> None:
    """Read and drop what is left of a refused streamed body, within a budget of bytes and time.

    A client streaming a body usually reads no answer before it has sent it all; one that stops
    sending, or sends more than the budget, gets its answer on a connection that then closes.
    """
    budget, deadline = DISCARD_BYTES, time.monotonic() + DISCARD_S
    try:
        while budget > 0 and not request.content.is_eof():
            chunk = await asyncio.wait_for(request.content.readany(), max(0.0, deadline - time.monotonic()))
            if not chunk:
                return
            budget -= len(chunk)
    except (asyncio.TimeoutError, http_exceptions.HttpProcessingError, ConnectionError):
        pass
    if not request.content.is_eof():
        request[UNREAD_BODY] = True


def reader(request: web.Request) -> Callable[[], Awaitable[bytes]]:
    """Reads ``request``'s body within the server's limits of size and time."""
    config = request.app[CONFIG]
    return functools.partial(read_body, request, config.max_body_bytes, config.read_timeout_s)


def _check(bundle: Bundle, header: protocol.RequestHeader, name: str, max_decoded: int) -> int:
    """Raise Problem unless the frame fits the bundle; returns its rows (batch size)."""
    if header.model != name:
        raise Problem("malformed_frame", f"frame names model {header.model!r} but was posted to {name!r}")
    if header.graph != bundle.graph_hash:
        raise Problem(
            "graph_mismatch",
            f"model {name!r} here has graph {bundle.graph_hash}, the request was made for "
            f"{header.graph}: load the same bundle on the edge and the cloud",
        )
    if header.cut > bundle.last_cut:
        raise Problem("bad_cut", f"model {name!r} has cuts 0..{bundle.last_cut}, got {header.cut}")
    if header.codec not in bundle.codecs:
        raise Problem(
            "bad_codec", f"model {name!r} accepts codecs {', '.join(bundle.codecs)}; got {header.codec!r}"
        )
    if header.deadline_s is not None and not header.deadline_s > 0:
        raise Problem(
            "malformed_frame",
            f"deadline_s must be a positive number of seconds (the time left), got {header.deadline_s}",
        )
    expected = bundle.cuts[header.cut].tensors
    if len(header.tensors) != len(expected) or not all(
        w.matches(g) for w, g in zip(expected, header.tensors)
    ):
        raise Problem(
            "bad_shape",
            f"cut {header.cut} of {name!r} carries {', '.join(map(str, expected))}; the frame "
            f"declares {', '.join(map(str, header.tensors)) or 'nothing'}",
        )
    batches = {t.concrete()[0] for t in header.tensors if t.shape}  # wire specs are concrete
    if len(batches) > 1:
        raise Problem("bad_shape", f"frontier tensors disagree on the batch size: {sorted(batches)}")
    decoded = sum(s.nbytes() for s in header.tensors)
    if decoded > max_decoded:
        raise Problem(
            "too_large", f"the frontier would decode to {decoded} bytes; the limit is {max_decoded}"
        )
    return batches.pop() if batches else 1


def encode_outputs(
    request_id: str,
    outputs: Sequence[Any],
    response_codec: str,
    models: tuple[tuple[str, int], ...] = (),
) -> bytes:
    """The /v1 response body carrying ``outputs`` (of several models, ``models`` says whose)."""
    payload = get_codec(response_codec).encode(outputs)
    header = protocol.ResponseHeader(
        request_id=request_id,
        codec=response_codec,
        tensors=specs_of(outputs),
        payload_nbytes=len(payload),
        models=models,
    )
    return protocol.encode_response(header, payload)


def frame(
    header: protocol.RequestHeader, payload: memoryview, rows: int, response_codec: str | None
) -> Frame:
    """A checked /v1 frame in the service's terms; its outputs are encoded with
    ``response_codec`` (None: kept as tensors, for an answer that gathers several models)."""
    encoder = None if response_codec is None else _encoder(header.request_id, response_codec)
    return Frame(header.cut, header.tensors, rows, header.request_id, header.codec, payload, encoder=encoder)


def _encoder(request_id: str, response_codec: str) -> Encoder:
    return lambda outputs: encode_outputs(request_id, outputs, response_codec)


async def infer(request: web.Request) -> web.Response:
    """``POST /v1/models/{name}/infer``: a msgpack frame in, a msgpack answer out."""
    service = request.app[SERVICE]
    name = request.match_info["name"]
    service.find(name)
    call = Call(
        read=reader(request),
        parse=functools.partial(_parse, service, name),
        declared_bytes=request.content_length,
        check=functools.partial(check_media, request),
    )
    result = await service.infer(call)
    headers = {"Server-Timing": result.timing}
    return web.Response(body=result.reply.body, content_type=result.reply.content_type, headers=headers)


async def _parse(service: InferenceService, name: str, body: bytes) -> Work:
    """The frame in ``body`` as the service's work, pinned to the version made for its graph."""
    config = service.state.config
    try:
        header, payload = protocol.decode_request(body, max_payload=config.max_body_bytes)
    except ProtocolError as exc:
        raise Problem(exc.code, str(exc)) from None
    if header.model != name:
        raise Problem("malformed_frame", f"frame names model {header.model!r} but was posted to {name!r}")
    served = service.pin(name, header.graph)
    rows = _check(served.bundle, header, name, config.max_decoded_bytes)
    tasks = service.tasks(served, header.cut, header.tasks)
    codec = None if tasks else config.response_codec  # several models: encoded as one answer
    return Work(
        served,
        frame(header, payload, rows, codec),
        functools.partial(_respond, header.request_id, config.response_codec, (served, *tasks)),
        deadline_s=header.deadline_s,
        tasks=tasks,
        label=header.codec,
    )


def _respond(request_id: str, codec: str, targets: Sequence[Served], answers: Sequence[Answer]) -> Reply:
    """The /v1 answer: the body the batcher encoded, or every model's outputs (posted model first)."""
    if len(answers) == 1 and answers[0].body is not None:
        return Reply(answers[0].body, protocol.FRAME_CONTENT_TYPE)
    outputs = [t for answer in answers for t in answer.outputs or []]
    models = tuple((t.name, len(a.outputs or [])) for t, a in zip(targets, answers))
    if len(answers) == 1:
        models = ()
    return Reply(encode_outputs(request_id, outputs, codec, models), protocol.FRAME_CONTENT_TYPE)


# -- link probes ---------------------------------------------------------------------------

#: Largest body a link probe may upload (``Estimator.probe_bytes()`` is at most 256 KiB).
LINK_PROBE_MAX_BYTES = 1024 * 1024


async def link_probe(request: web.Request) -> web.Response:
    """``POST /v1/link-probe``: what an edge client sends when its link estimates are stale.

    The body (at most :data:`LINK_PROBE_MAX_BYTES`, any content) is read and dropped; the answer
    is 204 with ``Server-Timing`` (``receive``: reading the body, ``total``: the server's own time
    after it), so the client can set the server's time aside as it does for an inference. An
    empty body measures the round trip. Behind the same bearer tokens as inference.
    """
    started = time.perf_counter()
    length = request.content_length
    if length is not None and length > LINK_PROBE_MAX_BYTES:
        raise Problem("too_large", f"a link probe carries at most {LINK_PROBE_MAX_BYTES} bytes, not {length}")
    if length != 0:  # aiohttp refuses to read exactly 0 bytes
        await read_body(request, LINK_PROBE_MAX_BYTES, request.app[CONFIG].read_timeout_s)
    received = time.perf_counter()
    stages = {"receive": received - started, "total": time.perf_counter() - received}
    return web.Response(status=204, headers={"Server-Timing": server_timing(stages)})


# -- discovery, health, metrics ------------------------------------------------------------


def _describe(state: ServerState, bundle: Bundle) -> dict[str, object]:
    """A model's newest version, and every served version with its graph hash."""
    served = state.repository.versions(bundle.name)
    return {
        "name": bundle.name,
        "version": bundle.version,
        "graph_hash": bundle.graph_hash,
        "cuts": [c.to_json() for c in bundle.cuts],
        "codecs": bundle.codecs,
        "inputs": [s.to_json() for s in bundle.inputs],
        "outputs": len(bundle.output_names()),
        "max_batch_size": state.config.max_batch_size,
        "versions": [{"version": s.version, "graph_hash": s.bundle.graph_hash} for s in served],
        "shared_heads": _shared_heads(state, bundle.name),
    }


def _shared_heads(state: ServerState, name: str) -> dict[str, int]:
    """Other models whose head the newest version of ``name`` shares, with the deepest cut up to
    which it does (a request may name them as tasks at that cut or before it)."""
    repo = state.repository
    mine = repo.latest(name)
    out: dict[str, int] = {}
    if mine is None:
        return out
    for other in sorted(repo.models):
        theirs = repo.latest(other)
        if other == name or theirs is None:
            continue
        top = min(mine.bundle.last_cut, theirs.bundle.last_cut)
        deepest = max((k for k in range(top + 1) if mine.shares_head(theirs, k)), default=-1)
        if deepest >= 0:
            out[other] = deepest
    return out


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = [_describe(state, b) for b in state.models.values()]
    return web.json_response({"models": models})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    bundle = state.models.get(name)
    if bundle is None:
        raise Problem("unknown_model", f"no model {name!r} here; GET /v1/models lists them")
    return web.json_response(_describe(state, bundle))


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    if state is None:
        raise Problem.unavailable("not_ready", "the server is loading its models")
    if not state.ready:
        raise Problem.unavailable("not_ready", "the server is draining")
    return web.json_response({"ready": True, "models": sorted(state.models)})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})
