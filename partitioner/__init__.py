"""splitinfer.partitioner: graph capture, cuts and segments, profiles, estimators and policies.

>>> bundle = compile(model, (torch.randn(1, 3, 224, 224),), name="mynet", calibration=images)
>>> bundle.profiles["host"] = profile_bundle(bundle)
>>> policy = make_policy("adaptive", bundle, fidelity_budget=0.99)
>>> decision = policy.decide(Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.08, device_slowdown=8))

The decision side (estimator, cost model, policies) works from a :class:`splitinfer.Manifest`
and imports no torch; ``compile`` and ``profile_bundle`` load torch when first used.
docs/decision.md describes the cost model, the estimators and the policies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitinfer.partitioner._costs import CostModel, EnergyModel, latency_weights
from splitinfer.partitioner._estimate import Estimates, Estimator
from splitinfer.partitioner._hedge import hedge_after
from splitinfer.partitioner._policy import Candidate, Decision, Explanation, Policy, TablePolicy, make_policy
from splitinfer.partitioner._profiles import chain_times

if TYPE_CHECKING:
    from splitinfer.partitioner._capture import compile
    from splitinfer.partitioner._profiling import profile_bundle

__all__ = [
    "Candidate",
    "CostModel",
    "Decision",
    "EnergyModel",
    "Estimates",
    "Estimator",
    "Explanation",
    "Policy",
    "TablePolicy",
    "chain_times",
    "compile",
    "hedge_after",
    "latency_weights",
    "make_policy",
    "profile_bundle",
]


def __getattr__(name: str) -> Any:
    # The torch side of the partitioner, imported on first use so that deciding needs no torch.
    if name == "compile":
        from splitinfer.partitioner._capture import compile

        return compile
    if name == "profile_bundle":
        from splitinfer.partitioner._profiling import profile_bundle

        return profile_bundle
    raise AttributeError(f"module 'splitinfer.partitioner' has no attribute {name!r}")
