"""The Open Inference Protocol (KServe v2 REST) beside /v1: what Triton's and KServe's clients speak.

Routes (docs/server.md, "The Open Inference Protocol")::

    GET  /v2                                          server metadata
    GET  /v2/models/{name}[/versions/{v}]             model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready       model readiness
    GET  /v2/models/{name}[/versions/{v}]/config      model configuration (Triton's shape)
    POST /v2/models/{name}[/versions/{v}]/infer       inference (JSON, or the binary tensor extension)

An inference request names its inputs. Without a ``cut`` request parameter they are the model's
inputs (``input_0``, ...) and the whole model runs; with ``"parameters": {"cut": k}`` they are the
frontier of cut ``k`` (``cut<k>_0``, ...: :meth:`~splitinfer.manifest.Manifest.tensor_names`)
and only the tail from ``k`` runs. The outputs are ``output_0``, ... Tensors travel as JSON
(``data``, flat in row-major order) or, with the binary tensor data extension, as raw
little-endian bytes after the JSON header (``Inference-Header-Content-Length`` bytes long; each
binary input says its ``binary_data_size``; outputs are binary when asked with
``binary_data`` or ``binary_data_output``). BF16 travels in binary only.

Requests go through the same admission, limits, batcher, metrics and bearer tokens as /v1.
Errors leave as ``{"error": "..."}`` with the protocol's statuses (400 for what the client sent
wrong, 404 for an unknown model or version), and 401/408/413/503/504 for the limits /v1 has.
Parsing and encoding (:func:`parse_infer`, :func:`encode_answer`) are plain functions, run on a
compute thread for large bodies.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from aiohttp import web

from splitinfer._version import __version__
from splitinfer.bundle import Bundle
from splitinfer.cloud._compute import Answer, Frame
from splitinfer.cloud._handlers import check_media, reader
from splitinfer.cloud._problem import Problem
from splitinfer.cloud._repository import Served, reload_models
from splitinfer.cloud._service import Call, InferenceService, Reply, Work, batchable
from splitinfer.cloud._state import SERVICE, STATE
from splitinfer.errors import BundleError
from splitinfer.tensors import MAX_NDIM, TensorSpec, numpy_dtype

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "INFER_ROUTES",
    "InferRequest",
    "add_routes",
    "encode_answer",
    "parse_infer",
]

log = logging.getLogger("splitinfer.cloud")

#: The header that gives the JSON part's length in a body using the binary tensor extension.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The extensions this server implements (announced by GET /v2).
EXTENSIONS = ("binary_tensor_data", "model_repository")
INFER_ROUTES = frozenset({"v2_infer", "v2_infer_version"})
#: Media types an inference body may be declared as (or none).
MEDIA_TYPES = frozenset({"application/json", "application/octet-stream"})
#: The codec label /v2 requests are counted under in the payload metrics.
METRIC_CODEC = "oip"

#: OIP datatype names and the wire dtypes they are (tensors.DTYPES).
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
#: Request parameters understood; others are refused, so a typo is not silently ignored.
_PARAMETERS = frozenset({"cut", "binary_data_output", "timeout"})


def datatype(dtype: str) -> str:
    """The OIP datatype of a wire dtype."""
    return _DATATYPE_OF[dtype]


def _tensor_metadata(names: Sequence[str], specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [
        {"name": n, "datatype": datatype(s.dtype), "shape": [-1 if d is None else d for d in s.shape]}
        for n, s in zip(names, specs)
    ]


def model_metadata(bundle: Bundle, versions: Sequence[str]) -> dict[str, Any]:
    """The model metadata response: whole-model inputs and outputs, and every cut's inputs."""
    last = bundle.last_cut
    cuts = [
        {
            "cut": c.index,
            "name": c.name,
            "inputs": _tensor_metadata(bundle.tensor_names(c.index), c.tensors),
        }
        for c in bundle.cuts[:last]
    ]
    return {
        "name": bundle.name,
        "versions": list(versions),
        "platform": "splitinfer_torch_export",
        "inputs": _tensor_metadata(bundle.tensor_names(0), bundle.cuts[0].tensors),
        "outputs": _tensor_metadata(bundle.output_names(), bundle.cuts[last].tensors),
        "parameters": {"graph_hash": bundle.graph_hash, "cuts": cuts},
    }


