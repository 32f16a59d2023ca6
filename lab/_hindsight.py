"""The per-request hindsight oracle: what each candidate would really have cost on a known link.

Shared by the policy replay (``benchmarks/bench_policy.py``), the live demo and the end-to-end
benchmark (``splitinfer demo``, ``benchmarks/bench_e2e.py``). Given the bundle's cost model
(profiles and fidelity table), the true bandwidth trace and the true device slowdown, a
:class:`World` computes when a request arriving at trace time ``t`` would have ended with every
candidate; the oracle takes the allowed candidate of least realized latency.

>>> policy = make_policy("adaptive", bundle, fidelity_budget=0.99, explore=0.0)
>>> world = World(policy, Link.from_trace(trace), ds=20.0)
>>> latency, row = world.oracle(policy.rows, t=3.2, rtt=0.08)
>>> latency, row = world.causal(policy, t=3.2, rtt=0.08)

The *causal reference* (:meth:`World.causal`) is the policy itself told the truth at the
instant of each decision and nothing after it: the trace's rate at ``t`` (uplink and downlink),
the round trip, the queue and the device's slowdown, exactly (``uplink_sd`` 0), no exploration.
It splits adaptive's gap to the hindsight oracle in two: adaptive over causal is what the
estimator's lag and error cost (ours to close), causal over oracle what nobody can know at
``t`` (the link changing during the transfer).

A transfer of ``B`` bits started at ``t`` ends when the trace's cumulative capacity from ``t``
reaches ``B`` (uplink and downlink alike, as :class:`splitinfer.netem.LinkEmulator` with one
trace shapes them); device work is the profile's head and encode times the slowdown, cloud work
the profile's decode and tail times ``cloud_slowdown``, plus ``queue_s`` of queueing.

*Early exits* (docs/learning.md). A candidate whose cut has an exit on its way (the cost
model's ``exit_cut``) runs, as the edge does, the head to the exit and the exit's head; request
number ``request`` is then answered there, on the device, at ``(head(exit) + exit head) *
slowdown``, or goes on, paying the exit head beside the candidate's own path. Whether it
answers is the request's own, the same for every policy: with ``exit_outcomes`` (per exit cut,
whether each of a set of real held-out inputs exits), request ``j`` replays input ``j mod n``;
otherwise a uniform draw per request (seeded by ``exit_seed``) falls below the exit's rate. The
methods that take ``request`` price that; without it (or without exits) they price the path
that goes on, as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.errors import ConfigError
from splitinfer.netem import BandwidthTrace
from splitinfer.partitioner import Estimates, TablePolicy, hedge_after

__all__ = ["MIN_MBIT", "Link", "World", "kind_of"]

#: A trace's 0 is a link that barely moves, so transfers wait for it to recover.
MIN_MBIT = 1e-3


@dataclass
class Link:
    """A trace as cumulative capacity, tiled ``periods`` times so transfers may run past its end."""

    name: str
    duration: float
    knots: np.ndarray  # seconds
    cum_bits: np.ndarray
    times: np.ndarray  # the trace's own samples (one period)
    mbit: np.ndarray

    @classmethod
    def from_samples(
        cls, name: str, t: np.ndarray, mbit: np.ndarray, duration: float, periods: int = 3
    ) -> Link:
        t = np.asarray(t, dtype=float)
        r = np.maximum(np.asarray(mbit, dtype=float), MIN_MBIT)
        starts = np.concatenate([t + i * duration for i in range(periods)])
        rates = np.tile(r, periods) * 1e6
        ends = np.append(starts[1:], periods * duration)
        cum = np.concatenate([[0.0], np.cumsum(rates * (ends - starts))])
        return cls(name, duration, np.append(starts, periods * duration), cum, t, r)

    @classmethod
    def read(cls, path: Path) -> Link:
        """A ``<seconds> <Mbit/s>`` trace file."""
        data = np.loadtxt(path, ndmin=2)
        t = data[:, 0] - data[0, 0]
        step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
        return cls.from_samples(path.name, t, data[:, 1], float(t[-1] + step))

    @classmethod
    def from_trace(cls, trace: BandwidthTrace, horizon_s: float = 0.0) -> Link:
        """The link an emulator replaying ``trace`` (looped) offers, covering at least ``horizon_s``."""
        periods = max(3, int(np.ceil(horizon_s / trace.period)) + 2)
        return cls.from_samples(
            trace.name, np.array(trace.times), np.array(trace.rates_bps) / 1e6, trace.period, periods
        )

    def rate_at(self, t: float) -> float:
        """The trace's rate (bit/s) at ``t`` (within the first period)."""
        i = int(np.searchsorted(self.times, t, side="right")) - 1
        return float(self.mbit[max(i, 0)]) * 1e6

    def rate_now(self, t: float) -> float:
        """The rate (bit/s) at ``t`` on the tiled link (any ``t`` >= 0): what a perfect,
        lag-free estimator would report at that instant."""
        return self.rate_at(float(t) % self.duration)

    def rates_at(self, t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.times, t, side="right") - 1
        return self.mbit[np.maximum(i, 0)] * 1e6

    def done(self, start: np.ndarray | float, bits: np.ndarray | float) -> np.ndarray:
        """When a transfer of ``bits`` started at ``start`` ends."""
        c0 = np.interp(start, self.knots, self.cum_bits)
        return np.interp(c0 + bits, self.cum_bits, self.knots)


