"""Server metrics (DESIGN.md, "Metrics"), registered in a registry that is passed in.

Names carry the ``splitinfer_`` prefix and base units; labels stay low-cardinality (model,
cut, codec, stage, code, reason). A model name that the server does not host is counted as
``_unknown``, so a client cannot grow the label set.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["REJECTION_CODES", "ServerMetrics"]

#: Problem codes counted as rejections: requests refused by a limit or a policy, not by a bug.
REJECTION_CODES = frozenset(
    {
        "overloaded",
        "not_ready",
        "too_large",
        "unauthorized",
        "forbidden",
        "deadline_exceeded",
        "request_timeout",
        "bad_request",
    }
)
STAGES = ("receive", "queue", "decode", "compute", "encode", "total")

# Latency buckets from 0.1 ms to 10 s: tails run from sub-millisecond to seconds.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BYTES_BUCKETS = tuple(float(4**i) for i in range(4, 15))
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class ServerMetrics:
    """The cloud's metrics, all in ``registry``."""

    def __init__(self, registry: CollectorRegistry, version: str):
        self.registry = registry
        self.requests = Counter(
            "splitinfer_requests",
            "Inference requests answered, by model and problem code ('ok' for success).",
            ["model", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "splitinfer_request_duration_seconds",
            "Server-side seconds per successful request, by stage (receive: reading the body; queue, "
            "decode, compute, encode; total: from the body's last byte); compute is the time of the "
            "batch the request ran in.",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.payload = Histogram(
            "splitinfer_request_payload_bytes",
            "Bytes of request bodies, by model, cut and codec.",
            ["model", "cut", "codec"],
            buckets=_BYTES_BUCKETS,
            registry=registry,
        )
        self.response = Histogram(
            "splitinfer_response_payload_bytes",
            "Bytes of inference response bodies, by model.",
            ["model"],
            buckets=_BYTES_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "splitinfer_batch_size",
            "Rows (samples along dim 0) per computed batch, by model.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.shared_batches = Counter(
            "splitinfer_shared_batches",
            "Batches in which this model's requests ran through segments shared with other models' "
            "requests (computed once for all of them), by model.",
            ["model"],
            registry=registry,
        )
        self.rejections = Counter(
            "splitinfer_rejections",
            "Requests refused by a limit or policy, by reason (overloaded, not_ready, too_large, "
            "unauthorized, forbidden, deadline_exceeded, request_timeout, bad_request).",
            ["reason"],
            registry=registry,
        )
        self.inflight = Gauge(
            "splitinfer_inflight_requests",
            "Inference requests admitted and not yet answered (the autoscaling signal).",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "splitinfer_queue_depth",
            "Requests admitted but not yet computing (arriving or waiting for a batch).",
            registry=registry,
        )
        self.ready = Gauge(
            "splitinfer_ready",
            "1 while the server accepts requests, 0 while loading or draining.",
            registry=registry,
        )
        self.model_loads = Counter(
            "splitinfer_model_loads",
            "Attempts to load a model version from the repository, by model and result (ok, failed: "
            "the version is refused and what was served before keeps serving; see the log).",
            ["model", "result"],
            registry=registry,
        )
        build = Gauge(
            "splitinfer_build_info",
            "Constant 1, labelled with the versions this server runs.",
            ["version", "torch", "python"],
            registry=registry,
        )
        build.labels(version=version, torch=_torch_version(), python=platform.python_version()).set(1)

    def bind(
        self, inflight: Callable[[], float], waiting: Callable[[], float], ready: Callable[[], float]
    ) -> None:
        """Read the gauges from the running server at scrape time (no cost per request)."""
        self.inflight.set_function(inflight)
        self.queue_depth.set_function(waiting)
        self.ready.set_function(ready)

    def observe_answer(self, model: str, code: str) -> None:
        self.requests.labels(model=model, code=code).inc()
        if code in REJECTION_CODES:
            self.rejections.labels(reason=code).inc()

    def observe_success(
        self, model: str, cut: int, codec: str, stages: dict[str, float], nbytes_in: int, nbytes_out: int
    ) -> None:
        for stage, seconds in stages.items():
            self.duration.labels(model=model, stage=stage).observe(seconds)
        self.payload.labels(model=model, cut=str(cut), codec=codec).observe(nbytes_in)
        self.response.labels(model=model).observe(nbytes_out)

    def observe_load(self, model: str, version: str, ok: bool) -> None:
        self.model_loads.labels(model=model, result="ok" if ok else "failed").inc()

    def observe_batch(self, model: str, cut: int, rows: int, models: int = 1) -> None:
        self.batch_size.labels(model=model).observe(rows)
        if models > 1:
            self.shared_batches.labels(model=model).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _torch_version() -> str:
    """The installed torch's version, read without importing it ("" in a torch-free install)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""
