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

from splitinfer.partitioner._estimate import Estimates
from splitinfer.partitioner._policy import Decision

__all__ = ["CLOUD_STAGES", "cloud_seconds", "hedge_after"]

#: The stages of a prediction that happen after the frontier leaves the device.
CLOUD_STAGES = ("rtt", "uplink", "queue", "decode", "tail", "downlink")
#: Least log-sd of the cloud's time: what the cost model does not see.
MIN_SD = 0.25
#: Least seconds past the prediction before a hedge: timers, scheduling and the server's own
#: overhead are outside the cost model, and on a fast link they are most of a tiny prediction.
MIN_SLACK_S = 0.05


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
    share = decision.stages.get("uplink", 0.0) / cloud
    sd = max(min_sd, est.uplink_sd * share)
    return max(cloud * math.exp(NormalDist().inv_cdf(quantile) * sd), cloud + MIN_SLACK_S)
