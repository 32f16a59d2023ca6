"""What the edge tells its operator: metrics, refusals counted, and logs that do not flood."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from splitinfer.edge._cloud_api import REFUSALS
from splitinfer.edge._metrics import EdgeMetrics
from splitinfer.edge._trace import Trace
from splitinfer.errors import CloudError
from splitinfer.partitioner import Decision, Estimates

__all__ = ["FALLBACK_LOG_EVERY_S", "Observer"]

log = logging.getLogger("splitinfer.edge")

#: Seconds between two log lines about requests that fell back for the same reason.
FALLBACK_LOG_EVERY_S = 10.0


class Observer:
    """Metrics (when a registry was given) and logs of one client's model ``model``."""

    def __init__(self, model: str, last_cut: int, metrics: EdgeMetrics | None):
        self.model = model
        self.last_cut = last_cut
        self.metrics = metrics
        #: Answers of the cloud that say this client is misconfigured, by kind (REFUSALS).
        self.refusals: Counter[str] = Counter()
        self.last_trace: Trace | None = None
        self._warned: set[str] = set()
        self._fallback_log: dict[str, tuple[float, int]] = {}

    def warn_once(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` at WARNING the first time ``key`` comes up."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def refused(self, status: int, what: str, exc: CloudError) -> None:
        """Count an answer that says this client is misconfigured; log its kind once."""
        kind = REFUSALS.get(status)
        if kind is None:
            return
        self.refusals[kind] += 1
        if self.metrics is not None:
            self.metrics.refusals.labels(model=self.model, kind=kind).inc()
        self.warn_once(
            kind,
            "the cloud refused a %s of model %r with HTTP %s (%s): %s. Further ones are counted "
            "(client.refusals) but not logged",
            what,
            self.model,
            status,
            kind,
            exc,
        )

    def fallback(self, reason: str, exc: Exception) -> None:
        """Log a request finished on the device, at most once per reason every few seconds."""
        now = time.monotonic()
        last, skipped = self._fallback_log.get(reason, (-FALLBACK_LOG_EVERY_S, 0))
        if now - last < FALLBACK_LOG_EVERY_S:
            self._fallback_log[reason] = (last, skipped + 1)
            return
        self._fallback_log[reason] = (now, 0)
        more = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning("model %r: a request finishes on the device (%s): %s%s", self.model, reason, exc, more)

    def probe(self, part: str, ok: bool) -> None:
        if self.metrics is not None:
            outcome = "ok" if ok else "failed"
            self.metrics.probes.labels(model=self.model, part=part, outcome=outcome).inc()

    def record(self, trace: Trace, decision: Decision, estimates: Callable[[], Estimates]) -> None:
        """A finished request: ``last_trace``, and the metrics (with the estimates now)."""
        self.last_trace = trace
        if self.metrics is None:
            return
        m, model = self.metrics, self.model
        m.decisions.labels(model=model, cut=str(trace.cut), codec=trace.codec).inc()
        m.latency.labels(model=model).observe(trace.stages["total"])
        if trace.fallback:
            m.fallbacks.labels(model=model, reason=trace.fallback).inc()
        elif trace.cut != self.last_cut and decision.predicted_s > 0 and not trace.exited:
            m.prediction_error.labels(model=model).observe(trace.stages["total"] / decision.predicted_s)
        if trace.retried:
            m.retries.labels(model=model, reason="stale_connection").inc()
        if trace.exit_cut is not None:
            outcome = "exited" if trace.exited else "went_on"
            m.exits.labels(model=model, cut=str(trace.exit_cut), outcome=outcome).inc()
        est = estimates()
        m.uplink.labels(model=model).set(est.uplink_bps / 8)
        m.rtt.labels(model=model).set(est.rtt_s)
