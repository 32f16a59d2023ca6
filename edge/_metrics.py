"""Edge metrics (DESIGN.md, "Metrics"), in a registry the app passes in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EdgeMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter(
            "splitinfer_edge_decisions",
            "Requests by the cut and codec chosen.",
            ["model", "cut", "codec"],
            registry=registry,
        )
        self.latency = Histogram(
            "splitinfer_edge_latency_seconds",
            "End-to-end latency of a request on the edge.",
            ["model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.prediction_error = Histogram(
            "splitinfer_edge_prediction_ratio",
            "Measured over predicted latency of requests served by the cloud.",
            ["model"],
            buckets=(0.25, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0),
            registry=registry,
        )
        self.uplink = Gauge(
            "splitinfer_edge_uplink_bytes_per_second",
            "Estimated uplink bandwidth.",
            ["model"],
            registry=registry,
        )
        self.rtt = Gauge(
            "splitinfer_edge_rtt_seconds", "Estimated round-trip time.", ["model"], registry=registry
        )
        self.fallbacks = Counter(
            "splitinfer_edge_fallbacks",
            "Requests finished on the device instead of the cloud, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.refusals = Counter(
            "splitinfer_edge_refusals",
            "Answers of the cloud that say the client is misconfigured (401, 403, 404, 409), by kind.",
            ["model", "kind"],
            registry=registry,
        )
        self.retries = Counter(
            "splitinfer_edge_retries",
            "Requests sent again, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.exits = Counter(
            "splitinfer_edge_exits",
            "Requests that reached an early exit, by its cut and whether it answered (exited) or went on.",
            ["model", "cut", "outcome"],
            registry=registry,
        )
        self.probes = Counter(
            "splitinfer_edge_link_probes",
            "Link probes sent because the estimates were stale, by part (rtt, upload) and outcome.",
            ["model", "part", "outcome"],
            registry=registry,
        )
