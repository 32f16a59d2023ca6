"""The cloud's API as the edge sees it: paths, answers to errors, answers to outputs and stage
times. It speaks through a :class:`~splitinfer.edge.Transport` and knows nothing of decisions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from splitinfer import protocol
from splitinfer.compression import get_codec
from splitinfer.edge._transport import Transport, TransportResponse
from splitinfer.errors import (
    AuthError,
    CloudError,
    CloudTimeoutError,
    CloudUnavailableError,
    CodecError,
    GraphMismatchError,
    ProtocolError,
    RemoteRequestError,
)
from splitinfer.manifest import Manifest

__all__ = [
    "LINK_PROBE_PATH",
    "MAX_RETRY_AFTER_S",
    "METADATA_TIMEOUT_S",
    "REFUSALS",
    "Answer",
    "CloudAPI",
    "fallback_reason",
    "retry_after_s",
]

#: The server's endpoint for link probes (cloud/_handlers.py, ``link_probe``).
LINK_PROBE_PATH = "/v1/link-probe"
READY_PATH = "/v2/health/ready"
#: How often the check on entering asks the server before a graph mismatch raises.
MISMATCH_ASKS = 8
#: Seconds the model metadata check (on entering, on warm-up) may take.
METADATA_TIMEOUT_S = 5.0
#: The longest Retry-After the client honours (a cloud asking for more is asked again then).
MAX_RETRY_AFTER_S = 300.0
#: Answers that mean the client is misconfigured, not that the cloud is unwell: logged at
#: WARNING once per kind and counted (``EdgeClient.refusals``).
REFUSALS = {401: "unauthorized", 403: "forbidden", 404: "unknown_model", 409: "graph_mismatch"}


@dataclass(frozen=True)
class Answer:
    """A decoded answer: the outputs (flat, every model's in turn), how many each model has
    (by name; empty from a one-model request), and the cloud's stage times (seconds)."""

    outputs: tuple[Any, ...]
    models: tuple[tuple[str, int], ...]
    server_timing: dict[str, float]


def infer_path(model: str) -> str:
    return f"/v1/models/{quote(model, safe='')}/infer"


def metadata_path(model: str) -> str:
    return f"/v1/models/{quote(model, safe='')}"


def error_of(resp: TransportResponse) -> CloudError:
    """The error an answer other than 200 stands for."""
    return protocol.error_from_problem(resp.status, resp.body, resp.headers.get("Retry-After"))


def retry_after_s(exc: Exception) -> float | None:
    """Seconds the cloud asked to be left alone (capped at :data:`MAX_RETRY_AFTER_S`), or None."""
    if isinstance(exc, CloudUnavailableError) and exc.retry_after_s:
        return min(exc.retry_after_s, MAX_RETRY_AFTER_S)
    return None


def fallback_reason(exc: Exception) -> str:
    """A low-cardinality label for why the cloud could not serve a request."""
    code = exc.code if isinstance(exc, CloudError | ProtocolError) else None
    if code == "graph_mismatch":
        return "graph_mismatch"
    if code == "head_not_shared":
        return "tasks_refused"
    if code in ("overloaded", "not_ready"):
        return "shed"
    if code in ("deadline_exceeded", "deadline") or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "unreachable"
    if isinstance(exc, RemoteRequestError | ProtocolError | CodecError):
        return "bad_request"
    return "cloud_error"


def link_stages(server_timing: dict[str, float], network_s: float) -> dict[str, float]:
    """The trace's stages from an answer's Server-Timing and the request's time on the network:
    the raw ones (``cloud_*``), ``queue``, ``decode``, ``tail`` and the wire's share ``link``."""
    stages = {f"cloud_{k}": v for k, v in server_timing.items()}
    for ours, theirs in (("queue", "queue"), ("decode", "decode"), ("tail", "compute")):
        if theirs in server_timing:
            stages[ours] = server_timing[theirs]
    own = server_timing.get("total", sum(v for k, v in server_timing.items() if k != "total"))
    stages["link"] = max(0.0, network_s - own)
    return stages


class CloudAPI:
    """The cloud's endpoints over ``transport``; ``url`` names the cloud in messages."""

    def __init__(self, transport: Transport, url: str):
        self.transport = transport
        self.url = url

    async def post_frame(self, model: str, body: bytes, timeout_s: float | None) -> TransportResponse:
        headers = {"Content-Type": protocol.FRAME_CONTENT_TYPE}
        return await self.transport.post(infer_path(model), body, headers, timeout_s)

    async def post_probe(self, body: bytes, timeout_s: float) -> TransportResponse:
        return await self.transport.post(LINK_PROBE_PATH, body, {}, timeout_s)

    @staticmethod
    def read_answer(resp: TransportResponse, numpy: bool) -> Answer:
        """The outputs of a 200 answer (numpy arrays with ``numpy``, else torch tensors)."""
        rheader, rpayload = protocol.decode_response(resp.body)
        codec = get_codec(rheader.codec)
        decode = codec.decode_numpy if numpy else codec.decode
        outputs = decode(rpayload, max_nbytes=sum(s.nbytes() for s in rheader.tensors))
        timing = protocol.parse_server_timing(resp.headers.get("Server-Timing"))
        return Answer(tuple(outputs), tuple(rheader.models), timing)

    async def ready(self) -> bool:
        """Whether the server answers ``GET /v2/health/ready`` with 200."""
        try:
            resp = await self.transport.get(READY_PATH, METADATA_TIMEOUT_S)
        except CloudError:
            return False
        return resp.status == 200

    async def model_metadata(self, bundle: Manifest) -> dict[str, Any]:
        """The server's description of ``bundle``'s model, checked against it (see
        EdgeClient.amodel_metadata for the errors)."""
        name, ours = bundle.name, bundle.graph_hash
        resp = await self.transport.get(metadata_path(name), METADATA_TIMEOUT_S)
        if resp.status in (401, 403):
            exc = protocol.error_from_problem(resp.status, resp.body)
            raise AuthError(
                f"{exc}; check the client's token= (the server's --token-file lists the valid ones)",
                code=exc.code,
                status=resp.status,
            )
        if resp.status == 404:
            raise RemoteRequestError(
                f"the cloud at {self.url} hosts no model {name!r} (this client's bundle: graph {ours}): "
                "serve this bundle there (splitinfer serve --repository <its parent directory>), "
                "or point the client at a server that hosts it",
                code="unknown_model",
                status=404,
            )
        if resp.status != 200:
            raise error_of(resp)
        try:
            doc = json.loads(resp.body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ProtocolError(f"the cloud at {self.url} describes model {name!r} with something not JSON")
        # A server with several versions routes each frame by its graph hash (docs/server.md,
        # "Model versions and hot reload"): any served version's hash is this client's to use.
        versions = doc.get("versions")
        served = (
            {v.get("graph_hash") for v in versions if isinstance(v, dict)}
            if isinstance(versions, list)
            else set()
        )
        theirs = doc.get("graph_hash")
        if theirs != ours and ours not in served:
            raise GraphMismatchError(
                f"the cloud's model {name!r} has graph {theirs}, this client's bundle has graph {ours}: "
                "load the same bundle on the edge and the cloud",
                code="graph_mismatch",
                status=409,
            )
        return doc

    async def check_model(self, bundle: Manifest, warn: Callable[..., None]) -> dict[str, Any] | None:
        """The metadata check on entering and on warm-up: the server's description of the model,
        or None when the cloud cannot be reached yet (it may come later; logged once through
        ``warn(key, message, *args)``). A misconfiguration raises. Behind a load balancer during
        a rolling update one replica may serve another graph: a mismatch raises only when
        :data:`MISMATCH_ASKS` answers in a row disagree."""
        try:
            for ask in range(MISMATCH_ASKS):
                try:
                    return await self.model_metadata(bundle)
                except GraphMismatchError as exc:
                    if ask == MISMATCH_ASKS - 1:
                        raise
                    warn(
                        "partial_mismatch",
                        "%s (asking again: behind a load balancer another replica may serve this "
                        "graph; the requests a mismatching replica gets finish on the device)",
                        exc,
                    )
        except (CloudUnavailableError, CloudTimeoutError) as exc:
            warn(
                "unreachable",
                "cannot check model %r with the cloud at %s yet (%s); requests finish on the device "
                "until it answers",
                bundle.name,
                self.url,
                exc,
            )
        return None