def _config_tensors(names: Sequence[str], specs: Sequence[TensorSpec], batched: bool) -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "data_type": "TYPE_" + datatype(s.dtype),
            "dims": [-1 if d is None else d for d in (s.shape[1:] if batched else s.shape)],
        }
        for n, s in zip(names, specs)
    ]


def model_config(bundle: Bundle, version: str, max_batch_size: int) -> dict[str, Any]:
    """The model configuration in Triton's ``/config`` shape, built from the bundle's specs.

    A model whose inputs and outputs are batch-leading (dim 0 dynamic) says the server's
    ``max_batch_size`` and leaves the batch dimension out of ``dims``, as Triton does; any other
    says 0 and gives whole shapes (-1: dynamic).
    """
    batched = batchable(bundle, 0)
    last = bundle.last_cut
    return {
        "name": bundle.name,
        "platform": "splitinfer_torch_export",
        "backend": "splitinfer",
        "version_policy": {"specific": {"versions": [version]}},
        "max_batch_size": max_batch_size if batched else 0,
        "input": _config_tensors(bundle.tensor_names(0), bundle.cuts[0].tensors, batched),
        "output": _config_tensors(bundle.output_names(), bundle.cuts[last].tensors, batched),
        "parameters": {"graph_hash": {"string_value": bundle.graph_hash}},
    }


# -- parsing a request ---------------------------------------------------------------------


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: the frontier at ``cut`` and what the answer should hold."""

    request_id: str
    cut: int
    frontier: list[torch.Tensor]
    rows: int
    #: The outputs to return, by index, and whether each travels binary.
    outputs: list[tuple[int, bool]]
    #: Seconds the client grants the request (its ``timeout`` parameter), or None.
    timeout_s: float | None


def _bad(detail: str) -> Problem:
    return Problem("bad_request", detail)


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[Mapping[str, Any], memoryview]:
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be a number of bytes, got {header_length[:40]!r}") from None
        if not 0 <= n <= len(view):
            raise _bad(f"{HEADER_LENGTH} is {n}, but the body has {len(view)} bytes")
        json_part, binary = view[:n], view[n:]
    try:
        doc = json.loads(bytes(json_part), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"the inference request is not valid JSON ({exc})") from None
    return _object(doc, "the inference request"), binary


def _no_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON: refused wherever they appear."""
    raise _bad(
        f"the inference request holds {name}, which is not a JSON number: send tensors with "
        "non-finite values as binary data (the binary tensor extension)"
    )


def _cut(bundle: Bundle, parameters: Mapping[str, Any]) -> int:
    cut = parameters.get("cut", 0)
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut < bundle.last_cut:
        raise Problem(
            "bad_cut",
            f"parameter 'cut' must be an integer in 0..{bundle.last_cut - 1} (the tail from that cut "
            f"runs; 0 or none: the whole model), got {cut!r}",
        )
    return cut


