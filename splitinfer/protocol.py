"""Wire protocol v1 (DESIGN.md, "The wire").

A request or response body is one msgpack map, the *header*, immediately followed by the
*payload*, the bytes of a codec blob (``splitinfer.compression``)::

    request header   {"v": 1, "model": str, "graph": str, "cut": int, "codec": str,
                      "tensors": [[dtype, shape], ...], "id": str, "deadline_s": float | None,
                      "payload_nbytes": int, "tasks": [[model, graph], ...]}
    response header  {"v": 1, "id": str, "codec": str, "tensors": [[dtype, shape], ...],
                      "payload_nbytes": int, "models": [[model, n_tensors], ...]}

``tensors`` repeats what the payload holds so that a receiver can check shapes against the
cut before it decodes anything. ``deadline_s`` is the time the sender still grants the request
when it sends it (relative, so clocks need not agree).

``tasks`` (optional, absent when empty) names other models, with their graph hashes, that
share the posted model's head up to the request's cut: one frontier, several answers. Their
response carries ``models``: the posted model then each task, with how many of ``tensors``
(in that order) are its outputs. Frames without these fields are what they always were, so
older clients and servers keep talking; a server that predates them answers the posted model
alone (no ``models``), which the client notices. Decoding validates every field, type
and size, and raises the errors of :mod:`splitinfer.errors`.

Errors travel as ``application/problem+json`` (RFC 9457) with a stable ``code``:
:data:`PROBLEM_STATUS` lists them; :func:`error_from_problem` turns one back into the
exception the edge raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from splitinfer.errors import (
    AuthError,
    CloudError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    FrameTooLargeError,
    GraphMismatchError,
    ProtocolError,
    RemoteRequestError,
    UnsupportedVersionError,
)
from splitinfer.tensors import TensorSpec

__all__ = [
    "FRAME_CONTENT_TYPE",
    "MAX_HEADER_BYTES",
    "MAX_TASKS",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_STATUS",
    "PROTOCOL_VERSION",
    "RequestHeader",
    "ResponseHeader",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_from_problem",
    "parse_server_timing",
    "problem_body",
]

PROTOCOL_VERSION = 1
FRAME_CONTENT_TYPE = "application/vnd.splitinfer.frame+msgpack"
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Largest msgpack header accepted; the payload follows it.
MAX_HEADER_BYTES = 64 * 1024
_MAX_TENSORS = 256
_MAX_NAME = 256
#: Most task models one request may name besides the posted one.
MAX_TASKS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Every problem code the server may send, with its HTTP status. Codes are stable: clients
#: and dashboards may match on them.
PROBLEM_STATUS: dict[str, int] = {
    "malformed_frame": 400,
    "unsupported_version": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_model": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "graph_mismatch": 409,
    "head_not_shared": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "bad_cut": 422,
    "bad_codec": 422,
    "bad_shape": 422,
    "internal": 500,
    "overloaded": 503,
    "not_ready": 503,
    "deadline_exceeded": 504,
}


def valid_model_name(name: object) -> bool:
    """Whether ``name`` may name a model: 1-128 of ``[A-Za-z0-9._-]``, not starting with a dot."""
    return isinstance(name, str) and _NAME_RE.match(name) is not None


@dataclass(frozen=True)
class RequestHeader:
    """The header of an inference request."""

    model: str
    graph: str
    cut: int
    codec: str
    tensors: tuple[TensorSpec, ...]
    request_id: str
    payload_nbytes: int
    deadline_s: float | None = None
    version: int = PROTOCOL_VERSION
    #: Other models (name, graph hash) to answer from the same frontier (see the module docstring).
    tasks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ResponseHeader:
    """The header of an inference response."""

    request_id: str
    codec: str
    tensors: tuple[TensorSpec, ...]
    payload_nbytes: int
    version: int = PROTOCOL_VERSION
    #: For a request with tasks: each model (the posted one first) and how many of ``tensors``
    #: are its outputs, in order.
    models: tuple[tuple[str, int], ...] = ()


def _specs_to_wire(specs: tuple[TensorSpec, ...]) -> list[list[Any]]:
    return [[s.dtype, list(s.shape)] for s in specs]


def encode_request(header: RequestHeader, payload: bytes) -> bytes:
    """The body of an inference request: header map, then ``payload``."""
    fields = {
        "v": header.version,
        "model": header.model,
        "graph": header.graph,
        "cut": header.cut,
        "codec": header.codec,
        "tensors": _specs_to_wire(header.tensors),
        "id": header.request_id,
        "deadline_s": header.deadline_s,
        "payload_nbytes": header.payload_nbytes,
    }
    if header.tasks:
        fields["tasks"] = [[name, graph] for name, graph in header.tasks]
    return _frame(fields, payload)


def encode_response(header: ResponseHeader, payload: bytes) -> bytes:
    """The body of an inference response: header map, then ``payload``."""
    fields = {
        "v": header.version,
        "id": header.request_id,
        "codec": header.codec,
        "tensors": _specs_to_wire(header.tensors),
        "payload_nbytes": header.payload_nbytes,
    }
    if header.models:
        fields["models"] = [[name, count] for name, count in header.models]
    return _frame(fields, payload)


def _frame(fields: dict[str, Any], payload: bytes) -> bytes:
    """The header map ``fields`` packed, then ``payload``, whose length the header must state."""
    if fields["payload_nbytes"] != len(payload):
        raise ConfigError(f"header says {fields['payload_nbytes']} payload bytes, got {len(payload)}")
    head: bytes = msgpack.packb(fields)
    return head + payload


def _split(body: bytes | memoryview, max_payload: int) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body).cast("B")
    if len(view) == 0:
        raise ProtocolError("empty body: send a msgpack header map followed by the payload")
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=MAX_HEADER_BYTES,
        max_str_len=_MAX_NAME * 4,
        max_bin_len=0,
        max_array_len=_MAX_TENSORS,
        max_map_len=32,
        max_ext_len=0,
    )
    unpacker.feed(view[:MAX_HEADER_BYTES])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        if len(view) >= MAX_HEADER_BYTES:
            raise FrameTooLargeError(f"frame header exceeds {MAX_HEADER_BYTES} bytes") from None
        raise ProtocolError("frame is truncated: its msgpack header is incomplete") from None
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"frame header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"frame speaks protocol version {version!r}; this side speaks {PROTOCOL_VERSION}"
        )
    payload = view[unpacker.tell() :]
    declared = _field(header, "payload_nbytes", int)
    if declared < 0:
        raise ProtocolError("payload_nbytes must be >= 0")
    if declared > max_payload:
        raise FrameTooLargeError(f"payload of {declared} bytes exceeds the limit of {max_payload}")
    if declared != len(payload):
        raise ProtocolError(
            f"frame is truncated or padded: header declares {declared} payload bytes, "
            f"{len(payload)} follow it"
        )
    return header, payload


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in header:
        raise ProtocolError(f"frame header lacks the field {key!r}")
    value = header[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"frame header field {key!r} must be {names}, got {value!r:.60}")
    return value


def _specs_from_wire(value: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise ProtocolError("frame header field 'tensors' must be a list of [dtype, shape]")
    specs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
            raise ProtocolError(f"each tensor entry must be [dtype, shape], got {item!r:.60}")
        if any(d is None for d in item[1]):
            raise ProtocolError("tensor shapes on the wire are concrete: no null dims")
        try:
            specs.append(TensorSpec(tuple(item[1]), item[0]))
        except ConfigError as exc:
            raise ProtocolError(f"bad tensor entry {item!r:.60}: {exc}") from None
    return tuple(specs)


def decode_request(
    body: bytes | memoryview, *, max_payload: int = 1 << 30
) -> tuple[RequestHeader, memoryview]:
    """Split and validate a request body; returns the header and a view of the payload."""
    header, payload = _split(body, max_payload)
    model = _field(header, "model", str)
    if not valid_model_name(model):
        raise ProtocolError(f"model name {model!r:.60} is not a valid name")
    graph = _field(header, "graph", str)
    if len(graph) > _MAX_NAME:
        raise ProtocolError("graph hash is too long")
    cut = _field(header, "cut", int)
    if cut < 0:
        raise ProtocolError(f"cut must be >= 0, got {cut}")
    deadline = header.get("deadline_s")
    if deadline is not None and (
        not isinstance(deadline, int | float) or isinstance(deadline, bool) or deadline != deadline
    ):
        raise ProtocolError(f"deadline_s must be a number of seconds or null, got {deadline!r:.60}")
    request_id = _field(header, "id", str)
    if len(request_id) > _MAX_NAME:
        raise ProtocolError("request id is longer than 256 characters")
    tasks = _tasks_from_wire(header.get("tasks"), model)
    return (
        RequestHeader(
            model=model,
            graph=graph,
            cut=cut,
            codec=_field(header, "codec", str),
            tensors=_specs_from_wire(header.get("tensors")),
            request_id=request_id,
            payload_nbytes=len(payload),
            deadline_s=None if deadline is None else float(deadline),
            tasks=tasks,
        ),
        payload,
    )


def _tasks_from_wire(value: Any, model: str) -> tuple[tuple[str, str], ...]:
    """The ``tasks`` of a request header: distinct [model, graph] pairs other than ``model``."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TASKS:
        raise ProtocolError(
            f"frame header field 'tasks' must be a list of at most {MAX_TASKS} [model, graph]"
        )
    tasks = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise ProtocolError(f"each task must be [model, graph hash], got {item!r:.60}")
        name, graph = item
        if not valid_model_name(name) or len(graph) > _MAX_NAME:
            raise ProtocolError(f"task {name!r:.60} is not a valid model name and graph hash")
        tasks.append((name, graph))
    names = [model, *(name for name, _ in tasks)]
    if len(set(names)) != len(names):
        raise ProtocolError(f"a request names each model once (posted model and tasks), got {names}")
    return tuple(tasks)


