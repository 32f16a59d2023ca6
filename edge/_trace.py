"""Trace: what happened to one request, built while it runs and frozen when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitinfer.partitioner import Decision

__all__ = ["Trace", "TraceBuilder"]


@dataclass(frozen=True)
class Trace:
    """What happened to one request (``client.ainfer(x, return_trace=True)`` returns it with the
    outputs; ``client.last_trace`` holds the latest, which concurrent requests overwrite).

    ``predicted`` holds the cost model's stages (``head``, ``encode``, ``rtt``, ``uplink``,
    ``queue``, ``decode``, ``tail``, ``downlink``; and ``hedge_after`` for a hedged request);
    ``stages`` the measured ones under the same keys where they can be measured: ``head`` and
    ``encode`` (on the device), ``queue``, ``decode`` and ``tail`` (on the cloud, from its
    ``Server-Timing``: queue, decode, compute), and ``link``, the wire's share (the request's time
    on the network less the cloud's own), which the link's three predicted stages add up to;
    :meth:`compared` pairs them. ``stages`` also holds ``network`` (request sent to answer read),
    ``response_decode`` (the answer's decode on the device), ``local_tail`` (a fallback's tail on
    the device), ``total`` and the raw ``Server-Timing`` stages, prefixed ``cloud_``. Seconds.

    A finished request's trace: the pipeline fills a :class:`TraceBuilder` while the request
    runs and freezes it into a Trace (its dicts are the trace's own copies) when it ends.
    """

    #: The request's id (also sent to the cloud).
    request_id: str
    #: The cut and codec the policy decided (the last cut and its codec: all on the device).
    cut: int
    codec: str
    #: Bytes of the request and of the answer on the wire (0, 0 when nothing was sent).
    bytes_up: int
    bytes_down: int
    #: Predicted seconds per stage, from the policy's cost model.
    predicted: dict[str, float] = field(default_factory=dict)
    #: Measured seconds per stage (see above).
    stages: dict[str, float] = field(default_factory=dict)
    #: Why the request finished on the device although the decision sent it to the cloud
    #: (``deadline``, ``backoff``, ``circuit_open`` before sending; ``timeout``, ``shed``,
    #: ``unreachable``, ``graph_mismatch``, ``bad_request``, ``cloud_error`` after trying;
    #: ``hedge``: its answer was overdue, see EdgeClient).
    fallback: str | None = None
    #: Whether the request was sent twice (a stale kept-alive connection).
    retried: bool = False
    #: Where the model's tail actually ran: ``"cloud"`` (from ``cut``, with ``codec``) or
    #: ``"device"`` (the decision was the last cut, or the request fell back).
    ran_on: str = "device"
    #: The early exit the request reached (docs/learning.md): its cut (None: none on its way)
    #: and whether it answered there (``exited``: nothing was sent, ``ran_on`` is the device).
    exit_cut: int | None = None
    exited: bool = False

    def compared(self) -> dict[str, tuple[float, float]]:
        """``{stage: (predicted, measured)}`` for every stage both hold (``link``: predicted
        as ``rtt + uplink + downlink``)."""
        predicted = dict(self.predicted)
        if "uplink" in predicted:
            predicted["link"] = sum(predicted.get(k, 0.0) for k in ("rtt", "uplink", "downlink"))
        keys = ("head", "encode", "link", "queue", "decode", "tail")
        return {k: (predicted[k], self.stages[k]) for k in keys if k in predicted and k in self.stages}


class TraceBuilder:
    """The mutable record of a request in progress; :meth:`build` freezes it into a Trace."""

    def __init__(self, request_id: str, decision: Decision, fallback: str | None):
        self.request_id = request_id
        self.cut = decision.cut
        self.codec = decision.codec
        self.predicted: dict[str, float] = dict(decision.stages)
        self.stages: dict[str, float] = {}
        self.fallback = fallback
        self.bytes_up = 0
        self.bytes_down = 0
        self.retried = False
        self.ran_on = "device"
        self.exit_cut: int | None = None
        self.exited = False

    def build(self) -> Trace:
        return Trace(
            self.request_id,
            self.cut,
            self.codec,
            self.bytes_up,
            self.bytes_down,
            dict(self.predicted),
            dict(self.stages),
            self.fallback,
            self.retried,
            self.ran_on,
            self.exit_cut,
            self.exited,
        )