def _shape(value: object, name: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise _bad(f"input {name!r}: 'shape' must be a list of at most {MAX_NDIM} non-negative integers")
    return tuple(value)


def _from_json_data(data: object, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if dtype == "bfloat16":
        raise _bad(f"input {name!r}: BF16 tensors travel as binary data only (the binary tensor extension)")
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged lists
        raise _bad(f"input {name!r}: 'data' is not a regular array of numbers") from None
    kind = arr.dtype.kind
    allowed = "b" if dtype == "bool" else "biu" if dtype.startswith(("int", "uint")) else "biuf"
    if arr.size and kind not in allowed:
        what = "true/false" if dtype == "bool" else "integers" if allowed == "biu" else "numbers"
        raise _bad(f"input {name!r} is {datatype(dtype)}: 'data' must hold {what}")
    want = numpy_dtype(dtype)
    if arr.size != math.prod(shape):
        raise _bad(f"input {name!r} has shape {list(shape)}, so {math.prod(shape)} values; got {arr.size}")
    if want.kind in "iu" and arr.size and kind in "iu":
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise _bad(f"input {name!r}: values out of the range of {datatype(dtype)}")
    out = arr.astype(want).reshape(shape)
    if want.kind == "f" and not np.isfinite(out).all():  # 1e999, or 1e10 as FP16
        raise _bad(
            f"input {name!r}: values out of the range of {datatype(dtype)}; send non-finite values "
            "as binary data (the binary tensor extension)"
        )
    return out


def _to_tensor(arr: np.ndarray[Any, Any], dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits travel as 16-bit integers
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def parse_infer(bundle: Bundle, body: bytes, header_length: str | None, max_decoded: int) -> InferRequest:
    """The request in ``body`` checked against ``bundle``; Problem (400, 413) saying what is wrong.

    Names, datatypes and shapes are checked, and the declared bytes bounded, before any tensor
    is allocated; then each input is read from its JSON ``data`` or from the binary part.
    """
    doc, binary = _split_body(body, header_length)
    parameters = _parameters(doc)
    cut = _cut(bundle, parameters)
    items = _inputs(bundle, cut, doc)
    specs = bundle.cuts[cut].tensors
    shapes = [_declared_shape(name, item, spec) for (name, item), spec in zip(items, specs)]
    decoded = sum(math.prod(s) * spec.itemsize for s, spec in zip(shapes, specs))
    if decoded > max_decoded:
        raise Problem("too_large", f"the inputs hold {decoded} bytes; the limit is {max_decoded}")
    frontier, offset = [], 0
    for (name, item), spec, shape in zip(items, specs, shapes):
        size = _object(item.get("parameters", {}), f"parameters of input {name!r}").get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise _bad(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            arr = _from_json_data(item["data"], name, spec.dtype, shape)
        else:
            arr = _from_binary(binary, offset, size, name, spec.dtype, shape)
            offset += size
        frontier.append(_to_tensor(arr, spec.dtype))
    if offset != len(binary):
        raise _bad(
            f"{len(binary) - offset} bytes of binary data follow the inputs; no binary_data_size claims them"
        )
    rows = {t.shape[0] for t in frontier if t.dim()}
    if len(rows) > 1:
        raise _bad(f"the inputs disagree on the batch size: {sorted(rows)}")
    return InferRequest(
        request_id=_request_id(doc.get("id")),
        cut=cut,
        frontier=frontier,
        rows=rows.pop() if rows else 1,
        outputs=_requested_outputs(bundle, doc, parameters),
        timeout_s=_timeout(parameters),
    )


def _parameters(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = _object(doc.get("parameters", {}), "'parameters'")
    unknown = sorted(set(parameters) - _PARAMETERS)
    if unknown:
        raise _bad(
            f"unknown request parameter(s) {', '.join(unknown)}; this server reads {sorted(_PARAMETERS)}"
        )
    return parameters


def _inputs(bundle: Bundle, cut: int, doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The request's inputs in the order of the cut's tensors, each named once."""
    names = bundle.tensor_names(cut)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise _bad("'inputs' must be a list of tensors")
    given = {str(item.get("name")): item for item in (_object(i, "each input") for i in inputs)}
    if sorted(given) != sorted(names) or len(inputs) != len(names):
        specs = bundle.cuts[cut].tensors
        raise _bad(
            f"cut {cut} of {bundle.name!r} takes the inputs {', '.join(names)} "
            f"({', '.join(map(str, specs))}); got {', '.join(sorted(given)) or 'none'}"
        )
    return [(name, given[name]) for name in names]


def _declared_shape(name: str, item: Mapping[str, Any], spec: TensorSpec) -> tuple[int, ...]:
    shape = _shape(item.get("shape"), name)
    if item.get("datatype") != datatype(spec.dtype):
        raise _bad(f"input {name!r} must be {datatype(spec.dtype)}, got {item.get('datatype')!r}")
    if not spec.matches(TensorSpec(shape, spec.dtype)):
        want = [-1 if d is None else d for d in spec.shape]
        raise _bad(f"input {name!r} must have shape {want} (-1: any batch), got {list(shape)}")
    return shape


def _from_binary(
    binary: memoryview, offset: int, size: object, name: str, dtype: str, shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    """The input's array from its bytes in the binary part (little-endian, row-major)."""
    expected = math.prod(shape) * numpy_dtype(dtype).itemsize
    if size != expected or not isinstance(size, int) or isinstance(size, bool):
        raise _bad(f"input {name!r} ({datatype(dtype)}{list(shape)}) is {expected} bytes, not {size!r}")
    if offset + size > len(binary):
        raise _bad(f"the binary data ends before input {name!r} (shorter than its binary_data_size)")
    little = numpy_dtype(dtype).newbyteorder("<")
    arr = np.frombuffer(binary[offset : offset + size], dtype=little).reshape(shape)
    arr = arr.astype(little.newbyteorder("="))  # a copy, writable, in this machine's byte order
    if dtype == "bool":  # any non-zero byte is true; torch wants 0 or 1
        arr = arr.view(np.uint8) != 0
    return arr


def _request_id(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 256:
        raise _bad("'id' must be a string of at most 256 characters")
    return value


def _timeout(parameters: Mapping[str, Any]) -> float | None:
    """The ``timeout`` parameter (microseconds, as Triton's clients send it) in seconds."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad(f"parameter 'timeout' must be a positive number of microseconds, got {value!r}")
    return float(value) / 1e6


def _requested_outputs(
    bundle: Bundle, doc: Mapping[str, Any], parameters: Mapping[str, Any]
) -> list[tuple[int, bool]]:
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad("parameter 'binary_data_output' must be true or false")
    names = bundle.output_names()
    specs = bundle.cuts[bundle.last_cut].tensors
    requested = doc.get("outputs")
    if requested is None:
        return [_binary_check(i, names[i], specs[i], binary_default) for i in range(len(names))]
    if not isinstance(requested, list):
        raise _bad("'outputs' must be a list of {name, parameters}")
    out = []
    for item in requested:
        item = _object(item, "each requested output")
        name = item.get("name")
        if name not in names:
            raise _bad(f"{bundle.name!r} has the outputs {', '.join(names)}; no {name!r}")
        binary = _object(item.get("parameters", {}), f"parameters of output {name!r}").get(
            "binary_data", binary_default
        )
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: 'binary_data' must be true or false")
        index = names.index(name)
        out.append(_binary_check(index, name, specs[index], binary))
    return out


def _binary_check(index: int, name: str, spec: TensorSpec, binary: bool) -> tuple[int, bool]:
    if spec.dtype == "bfloat16" and not binary:
        raise _bad(f"output {name!r} is BF16, which travels as binary data only: ask for binary_data")
    return index, binary


# -- encoding an answer --------------------------------------------------------------------


def _raw(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    t = tensor.detach().contiguous()  # the compute thread copied the outputs to the host
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _json_data(arr: np.ndarray[Any, Any], name: str) -> list[Any]:
    """The values of ``arr`` as a flat JSON list; Problem (400) if one is NaN or infinite, which
    JSON cannot carry (the output is sent as binary data when the client asks for that)."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _bad(
            f"output {name!r} holds NaN or infinite values, which JSON cannot carry: ask for it as "
            "binary data (parameters: binary_data true, or binary_data_output)"
        )
    values: list[Any] = arr.reshape(-1).tolist()
    return values


def encode_answer(
    bundle: Bundle, version: str, request: InferRequest, outputs: Sequence[torch.Tensor]
) -> tuple[bytes, int | None]:
    """The response body for ``outputs``, and the length of its JSON part when binary data follows."""
    names = bundle.output_names()
    described, chunks = [], []
    for index, binary in request.outputs:
        tensor = outputs[index]
        arr = _raw(tensor)
        entry: dict[str, Any] = {
            "name": names[index],
            "datatype": datatype(TensorSpec.of(tensor).dtype),
            "shape": list(tensor.shape),
        }
        if binary:
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = _json_data(arr, names[index])
        described.append(entry)
    doc = {"model_name": bundle.name, "model_version": version, "outputs": described}
    if request.request_id:
        doc["id"] = request.request_id
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


# -- handlers: the /v2 adapter of the inference service ------------------------------------


def _served(request: web.Request) -> Served:
    """The version a request names (the newest when it names none); Problem 404 if not served."""
    return request.app[SERVICE].find(request.match_info["name"], request.match_info.get("version"))


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "splitinfer", "version": __version__, "extensions": list(EXTENSIONS)})


async def get_model(request: web.Request) -> web.Response:
    served = _served(request)
    versions = [s.version for s in request.app[STATE].repository.versions(served.name)]
    return web.json_response(model_metadata(served.bundle, versions))


async def get_config(request: web.Request) -> web.Response:
    """``GET /v2/models/{name}[/versions/{v}]/config``: Triton's model configuration."""
    served = _served(request)
    limit = request.app[STATE].config.max_batch_size
    return web.json_response(model_config(served.bundle, served.version, limit))


async def model_ready(request: web.Request) -> web.Response:
    served = _served(request)
    state = request.app[STATE]
    if not state.ready:
        raise Problem.unavailable("not_ready", "the server is draining")
    return web.json_response({"name": served.name, "version": served.version, "ready": True})


async def infer(request: web.Request) -> web.Response:
    """``POST /v2/models/{name}[/versions/{v}]/infer``: JSON (or binary tensors) in and out."""
    service = request.app[SERVICE]
    served = _served(request)
    call = Call(
        read=reader(request),
        parse=functools.partial(_parse, service, served, request.headers.get(HEADER_LENGTH)),
        declared_bytes=request.content_length,
        check=functools.partial(check_media, request, MEDIA_TYPES),
        hold=served,
    )
    result = await service.infer(call)
    headers = {**result.reply.headers, "Server-Timing": result.timing}
    return web.Response(body=result.reply.body, content_type=result.reply.content_type, headers=headers)


async def _parse(service: InferenceService, served: Served, header_length: str | None, body: bytes) -> Work:
    """The request in ``body`` as the service's work (parsed off the loop when large)."""
    limit = service.state.config.max_decoded_bytes
    parsed = await service.offload(len(body), parse_infer, served.bundle, body, header_length, limit)
    tensors = tuple(TensorSpec.of(t) for t in parsed.frontier)
    frame = Frame(parsed.cut, tensors, parsed.rows, parsed.request_id, frontier=parsed.frontier)
    respond = functools.partial(_respond, served, parsed)
    return Work(served, frame, respond, deadline_s=parsed.timeout_s, label=METRIC_CODEC)


def _respond(served: Served, parsed: InferRequest, answers: Sequence[Answer]) -> Reply:
    (answer,) = answers
    if answer.outputs is None:  # never: frames of /v2 keep their outputs as tensors
        raise Problem("internal", "the server lost the outputs; see its log")
    out, json_length = encode_answer(served.bundle, served.version, parsed, answer.outputs)
    if json_length is None:
        return Reply(out, "application/json")
    return Reply(out, "application/octet-stream", {HEADER_LENGTH: str(json_length)})


async def repository_index(request: web.Request) -> web.Response:
    """``POST /v2/repository/index``: every served model version (the repository extension)."""
    repo = request.app[STATE].repository
    index = [{"name": s.name, "version": s.version, "state": "READY"} for s in sorted(repo, key=_order)]
    return web.json_response(index)


def _order(served: Served) -> tuple[str, int, str]:
    return (served.name, int(served.version) if served.version.isdigit() else -1, served.version)


async def load_model(request: web.Request) -> web.Response:
    """``POST /v2/repository/models/{name}/load``: hot-reload one model from the repository."""
    state = request.app[STATE]
    name = request.match_info["name"]
    try:
        await reload_models(state.repository, state.pool, name)
    except BundleError as exc:
        raise Problem("bad_request", str(exc)) from None
    repo = state.repository
    served = [s.version for s in repo.versions(name)]
    refused = {v: why for (model, v), why in repo.errors.items() if model == name}
    if refused:
        why = "; ".join(f"version {v} was refused: {text}" for v, text in sorted(refused.items()))
        keeps = f"serving version(s) {', '.join(served)}" if served else "nothing of it is served"
        raise Problem("bad_request", f"model {name!r}: {why}; {keeps}")
    return web.json_response({"name": name, "versions": served})


async def unload_model(request: web.Request) -> web.Response:
    """``POST /v2/repository/models/{name}/unload``: stop serving a model (in-flight requests finish)."""
    state = request.app[STATE]
    name = request.match_info["name"]
    if not state.repository.unload(name):
        raise Problem("unknown_model", f"no model {name!r} is served here")
    return web.json_response({"name": name, "versions": []})


def add_routes(app: web.Application) -> None:
    """The /v2 routes (health stays with /v1's handlers)."""
    app.router.add_get("/v2", server_metadata)
    for prefix, suffix in (("/v2/models/{name}", ""), ("/v2/models/{name}/versions/{version}", "_version")):
        app.router.add_get(prefix, get_model)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_get(prefix + "/config", get_config)
        app.router.add_post(prefix + "/infer", infer, name="v2_infer" + suffix)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{name}/load", load_model)
    app.router.add_post("/v2/repository/models/{name}/unload", unload_model)
