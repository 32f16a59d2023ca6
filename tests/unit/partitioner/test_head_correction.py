"""Per-cut head correction (issue 28 item 5, the edge half): a profile wrong per segment stops
costing once the heads the device runs are observed, where one device scalar cannot fix it."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from splitinfer.errors import ConfigError
from splitinfer.partitioner import CostModel, Estimates, Estimator, Policy, make_policy
from tests.unit.partitioner.test_policy import make_bundle

# The cloud is nearly free, so only the head (the device) and the upload decide: the true best
# cut is 2 (131 ms); a profile 3x wrong per segment, alternately too low and too high, prices
# cut 3 best, and a device scalar learnt from the whole model (the warm-up) still does (166 ms).
TRUE = [0.023, 0.016, 0.047, 0.054, 0.057, 0.054, 0.035, 0.014]
WRONG = [s * (3.0 if i % 2 else 1 / 3) for i, s in enumerate(TRUE)]
NBYTES = [120066, 100546, 57691, 45895, 42640, 41143, 18491, 1929, 1874]
LINK = Estimates(uplink_bps=8e6, downlink_bps=8e6, rtt_s=0.03, cloud_slowdown=0.001)
N = len(TRUE)


def bundle(seg: list[float]):
    return make_bundle(
        seg,
        NBYTES,
        ["f32"],
        {(k, "f32"): (1.0, NBYTES[k]) for k in range(N)},
        {(k, "f32"): (0.0, 0.0, NBYTES[k]) for k in range(N)},
    )


def true_latency() -> np.ndarray:
    """Per cut (one codec: rows are cuts), the latency on the true device and link."""
    return CostModel(bundle(TRUE)).stage_matrix(LINK).sum(axis=1)


def head(k: int) -> float:
    return sum(TRUE[:k])


def warmed(**kwargs: object) -> Estimator:
    """An estimator on the wrong profile that has seen the warm-up at the last cut."""
    est = Estimator(bundle(WRONG), prior=LINK, **kwargs)  # type: ignore[arg-type]
    est.observe_head(N, head(N), now=0.0)
    return est


def run(est: Estimator, policy: Policy, requests: int) -> list[int]:
    """The cuts ``policy`` chooses for ``requests`` requests, each head observed (10 % noise)."""
    rng = random.Random(0)
    cuts = []
    for _ in range(requests):
        d = policy.decide(est.estimates(0.0))
        cuts.append(d.cut)
        est.observe_head(d.cut, head(d.cut) * math.exp(rng.gauss(0.0, 0.1)), now=0.0)
    return cuts


@pytest.mark.parametrize("explore", [0.0, 0.05])
def test_decisions_move_to_the_best_cut_within_a_few_dozen_heads(explore: float):
    lat = true_latency()
    best = int(lat.argmin())
    est, policy = warmed(), make_policy("adaptive", bundle(WRONG), explore=explore, seed=0)
    scalar_only = policy.decide(replace(est.estimates(0.0), head_slowdown=())).cut
    assert scalar_only != best and lat[scalar_only] > 1.2 * lat[best]  # the scalar cannot fix it
    cuts = run(est, policy, 40)
    assert cuts[-20:].count(best) >= 20 - 20 * explore * 2, cuts  # exploration aside


def test_without_optimism_a_cut_the_neighbours_overprice_is_not_tried():
    """Why unobserved cuts are priced optimistically: interpolation alone settles on cut 0."""
    lat = true_latency()
    est, policy = warmed(head_optimism=0.0), make_policy("adaptive", bundle(WRONG), explore=0.0)
    cuts = run(est, policy, 40)
    assert int(lat.argmin()) not in cuts and lat[cuts[-1]] > 1.1 * lat.min()


def test_an_observed_cut_is_priced_at_its_own_ratio_shrunk_toward_the_device():
    est = Estimator(bundle(WRONG), prior=replace(LINK, device_slowdown=1.5), head_prior_n=1.0)
    assert est.estimates(0.0).head_slowdown == ()  # nothing observed: the scalar prices every head
    profiled = sum(WRONG[:3])
    est.observe_head(3, 2.0 * profiled, now=0.0, device=False)
    factors = est.head_slowdowns()
    assert est.estimates(0.0).device_slowdown == 1.5  # device=False: the scalar is fed elsewhere
    assert factors[3] == pytest.approx(math.exp((math.log(2.0) + math.log(1.5)) / 2))
    for _ in range(30):
        est.observe_head(3, 2.0 * profiled, now=0.0, device=False)
    assert est.head_slowdowns()[3] == pytest.approx(2.0, rel=0.02)


def test_unobserved_cuts_borrow_from_their_observed_neighbours():
    prof = [sum(WRONG[:k]) for k in range(N + 1)]
    c2, c5 = 2.0 * prof[2], 4.0 * prof[5]
    for optimism in (0.0, 0.5):
        est = Estimator(
            bundle(WRONG),
            prior=replace(LINK, device_slowdown=1.5),
            head_prior_n=0.0,
            head_optimism=optimism,
        )
        est.observe_head(2, c2, now=0.0, device=False)
        est.observe_head(5, c5, now=0.0, device=False)
        f = est.head_slowdowns()
        assert f[2] * prof[2] == pytest.approx(c2) and f[5] * prof[5] == pytest.approx(c5)
        assert f[1] == pytest.approx(2.0 * (1 - optimism))  # between cut 0 (no head) and cut 2
        rate = (c5 - c2) / (prof[5] - prof[2]) * (1 - optimism)
        assert f[3] * prof[3] == pytest.approx(c2 + (prof[3] - prof[2]) * rate)
        assert f[7] * prof[7] == pytest.approx(c5 + (prof[7] - prof[5]) * 1.5)  # past the last: the scalar


def test_one_slow_head_barely_moves_a_corrected_cut():
    est = warmed()
    profiled = sum(WRONG[:4])
    for _ in range(10):
        est.observe_head(4, 2.0 * profiled, now=0.0)
    est.observe_head(4, 40.0 * profiled, now=0.0)  # a paused thread
    assert est.head_slowdowns()[4] < 2.0 * 2**0.3


@pytest.mark.parametrize("energy_weight", [0.0, 0.5])
def test_explain_and_decide_price_the_corrected_heads(energy_weight: float):
    model_bundle = bundle(WRONG)
    policy = make_policy("adaptive", model_bundle, explore=0.0, energy_weight=energy_weight)
    model = CostModel(model_bundle)
    rng = random.Random(3)
    for _ in range(20):
        factors = tuple(rng.uniform(0.2, 5.0) for _ in range(N + 1))
        est = replace(LINK, device_slowdown=rng.uniform(0.5, 2.0), head_slowdown=factors)
        d, ex = policy.decide(est), policy.explain(est)
        assert (d.cut, d.codec) == (ex.decision.cut, ex.decision.codec)
        assert d.predicted_s == pytest.approx(ex.decision.predicted_s)
        assert d.energy_j == pytest.approx(ex.decision.energy_j)
        for c in ex.candidates:
            assert c.stages["head"] == pytest.approx(model.head_by_cut[c.cut] * factors[c.cut])
        assert d.finish_s == pytest.approx(
            model.head_by_cut[N] * factors[N] - model.head_by_cut[d.cut] * factors[d.cut]
        )
    assert "heads corrected per cut" in ex.format()


def test_a_correction_for_another_bundle_is_priced_by_the_scalar():
    policy = make_policy("adaptive", bundle(WRONG), explore=0.0)
    est = replace(LINK, device_slowdown=2.0)
    other = replace(est, head_slowdown=(9.0,) * (N + 3))
    assert policy.decide(other) == policy.decide(est)


def test_head_slowdown_must_be_positive():
    with pytest.raises(ConfigError, match=r"head_slowdown\[1\]"):
        replace(LINK, head_slowdown=(1.0, 0.0))
    with pytest.raises(ConfigError, match="head_alpha"):
        Estimator(bundle(WRONG), head_alpha=0.0)


def test_a_set_of_tasks_prices_its_local_row_with_every_model_under_per_cut_factors():
    one = bundle(WRONG)
    other = replace(one, name="other")
    model = CostModel(one).for_tasks([other], shared_cut=3)
    factors = tuple(1.0 + k / 10 for k in range(N + 1))
    est = replace(LINK, head_slowdown=factors)
    local = model.local
    assert model.head_by_cut[N] == pytest.approx(float(model.head[local]))
    assert model.stages(local, est)["head"] == pytest.approx(float(model.head[local]) * factors[N])
