"""Server metrics (DESIGN.md, "Metrics"), registered in a registry that is passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["ServerMetrics"]

# Latency buckets from 0.5 ms to 10 s: tails run from sub-millisecond to seconds.
_LATENCY_BUCKETS = (
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


class ServerMetrics:
    """The cloud's metrics; labels stay low-cardinality (model, cut, codec, stage, code)."""

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
            "Server-side time per request, by stage (queue, decode, compute, encode).",
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
        build = Gauge(
            "splitinfer_build_info",
            "Constant 1, labelled with the splitinfer version.",
            ["version"],
            registry=registry,
        )
        build.labels(version=version).set(1)

    def observe_request(
        self, model: str, cut: int, codec: str, stages: dict[str, float], nbytes: int
    ) -> None:
        for stage, seconds in stages.items():
            self.duration.labels(model=model, stage=stage).observe(seconds)
        self.payload.labels(model=model, cut=str(cut), codec=codec).observe(nbytes)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