def _models_from_wire(value: Any, n_tensors: int) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TASKS + 1:
        raise ProtocolError("frame header field 'models' must be a list of [model, n_tensors]")
    models = []
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 0
        ):
            raise ProtocolError(f"each entry of 'models' must be [model, n_tensors], got {item!r:.60}")
        models.append((item[0], item[1]))
    if sum(n for _, n in models) != n_tensors:
        raise ProtocolError(
            f"'models' accounts for {sum(n for _, n in models)} tensors, the frame has {n_tensors}"
        )
    return tuple(models)


def decode_response(
    body: bytes | memoryview, *, max_payload: int = 1 << 30
) -> tuple[ResponseHeader, memoryview]:
    """Split and validate a response body; returns the header and a view of the payload."""
    header, payload = _split(body, max_payload)
    tensors = _specs_from_wire(header.get("tensors"))
    return (
        ResponseHeader(
            request_id=_field(header, "id", str),
            codec=_field(header, "codec", str),
            tensors=tensors,
            payload_nbytes=len(payload),
            models=_models_from_wire(header.get("models"), len(tensors)),
        ),
        payload,
    )


def problem_body(code: str, detail: str, **extra: Any) -> tuple[int, bytes]:
    """The HTTP status and problem+json body for the stable ``code``."""
    status = PROBLEM_STATUS[code]
    doc = {
        "type": f"urn:splitinfer:problem:{code}",
        "title": code.replace("_", " "),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return status, json.dumps(doc).encode()


def error_from_problem(status: int, body: bytes, retry_after: str | None = None) -> CloudError:
    """The exception that an error answer of the cloud maps to on the edge."""
    code, detail = None, ""
    try:
        doc = json.loads(body[:65536])
        if isinstance(doc, dict):
            code = doc.get("code") if isinstance(doc.get("code"), str) else None
            detail = str(doc.get("detail", ""))[:2000]
    except (ValueError, UnicodeDecodeError):
        detail = body[:200].decode("utf-8", "replace")
    message = f"cloud answered {status} {code or ''}: {detail}".strip()
    if status in (401, 403):
        return AuthError(message, code=code, status=status)
    if status == 409:
        return GraphMismatchError(message, code=code, status=status)
    if status in (408, 504):
        return CloudTimeoutError(message, code=code, status=status)
    if status == 503 or status >= 500:
        retry = None
        if retry_after is not None:
            try:
                retry = max(0.0, float(retry_after))
            except ValueError:
                retry = None
        return CloudUnavailableError(message, code=code, status=status, retry_after_s=retry)
    return RemoteRequestError(message, code=code, status=status)


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``queue;dur=1.2, compute;dur=3`` to ``{"queue": 0.0012, "compute": 0.003}`` (seconds)."""
    stages: dict[str, float] = {}
    if not value:
        return stages
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    stages[name] = float(val) / 1000.0
                except ValueError:
                    continue
    return stages
