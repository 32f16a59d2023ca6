"""Hedged requests: when a sent request's answer is overdue, finish it on the device.

A request sent at cut ``k`` leaves its frontier on the device. From the moment it is sent,
the edge knows two things: what the cloud is still predicted to take (the decision's stages
after the device's: round trip, upload, queue, decode, tail, download) and what finishing on
the device would take (the device's tail from cut ``k``: :attr:`Decision.finish_s`). While
the answer is on schedule, waiting is cheaper; once it is later than the prediction's own
upper bound, the prediction has failed (the link dropped, the cloud is swamped) and nothing
the estimator knows says how much longer it will be, so every further moment without a
local start may be lost. :func:`hedge_after` is that bound: the ``quantile`` (95 % by default)
of the cloud's time if its logarithm is normal around the prediction with the spread the
estimator currently sees (:attr:`Estimates.uplink_sd`, scaled by the upload's share of the
cloud time, and never below ``min_sd``: round-trip jitter and queueing the model does not
see), and at least :data:`MIN_SLACK_S` past the prediction. Past it the device starts the
tail; the first of the two answers is used and the other ignored. So a hedged request costs
at most about ``spent + hedge_after + finish_s``.

Why not the textbook rule (hedge when the expected residual time ``E[R - h | R > h]`` exceeds
the local finish)? Under a log-normal ``R`` with the spreads seen on real links (log-sd 0.1 to
0.5), that residual stays below the prediction for tens of predictions: the rule would never
fire, while the failures that make hedging worth it (a link that stalls) are not log-normal.

Everything here is plain arithmetic on floats: torch-free, and not called by ``decide``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

from splitinfer.partitioner._estimate import Estimates

if TYPE_CHECKING:
    from splitinfer.partitioner._policy import Decision

__all__ = ["CLOUD_STAGES", "cloud_seconds", "expected_hedged", "hedge_after", "hedge_seconds", "max_saving"]

#: The stages of a prediction that happen after the frontier leaves the device.
CLOUD_STAGES = ("rtt", "uplink", "queue", "decode", "tail", "downlink")
#: Least log-sd of the cloud's time: what the cost model does not see.
MIN_SD = 0.25
#: Least seconds past the prediction before a hedge: timers, scheduling and the server's own
#: overhead are outside the cost model, and on a fast link they are most of a tiny prediction.
MIN_SLACK_S = 0.05
#: The default quantile's z-score.
Z95 = NormalDist().inv_cdf(0.95)
_SQRT2 = math.sqrt(2.0)


def cloud_seconds(decision: Decision) -> float:
    """Predicted seconds from sending ``decision``'s frontier to its answer (0 at the last cut)."""
    return sum(decision.stages.get(s, 0.0) for s in CLOUD_STAGES)


def hedge_after(
    decision: Decision, est: Estimates, *, quantile: float = 0.95, min_sd: float = MIN_SD
) -> float:
    """Seconds after sending at which a request still unanswered is finished on the device.

    ``inf`` when the decision sends nothing, or the device cannot finish it (``finish_s`` is
    NaN). See the module docstring.
    """
    cloud = cloud_seconds(decision)
    if cloud <= 0 or not math.isfinite(decision.finish_s):
        return math.inf
    z = Z95 if quantile == 0.95 else NormalDist().inv_cdf(quantile)
    return hedge_seconds(cloud, decision.stages.get("uplink", 0.0), est.uplink_sd, z=z, min_sd=min_sd)


def hedge_seconds(
    cloud_s: float, uplink_s: float, uplink_sd: float, *, z: float = Z95, min_sd: float = MIN_SD
) -> float:
    """:func:`hedge_after` from numbers: ``cloud_s`` predicted from sending to the answer, of
    which ``uplink_s`` is the upload, under the uplink's log-sd ``uplink_sd``."""
    sd = max(min_sd, uplink_sd * uplink_s / cloud_s)
    return max(cloud_s * math.exp(z * sd), cloud_s + MIN_SLACK_S)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


def expected_hedged(cloud_s: float, uplink_s: float, finish_s: float, uplink_sd: float) -> float:
    """The expected seconds from sending to the first answer of a hedged request.

    The cloud's time ``C`` is log-normal with mean ``cloud_s`` (the prediction: the cost model's
    uplink is the rate that predicts the expected transfer time) and the log-sd the hedge uses
    (the uplink's, scaled by the upload's share, at least :data:`MIN_SD`); past
    ``h = hedge_seconds(...)`` the device finishes in ``finish_s``, so the answer comes at
    ``min(C, h + finish_s)``. Its expectation is ``E[C] - E[(C - cap)^+]`` with ``cap = h + finish_s``:
    ``cloud_s * (1 - Phi(d1)) + cap * Phi(d2)`` with ``d2 = (mu - ln cap) / s``, ``d1 = d2 + s``
    (the Black-Scholes call price). Never above ``cloud_s``.
    """
    if cloud_s <= 0:
        return cloud_s
    s = max(MIN_SD, uplink_sd * uplink_s / cloud_s)
    cap = max(cloud_s * math.exp(Z95 * s), cloud_s + MIN_SLACK_S) + finish_s
    d2 = (math.log(cloud_s / cap) - 0.5 * s * s) / s
    saving = cloud_s * _phi(d2 + s) - cap * _phi(d2)
    return cloud_s - max(0.0, saving)


def max_saving(uplink_sd: float) -> float:
    """An upper bound on ``1 - expected_hedged(...) / cloud_s`` for any candidate under
    ``uplink_sd``: the saving with no local finish at all (``finish_s = 0``), at the largest log-sd
    a candidate can have. A candidate whose unhedged cost is above the best's by more than this
    share cannot win once the hedge is priced."""
    s = max(MIN_SD, uplink_sd)
    cap = math.exp(Z95 * s)
    d2 = (-math.log(cap) - 0.5 * s * s) / s
    return max(0.0, _phi(d2 + s) - cap * _phi(d2))