class World:
    """True costs of every candidate of one cost model over one link."""

    def __init__(
        self,
        policy: TablePolicy,
        link: Link,
        ds: float,
        rng: np.random.Generator | None = None,
        *,
        queue_s: float = 0.002,
        cloud_slowdown: float = 1.0,
        exit_outcomes: Mapping[int, Sequence[bool]] | None = None,
        exit_seed: int = 0,
    ):
        m = policy.model
        self.model = m
        self.link = link
        self.ds = ds
        self.rng = rng
        self.queue_s = queue_s
        self.cloud_slowdown = cloud_slowdown
        #: Per row, the device's seconds on the path that goes on (the exit head tried on the way
        #: included) and the cloud's: not the cost model's features, which mix in the exits.
        self.device_s = (m.head + m.encode + m.exit_time) * ds
        self.cloud_s = (m.decode + m.tail) * cloud_slowdown
        self.bits = np.nan_to_num(m.bytes) * 8
        self.response_bits = m.response_bytes * 8
        self.rows = {(int(m.cut[i]), m.codec(i)): i for i in range(len(m))}
        self.local = m.local
        self.head = m.head * ds
        #: Per row, its exit's cut (-1: none) and the seconds of a request answered there.
        self.exit_cut = m.exit_cut
        self.exit_s = (m.exit_head + m.exit_time) * ds
        self._rates = {int(e): float(r) for e, r in zip(m.exit_cut, m.exit_rate) if e >= 0}
        self._outcomes = {int(k): np.asarray(v, dtype=bool) for k, v in (exit_outcomes or {}).items()}
        for k, v in self._outcomes.items():
            if v.ndim != 1 or not v.size:
                raise ConfigError(f"exit_outcomes[{k}] must be a non-empty sequence of booleans")
        self._exit_rng = np.random.default_rng(exit_seed)
        self._draws = np.empty(0)

    def row(self, cut: int, codec: str) -> int:
        return self.local if cut == self.model.n else self.rows[(cut, codec)]

    def exited(self, request: int, row: int) -> bool:
        """Whether request number ``request`` is answered by the early exit on candidate
        ``row``'s way (False where the row has none)."""
        return bool(self.exits(request, np.array([row]))[0])

    def exits(self, request: int, rows: np.ndarray) -> np.ndarray:
        """Per row of ``rows``, whether request number ``request`` is answered by its early exit."""
        cuts = self.exit_cut[rows]
        out = np.zeros(len(cuts), dtype=bool)
        for e in np.unique(cuts[cuts >= 0]).tolist():
            outcomes = self._outcomes.get(e)
            if outcomes is not None:
                answers = bool(outcomes[request % len(outcomes)])
            else:
                answers = bool(self._draw(request) < self._rates[e])
            out[cuts == e] = answers
        return out

    def _draw(self, request: int) -> float:
        """Request ``request``'s uniform draw: the same whichever order requests are asked for."""
        while request >= len(self._draws):
            self._draws = np.append(self._draws, self._exit_rng.random(max(1024, len(self._draws))))
        return float(self._draws[request])

    def realize(self, row: int | np.ndarray, t: float, rtt: float) -> tuple[Any, Any, Any]:
        """(start of upload, first answer byte, end) of candidate(s) ``row`` arriving at ``t``."""
        start = t + self.device_s[row]
        up_done = self.link.done(start, self.bits[row])
        first = up_done + rtt + self.queue_s + self.cloud_s[row]
        end = self.link.done(first, self.response_bits)
        return start, first, end

    def latencies(self, rows: np.ndarray, t: float, rtt: float, request: int | None = None) -> np.ndarray:
        """Realized latency of each candidate in ``rows`` for a request arriving at ``t`` (request
        number ``request``: answered at an exit where its exit answers it)."""
        _, _, ends = self.realize(rows, t, rtt)
        went_on = np.where(rows == self.local, self.device_s[self.local], ends - t)
        if request is None or not self._rates:
            return went_on
        return np.where(self.exits(request, rows), self.exit_s[rows], went_on)

    def truth(self, t: float, rtt: float) -> Estimates:
        """What is true at ``t`` and known then: the link's rate now (both ways), the round trip,
        the queue, the slowdowns; exact (``uplink_sd`` 0)."""
        rate = max(self.link.rate_now(t), MIN_MBIT * 1e6)
        return Estimates(
            uplink_bps=rate,
            downlink_bps=rate,
            rtt_s=rtt,
            cloud_queue_s=self.queue_s,
            device_slowdown=self.ds,
            cloud_slowdown=self.cloud_slowdown,
        )

    def causal(
        self, policy: TablePolicy, t: float, rtt: float, *, hedged: bool = False, request: int | None = None
    ) -> tuple[float, int]:
        """The causal reference: ``policy`` deciding on :meth:`truth` at ``t`` (build it with
        ``explore=0``), and the realized latency of its choice, and its row. ``hedged``: the
        request finishes on the device once overdue, as a hedging edge's does; ``request``: its
        number, answered at the exit on the way where that exit answers it."""
        est = self.truth(t, rtt)
        d = policy.decide(est)
        row = self.row(d.cut, d.codec)
        if request is not None and self.exited(request, row):
            return float(self.exit_s[row]), row
        if row == self.local:
            return float(self.device_s[row]), row
        _, _, end = self.realize(row, t, rtt)
        latency = float(end) - t
        if hedged:
            local = (
                float(self.device_s[row])
                + hedge_after(d, est)
                + float(self.head[self.local] - self.head[row])
            )
            latency = min(latency, local)
        return latency, row

    def oracle(
        self, allowed: np.ndarray, t: float, rtt: float, request: int | None = None
    ) -> tuple[float, int]:
        """The least realized latency among ``allowed`` rows at ``t`` (of request number
        ``request``, see :meth:`latencies`), and its row."""
        realized = self.latencies(allowed, t, rtt, request)
        best = int(np.argmin(realized))
        return float(realized[best]), int(allowed[best])


def kind_of(cut: int, n: int) -> str:
    """``local`` (the last cut), ``cloud`` (cut 0) or ``split``."""
    return "local" if cut == n else ("cloud" if cut == 0 else "split")
