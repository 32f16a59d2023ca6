"""splitinfer.partitioner: graph capture, cuts and segments, profiles, estimators and policies.

>>> bundle = compile(model, (torch.randn(1, 3, 224, 224),), name="mynet", calibration=images)
>>> bundle.profiles["host"] = profile_bundle(bundle)
>>> policy = make_policy("adaptive", bundle, fidelity_budget=0.99)
>>> decision = policy.decide(Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.08, device_slowdown=8))

docs/decision.md describes the cost model, the estimators and the policies.
"""

from splitinfer.partitioner._capture import compile
from splitinfer.partitioner._costs import EnergyModel
from splitinfer.partitioner._estimate import Estimates, Estimator
from splitinfer.partitioner._policy import Candidate, Decision, Explanation, Policy, make_policy
from splitinfer.partitioner._profile import profile_bundle

__all__ = [
    "Candidate",
    "Decision",
    "EnergyModel",
    "Estimates",
    "Estimator",
    "Explanation",
    "Policy",
    "compile",
    "make_policy",
    "profile_bundle",
]
