"""Tuning in hindsight on the oracle's links (:mod:`splitinfer.lab._hindsight`): the one static
(cut, codec) a deployment would ship, and the device slowdown at which neither end wins.

The demo (``splitinfer demo``) and the benchmarks (bench_policy.py, bench_e2e.py,
bench_shared_cloud.py) use these same two functions. Torch-free.

A link to tune on is a :class:`Link`, counted over its whole ``duration``, or a
``(link, seconds, label)`` triple (:func:`splitinfer.lab._demo.tuning_links` makes those),
counted over its first ``seconds``; :func:`tie_slowdown` also takes a trace and the seconds of it
that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from splitinfer.errors import ConfigError
from splitinfer.lab._hindsight import Link, World
from splitinfer.netem import BandwidthTrace
from splitinfer.partitioner import make_policy

if TYPE_CHECKING:
    from splitinfer.manifest import Manifest

__all__ = ["TuningLink", "choose_static", "tie_slowdown"]

#: A link and the seconds of it a request may arrive in (with a label), or a whole link.
TuningLink = Link | tuple[Link, float, str]

#: The round trip the demo's link emulation adds by default (twice its 40 ms one-way delay).
RTT_S = 0.08
#: make_policy's default fidelity budget.
BUDGET = 0.99


def _spans(links: Sequence[TuningLink], limit: int | None) -> list[tuple[Link, float]]:
    """(link, seconds) of at most ``limit`` of ``links``, evenly spaced."""
    if limit is not None:
        links = links[:: max(1, len(links) // limit)][:limit]
    return [(item, item.duration) if isinstance(item, Link) else (item[0], item[1]) for item in links]


def choose_static(
    bundle: Manifest,
    links: Sequence[TuningLink],
    ds: float,
    *,
    rtt_s: float = RTT_S,
    budget: float = BUDGET,
    accuracy_drop: float | None = None,
    interval_s: float = 0.2,
    limit: int | None = 24,
) -> tuple[int, str]:
    """The one (cut, codec) of least mean realized latency over ``links`` (a request every
    ``interval_s`` of each link's span; at most ``limit`` links, evenly spaced) on a device ``ds``
    times slower than the profile: a static configuration tuned before deployment, for a
    population of links, never on the run it is scored on unless that is the point
    (``static-hindsight``). ``budget``, or ``accuracy_drop`` where given: the rows allowed
    (make_policy's)."""
    policy = make_policy("adaptive", bundle, fidelity_budget=budget, accuracy_drop=accuracy_drop, explore=0.0)
    allowed = policy.rows
    total = np.zeros(len(allowed))
    for i, (link, span) in enumerate(_spans(links, limit)):
        world = World(policy, link, ds, np.random.default_rng(i))
        for t in np.arange(0.0, span, interval_s):
            total += world.latencies(allowed, float(t), rtt_s)
    row = int(allowed[int(np.argmin(total))])
    return int(policy.model.cut[row]), policy.model.codec(row)


def tie_slowdown(
    bundle: Manifest,
    links: BandwidthTrace | Sequence[TuningLink],
    *,
    duration_s: float | None = None,
    rtt_s: float = RTT_S,
    budget: float = BUDGET,
    accuracy_drop: float | None = None,
    interval_s: float = 0.2,
    steps: int = 3,
) -> float:
    """The device slowdown at which all-on-device ties with all-in-the-cloud in mean latency over
    ``links`` (or over the first ``duration_s`` of a trace).

    Local latency is ``head(n) * ds``; the cloud's barely depends on ``ds`` (only its encode runs
    on the device), so a few fixed-point steps suffice. Rounded to an integer, at least 1.
    The cloud sends what ``budget`` (or ``accuracy_drop`` where given) admits.
    """
    if isinstance(links, BandwidthTrace):
        if duration_s is None:
            raise ConfigError("tie_slowdown on a trace needs duration_s: the seconds of it that count")
        links = [(Link.from_trace(links, duration_s + 60), duration_s, links.name)]
    spans = _spans(links, None)
    cloud = make_policy("cloud", bundle, fidelity_budget=budget, accuracy_drop=accuracy_drop)
    head_n = float(make_policy("local", bundle).model.head[-1])
    ds = 32.0
    for _ in range(steps):
        worlds = [(World(cloud, link, ds), span) for link, span in spans]
        mean = float(
            np.mean(
                [
                    world.latencies(cloud.rows, float(t), rtt_s).min()
                    for world, span in worlds
                    for t in np.arange(0.0, span, interval_s)
                ]
            )
        )
        ds = max(1.0, mean / head_n)
    return float(max(1, round(ds)))
