"""How sure a fidelity row is: its interval at a confidence level, and whether a budget admits it.

Torch-free (the policies use it). A fidelity row (docs/bundle-format.md) carries its point
estimate ``fidelity`` and the number of inputs ``n`` it was measured on; the bounds are computed
here from those at whatever ``confidence`` the caller asks for, so that a policy can use another
level than the one the table was printed at:

- top-1 agreement (0/1 per input): the **Wilson score interval** (right at 0 and 1, where the
  normal approximation collapses to a point);
- cosine similarity (a mean of values in [-1, 1]): the normal approximation with the row's
  per-input standard deviation ``sd``;
- accuracy drop (paired: the float model and the codec judged on the same labelled inputs):
  the **Agresti-Min** interval for a difference of paired proportions (the adjusted Wald
  interval with half an input added to each discordant cell), from ``lost`` (inputs the float
  model gets right and the codec wrong) and ``gained`` (the reverse).

``confidence`` is one-sided: a row is admitted only where its lower bound (for an accuracy drop,
its upper bound) meets the budget, and that bound holds with probability ``confidence``. The
interval ``[lo, hi]`` stored in a table has a bound at ``confidence`` on each side (a two-sided
interval of level ``2 * confidence - 1``). With no miss in ``n`` inputs the Wilson lower bound
is ``n / (n + z^2)``: at the default 0.95 (z = 1.645) showing 0.99 takes at least 268 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

__all__ = [
    "DEFAULT_CONFIDENCE",
    "INTERVAL_METHODS",
    "drop_interval",
    "inputs_to_decide",
    "mean_interval",
    "row_bounds",
    "wilson",
    "z_of",
]

#: One-sided confidence of the bound a policy admits rows on (docs/fidelity.md says why).
DEFAULT_CONFIDENCE = 0.95
#: The interval each kind of figure gets (recorded in the fidelity table).
INTERVAL_METHODS = {"top1": "wilson", "cosine": "normal", "accuracy_drop": "agresti-min"}


def z_of(confidence: float) -> float:
    """The standard normal quantile of a one-sided ``confidence`` (0.5 < confidence < 1)."""
    if not (isinstance(confidence, int | float) and 0.5 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0.5, 1), got {confidence!r}")
    return NormalDist().inv_cdf(float(confidence))


def wilson(p: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score bounds of a proportion ``p`` observed on ``n`` inputs ((0, 1) for n = 0)."""
    if n <= 0:
        return (0.0, 1.0)
    z = z_of(confidence)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(
    mean: float, sd: float, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Normal-approximation bounds of a mean of cosine similarities, clipped to [-1, 1]."""
    if n <= 0:
        return (-1.0, 1.0)
    half = z_of(confidence) * sd / math.sqrt(n)
    return (max(-1.0, mean - half), min(1.0, mean + half))


def drop_interval(
    lost: int, gained: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Agresti-Min bounds of an accuracy drop ``(lost - gained) / n`` on ``n`` paired inputs."""
    if n <= 0:
        return (-1.0, 1.0)
    b, c, m = lost + 0.5, gained + 0.5, n + 2.0
    d = (b - c) / m
    var = ((b + c) - (b - c) ** 2 / m) / (m * m)
    half = z_of(confidence) * math.sqrt(max(var, 0.0))
    return (max(-1.0, d - half), min(1.0, d + half))


def row_bounds(
    row: Mapping[str, Any], metric: str, confidence: float, default_n: int | None = None
) -> tuple[float, float] | None:
    """The bounds of a fidelity row's agreement at ``confidence``: from its ``n`` (else
    ``default_n``, the table's ``samples``), else the ``interval`` it stores (tables before
    issue 28 have no ``n``; theirs is a 95 % two-sided one), else None (unknown)."""
    n = row.get("n", default_n)
    p = float(row["fidelity"])
    if isinstance(n, int) and n > 0:
        if metric == "cosine":
            sd = row.get("sd")
            if isinstance(sd, int | float):
                return mean_interval(p, float(sd), n, confidence)
        else:
            return wilson(p, n, confidence)
    span = row.get("interval")
    if isinstance(span, list | tuple) and len(span) == 2:
        return (float(span[0]), float(span[1]))
    return None


def inputs_to_decide(
    p: float, budget: float, confidence: float = DEFAULT_CONFIDENCE, sd: float | None = None
) -> int | None:
    """How many inputs would decide a row whose estimate ``p`` stays as measured: the fewest
    ``n`` whose bounds at ``confidence`` no longer contain ``budget``. None where no number can
    (``p`` equal to the budget). ``sd`` given: a mean of cosines, else a proportion."""
    if p == budget:
        return None
    if sd is not None:
        return max(1, math.ceil((z_of(confidence) * sd / abs(p - budget)) ** 2))

    def decided(n: int) -> bool:
        lo, hi = wilson(p, n, confidence)
        return lo >= budget if p > budget else hi < budget

    hi = 1
    while not decided(hi):
        hi *= 2
        if hi > 10**9:
            return None
    lo = hi // 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if decided(mid):
            hi = mid
        else:
            lo = mid
    return hi
