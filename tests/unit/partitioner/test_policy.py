"""Policies against a brute-force reading of the cost model, on random synthetic bundles."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.errors import ConfigError
from splitinfer.manifest import Cut, Manifest
from splitinfer.partitioner import Decision, EnergyModel, Estimates, Explanation, Policy, make_policy
from splitinfer.tensors import TensorSpec

CODECS = ["f32", "f32+zstd1", "f16+zstd1", "q8+zstd1", "q4c+zstd1"]
SPEC = (TensorSpec((None, 4), "float32"),)


def lossless(spec: str) -> bool:
    return spec.split("+")[0] == "f32"


def make_bundle(
    seg: list[float],
    nbytes: list[int],
    codecs: list[str],
    fidelity: dict[tuple[int, str], tuple[float, float]],
    costs: dict[tuple[int, str], tuple[float, float, float]],
    response_bytes: float = 4000.0,
    seg8: list[float] | None = None,
) -> Manifest:
    """A bundle with only metadata: what decide() may need."""
    n = len(seg)
    return Manifest(
        name="syn",
        cuts=[Cut(k, f"c{k}", SPEC, nbytes[k]) for k in range(n + 1)],
        inputs=SPEC,
        in_spec="",
        out_spec="",
        graph_hash="x",
        codecs=codecs,
        fidelity={  # no sample size: rows are judged on their point estimates (the interval rule has
            "metric": "top1",  # tests of its own, tests/unit/partitioner/test_fidelity_intervals.py)
            "table": [
                {"cut": k, "codec": c, "fidelity": f, "bytes": b} for (k, c), (f, b) in fidelity.items()
            ],
        },
        profiles={
            "host": {
                "machine": "synthetic",
                "created": "2024-01-01T00:00:00+00:00",
                "segments": {
                    "1": {"median_s": seg, "p90_s": seg},
                    "8": {"median_s": seg8 or [8 * s for s in seg], "p90_s": seg8 or [8 * s for s in seg]},
                },
                "codecs": [
                    {"cut": k, "codec": c, "encode_s": e, "decode_s": d, "bytes": b}
                    for (k, c), (e, d, b) in costs.items()
                ],
                "response_bytes": response_bytes,
            }
        },
    )


@st.composite
def bundles(draw: st.DrawFn) -> Manifest:
    n = draw(st.integers(1, 10))
    codecs = draw(st.lists(st.sampled_from(CODECS), min_size=1, max_size=len(CODECS), unique=True))
    seg = draw(st.lists(st.floats(0.0, 0.05), min_size=n, max_size=n))
    nbytes = draw(st.lists(st.integers(16, 2_000_000), min_size=n + 1, max_size=n + 1))
    fidelity: dict[tuple[int, str], tuple[float, float]] = {}
    costs: dict[tuple[int, str], tuple[float, float, float]] = {}
    for k in range(n):
        for c in codecs:
            size = draw(st.floats(1.0, 2e6))
            if draw(st.booleans()) or lossless(c):
                fid = 1.0 if lossless(c) else draw(st.floats(0.9, 1.0))
                fidelity[(k, c)] = (fid, size)
            costs[(k, c)] = (draw(st.floats(0.0, 0.01)), draw(st.floats(0.0, 0.01)), size)
    return make_bundle(seg, nbytes, codecs, fidelity, costs, response_bytes=draw(st.floats(0.0, 1e5)))


rates = st.floats(1e3, 1e9)
estimates = st.builds(
    Estimates,
    uplink_bps=rates,
    downlink_bps=rates,
    rtt_s=st.floats(0.0, 0.5),
    cloud_queue_s=st.floats(0.0, 0.2),
    device_slowdown=st.floats(0.1, 100.0),
    cloud_slowdown=st.floats(0.1, 10.0),
)


def brute_force(
    bundle: Manifest, est: Estimates, budget: float, floor: int | None
) -> dict[tuple[int, str], float]:
    """Predicted latency of every allowed candidate, straight from the bundle's dicts."""
    prof = bundle.profiles["host"]
    seg = prof["segments"]["1"]["median_s"]
    n = bundle.last_cut
    table = {(r["cut"], r["codec"]): r for r in bundle.fidelity["table"]}
    costs = {(r["cut"], r["codec"]): r for r in prof["codecs"]}
    out = {(n, "local"): sum(seg) * est.device_slowdown}
    for k in range(n):
        if floor is not None and k < floor:
            continue
        for c in bundle.codecs:
            row = table.get((k, c))
            fid = 1.0 if lossless(c) else (row["fidelity"] if row else 0.0)  # unknown counts as 0
            if fid < budget:
                continue
            size = row["bytes"] if row else costs[(k, c)]["bytes"]
            out[(k, c)] = (
                (sum(seg[:k]) + costs[(k, c)]["encode_s"]) * est.device_slowdown
                + est.rtt_s
                + 8 * size / est.uplink_bps
                + est.cloud_queue_s
                + (costs[(k, c)]["decode_s"] + sum(seg[k:])) * est.cloud_slowdown
                + 8 * prof["response_bytes"] / est.downlink_bps
            )
    return out


def key(bundle: Manifest, d: Decision) -> tuple[int, str]:
    return (d.cut, "local") if d.cut == bundle.last_cut else (d.cut, d.codec)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    bundle=bundles(),
    est=estimates,
    budget=st.sampled_from([0.0, 0.95, 0.99, 1.0]),
    floor=st.one_of(st.none(), st.integers(0, 10)),
)
def test_adaptive_is_the_brute_force_optimum(bundle, est, budget, floor):
    floor = None if floor is None else min(floor, bundle.last_cut)
    policy = make_policy(
        "adaptive", bundle, fidelity_budget=budget, privacy_floor=floor, explore=0.0, hedge=False
    )
    costs = brute_force(bundle, est, budget, floor)
    best = min(costs.values())
    d = policy.decide(est)
    assert key(bundle, d) in costs
    assert close(costs[key(bundle, d)], best)
    assert close(d.predicted_s, best)
    assert close(sum(d.stages.values()), d.predicted_s)


def hedged_costs(bundle: Manifest, est: Estimates, budget: float) -> dict[tuple[int, str], float]:
    """Each allowed candidate's expected latency with the hedge, from brute_force's numbers."""
    from splitinfer.partitioner._hedge import expected_hedged

    seg = bundle.profiles["host"]["segments"]["1"]["median_s"]
    n = bundle.last_cut
    costs = {(n, "local"): sum(seg) * est.device_slowdown}
    plain = brute_force(bundle, est, budget, None)
    m = make_policy("adaptive", bundle, fidelity_budget=budget, hedge=False).model
    for (k, c), latency in plain.items():
        if k == n:
            continue
        r = int(np.flatnonzero((m.cut == k) & (m.codec_index == m.codecs.index(c)))[0])
        stages = m.stages(r, est)
        cloud = sum(v for name, v in stages.items() if name not in ("head", "encode"))
        finish = sum(seg[k:]) * est.device_slowdown
        costs[(k, c)] = latency - cloud + expected_hedged(cloud, stages["uplink"], finish, est.uplink_sd)
    return costs


@settings(max_examples=150, deadline=None)
@given(
    bundle=bundles(),
    est=estimates,
    sd=st.floats(0.0, 3.0),
    budget=st.sampled_from([0.0, 0.99]),
)
def test_a_hedged_adaptive_is_the_brute_force_optimum_of_the_hedged_costs(bundle, est, sd, budget):
    """decide() prices exactly only the candidates max_saving leaves in the running: never a loss."""
    est = dataclasses.replace(est, uplink_sd=sd)
    policy = make_policy("adaptive", bundle, fidelity_budget=budget, explore=0.0, hedge=True)
    costs = hedged_costs(bundle, est, budget)
    d = policy.decide(est)
    assert math.isclose(costs[key(bundle, d)], min(costs.values()), rel_tol=1e-9, abs_tol=1e-12)
    ex = policy.explain(est)
    assert (ex.decision.cut, ex.decision.codec) == (d.cut, d.codec) or math.isclose(
        costs[key(bundle, ex.decision)], costs[key(bundle, d)], rel_tol=1e-9
    )


def test_expected_hedged_is_the_mean_of_the_first_answer():
    """Against a Monte Carlo of min(C, hedge_after + finish) for a log-normal cloud time."""
    from splitinfer.partitioner._hedge import MIN_SD, expected_hedged, hedge_seconds, max_saving

    rng = np.random.default_rng(0)
    z = rng.standard_normal(400_000)
    for cloud, up, finish, sd in ((0.8, 0.8, 0.0, 0.5), (0.8, 0.6, 0.2, 1.0), (0.3, 0.1, 0.05, 2.0)):
        s = max(MIN_SD, sd * up / cloud)
        c = cloud * np.exp(s * z - s * s / 2)  # mean `cloud`
        sampled = float(np.minimum(c, hedge_seconds(cloud, up, sd) + finish).mean())
        exact = expected_hedged(cloud, up, finish, sd)
        assert exact == pytest.approx(sampled, rel=3e-3)
        assert exact <= cloud and 1 - exact / cloud <= max_saving(sd) + 1e-12
    # a finish much longer than the cloud: the hedge is worth next to nothing
    assert expected_hedged(0.5, 0.3, 10.0, 0.3) == pytest.approx(0.5, rel=1e-6)
    assert max_saving(0.0) == max_saving(MIN_SD) < max_saving(1.0) < max_saving(2.0)


def test_a_client_that_does_not_hedge_gets_a_policy_that_does_not_price_it():
    bundle = tiny()
    assert make_policy("adaptive", bundle, hedge=True).hedged
    assert not make_policy("adaptive", bundle).hedged  # off by default until measured
    assert not make_policy(
        "adaptive", bundle, hedge=True, objective="p95"
    ).hedged  # it prices the quantile instead


@settings(max_examples=60, deadline=None)
@given(bundle=bundles(), est=estimates, budget=st.sampled_from([0.95, 0.99, 1.0]), floor=st.integers(0, 10))
def test_budget_and_privacy_floor_hold_even_while_exploring(bundle, est, budget, floor):
    floor = min(floor, bundle.last_cut)
    policy = make_policy(
        "adaptive",
        bundle,
        fidelity_budget=budget,
        privacy_floor=floor,
        explore=0.9,
        explore_margin=10.0,
        seed=1,
    )
    allowed = brute_force(bundle, est, budget, floor)
    for _ in range(30):
        d = policy.decide(est)
        assert key(bundle, d) in allowed
        assert d.cut >= floor


def row(policy: Any, d: Decision) -> int:
    m = policy.model
    if d.cut == m.n:
        return m.local
    return int(np.flatnonzero((m.cut == d.cut) & (m.codec_index == m.codecs.index(d.codec)))[0])


def predicted(policy: Any, r: int, est: Estimates) -> float:
    return float(policy.model.stage_matrix(est)[r].sum())


def tie(policy: Any, a: int, b: int, *ests: Estimates) -> bool:
    return any(close(predicted(policy, a, e), predicted(policy, b, e)) for e in ests)


@settings(max_examples=100, deadline=None)
@given(bundle=bundles(), est=estimates, factor=st.floats(1.5, 1e3))
def test_a_slower_uplink_never_sends_more_bytes(bundle, est, factor):
    policy = make_policy("adaptive", bundle, fidelity_budget=0.0, explore=0.0, hedge=False)
    slow_est = dataclasses.replace(est, uplink_bps=est.uplink_bps / factor)
    fast, slow = row(policy, policy.decide(est)), row(policy, policy.decide(slow_est))
    sizes = policy.model.bytes
    # Exchange argument: an exact argmin of a cost linear in 1/uplink sends no more at a lower rate.
    assert sizes[slow] <= sizes[fast] * (1 + 1e-9) or tie(policy, fast, slow, est, slow_est)


@settings(max_examples=100, deadline=None)
@given(bundle=bundles(), est=estimates)
def test_no_uplink_means_all_on_the_device(bundle, est):
    policy = make_policy("adaptive", bundle, explore=0.0)
    d = policy.decide(dataclasses.replace(est, uplink_bps=1e-9))
    assert d.cut == bundle.last_cut
    assert set(d.stages) == {"head"}


@settings(max_examples=100, deadline=None)
@given(bundle=bundles(), est=estimates, factor=st.floats(1.5, 1e3))
def test_a_slower_device_moves_work_to_the_cloud(bundle, est, factor):
    policy = make_policy("adaptive", bundle, fidelity_budget=0.99, explore=0.0, hedge=False)
    slow_est = dataclasses.replace(est, device_slowdown=est.device_slowdown * factor)
    fast, slow = row(policy, policy.decide(est)), row(policy, policy.decide(slow_est))
    device = policy.model.features[:, 0]  # head + encode, profiled seconds
    assert device[slow] <= device[fast] * (1 + 1e-9) + 1e-15 or tie(policy, fast, slow, est, slow_est)
    # In the limit: the least device work of all allowed candidates.
    limit = row(policy, policy.decide(dataclasses.replace(est, device_slowdown=1e9)))
    allowed = [row(policy, Decision(k, c, 0.0)) for k, c in brute_force(bundle, est, 0.99, None)]
    assert device[limit] <= min(device[allowed]) + 1e-4


def tiny() -> Manifest:
    """Three segments; cut 1 is small, cut 0 is large; q8 is good enough only at cut 1."""
    seg = [0.010, 0.010, 0.010]
    nbytes = [400_000, 40_000, 40_000, 4_000]
    codecs = ["f32", "f32+zstd1", "q8+zstd1"]
    fidelity = {
        (1, "q8+zstd1"): (0.995, 10_000.0),
        (0, "q8+zstd1"): (0.9, 100_000.0),
        (2, "q8+zstd1"): (0.999, 10_000.0),
    }
    costs = {(k, c): (0.001, 0.001, float(nbytes[k])) for k in range(3) for c in codecs}
    return make_bundle(seg, nbytes, codecs, fidelity, costs)


EST = Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.08, cloud_queue_s=0.0, device_slowdown=8.0)


def test_the_contract_example():
    bundle = tiny()
    policy = make_policy("adaptive", bundle, fidelity_budget=0.99, privacy_floor=None, explore=0.0)
    assert isinstance(policy, Policy)
    d = policy.decide(EST)
    assert isinstance(d, Decision)
    assert (d.cut, d.codec) == (1, "q8+zstd1")
    assert d.predicted_s == pytest.approx(sum(d.stages.values()))
    assert set(d.stages) == {"head", "encode", "rtt", "uplink", "queue", "decode", "tail", "downlink"}
    assert d.stages["uplink"] == pytest.approx(8 * 10_000 / 2e6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.cut = 2  # type: ignore[misc]


def test_explain_lists_every_candidate_and_the_reason():
    bundle = tiny()
    policy = make_policy("adaptive", bundle, fidelity_budget=0.99, privacy_floor=1, explore=0.0)
    ex = policy.explain(EST)
    assert isinstance(ex, Explanation)
    assert len(ex.candidates) == 3 * 3 + 1
    assert (ex.decision.cut, ex.decision.codec) == (policy.decide(EST).cut, policy.decide(EST).codec)
    allowed = [c for c in ex.candidates if c.feasible]
    assert [c.objective for c in allowed] == sorted(c.objective for c in allowed)
    excluded = {(c.cut, c.codec): c.excluded for c in ex.candidates if not c.feasible}
    assert "privacy floor" in excluded[(0, "f32")]
    assert "fidelity 0.9990" not in " ".join(excluded.values())
    assert "winner: cut 1" in ex.reason and "runner-up" in ex.reason
    text = ex.format(top=3)
    assert "rank" in text and "winner" in text and "more allowed candidates" in text


def test_baseline_policies():
    bundle = tiny()
    assert make_policy("local", bundle).decide(EST).cut == 3
    cloud = make_policy("cloud", bundle, fidelity_budget=0.99).decide(EST)
    assert cloud.cut == 0 and cloud.codec in ("f32", "f32+zstd1")  # q8 at cut 0 misses the budget
    assert make_policy("cloud", bundle, fidelity_budget=0.8).decide(EST).codec == "q8+zstd1"
    ns = make_policy("neurosurgeon", bundle).decide(EST)
    assert ns.codec == "f32" or ns.cut == 3
    static = make_policy("static", bundle, cut=2, codec="f32+zstd1").decide(EST)
    assert (static.cut, static.codec) == (2, "f32+zstd1")
    fast_link = dataclasses.replace(EST, uplink_bps=1e9, rtt_s=0.001)
    assert make_policy("neurosurgeon", bundle).decide(fast_link).cut == 0


def test_energy_weight_trades_latency_for_energy():
    bundle = tiny()
    est = dataclasses.replace(EST, uplink_bps=3e5, device_slowdown=4.0)
    fast = make_policy("adaptive", bundle, explore=0.0).decide(est)
    frugal = make_policy(
        "adaptive", bundle, explore=0.0, energy_weight=100.0, energy=EnergyModel(tx_w=5.0)
    ).decide(est)
    assert frugal.energy_j <= fast.energy_j
    assert frugal.predicted_s >= fast.predicted_s


def test_exploration_is_rare_near_optimal_and_seeded():
    bundle = tiny()
    policy = make_policy("adaptive", bundle, explore=0.2, explore_margin=0.5, seed=3)
    best = make_policy("adaptive", bundle, explore=0.0).decide(EST)
    decisions = [policy.decide(EST) for _ in range(500)]
    explored = [d for d in decisions if d.explored]
    assert 50 < len(explored) < 150
    assert all(d.predicted_s <= best.predicted_s * 1.5 + 1e-12 for d in decisions)
    again = make_policy("adaptive", bundle, explore=0.2, explore_margin=0.5, seed=3)
    assert [again.decide(EST) for _ in range(500)] == decisions


def test_missing_codec_costs_are_interpolated_per_byte():
    bundle = tiny()
    prof = bundle.profiles["host"]
    prof["codecs"] = [r for r in prof["codecs"] if not (r["cut"] == 1 and r["codec"] == "q8+zstd1")]
    for r in prof["codecs"]:
        if r["codec"] == "q8+zstd1":  # 25 ns per float32 byte of the frontier
            r["encode_s"] = 25e-9 * bundle.cuts[r["cut"]].nbytes
    d = make_policy("static", bundle, cut=1, codec="q8+zstd1").decide(EST)
    assert d.stages["encode"] == pytest.approx(25e-9 * 40_000 * EST.device_slowdown)


def test_unknown_fidelity_is_infeasible_unless_the_budget_is_zero():
    bundle = tiny()
    bundle.fidelity["table"] = [r for r in bundle.fidelity["table"] if r["cut"] != 1]
    for r in bundle.profiles["host"]["codecs"]:
        if (r["cut"], r["codec"]) == (1, "q8+zstd1"):
            r["bytes"] = 10_000.0
    assert make_policy("adaptive", bundle, explore=0.0).decide(EST).codec != "q8+zstd1"
    d = make_policy("adaptive", bundle, explore=0.0, fidelity_budget=0.0).decide(EST)
    assert (d.cut, d.codec) == (1, "q8+zstd1")  # bytes from the profile


def test_no_profile():
    bundle = tiny()
    bundle.profiles = {}
    with pytest.raises(ConfigError, match="splitinfer profile"):
        make_policy("adaptive", bundle)
    d = make_policy("cloud", bundle, fidelity_budget=0.8).decide(EST)
    assert (d.cut, d.codec) == (0, "q8+zstd1") and math.isnan(d.predicted_s)
    assert make_policy("local", bundle).decide(EST).cut == 3


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("greedy", {}, "valid policies: adaptive, static, local, cloud, neurosurgeon"),
        ("adaptive", {"budget": 0.9}, "accepts fidelity_budget"),
        ("adaptive", {"fidelity_budget": 1.5}, "fidelity_budget"),
        ("adaptive", {"privacy_floor": 9}, "privacy_floor must be in 0..3"),
        ("adaptive", {"explore": 1.0}, "explore"),
        ("adaptive", {"profile": "phone"}, "no profile 'phone'"),
        ("static", {"cut": 1}, "codec"),
        ("static", {"cut": 1, "codec": "q4+zstd1"}, "offers codecs"),
        ("static", {"cut": 7, "codec": "f32"}, "cut must be"),
        ("local", {"fidelity_budget": 0.9}, "accepts profile"),
        ("cloud", {"fidelity_budget": 1.0, "profile": "host"}, None),
    ],
)
def test_make_policy_errors(name, kwargs, match):
    if match is None:
        make_policy(name, tiny(), **kwargs)
        return
    with pytest.raises(ConfigError, match=match):
        make_policy(name, tiny(), **kwargs)


def test_estimates_are_checked():
    with pytest.raises(ConfigError, match="uplink_bps"):
        Estimates(uplink_bps=0.0, downlink_bps=1e6, rtt_s=0.1)
    with pytest.raises(ConfigError, match="rtt_s"):
        Estimates(uplink_bps=1e6, downlink_bps=1e6, rtt_s=-1)
    with pytest.raises(ConfigError, match="device_slowdown"):
        Estimates(uplink_bps=1e6, downlink_bps=1e6, rtt_s=0.1, device_slowdown=math.inf)


def test_the_p95_objective_prices_the_upload_at_the_uplinks_low_quantile():
    bundle = tiny()
    # cut 1 sends 10 kB (predicted 40 ms at 2 Mbit/s); all on the device takes 240 ms at 8x.
    shaky = dataclasses.replace(EST, uplink_sd=1.2)
    mean = make_policy("adaptive", bundle, explore=0.0)
    p95 = make_policy("adaptive", bundle, explore=0.0, objective="p95")
    assert mean.decide(shaky).cut == 1  # the expected time is short
    # a 12x device: 360 ms all on the device, 317 ms at cut 1 with an 80 ms upload, which at the
    # uplink's 5 % quantile (x e^(1.645 * 1.2)) takes 576 ms
    slow = dataclasses.replace(shaky, uplink_bps=1e6, device_slowdown=12.0)
    assert mean.decide(slow).cut == 1
    assert p95.decide(slow).cut == 3
    assert p95.decide(dataclasses.replace(slow, uplink_sd=0.0)).cut == 1  # no spread: the same
    ex = p95.explain(slow)
    assert (ex.decision.cut, ex.decision.codec) == (3, p95.decide(slow).codec)
    assert "objective p95" in ex.reason
    with pytest.raises(ConfigError, match="objective must be one of mean, p95"):
        make_policy("adaptive", bundle, objective="p99")


def test_hedge_after_bounds_the_wait_for_an_answer():
    from splitinfer.partitioner import hedge_after

    bundle = tiny()
    policy = make_policy("adaptive", bundle, explore=0.0)
    d = policy.decide(EST)
    assert d.finish_s == pytest.approx(0.020 * 8)  # segments 1 and 2 on the 8x device
    cloud = sum(v for s, v in d.stages.items() if s not in ("head", "encode"))
    calm = hedge_after(d, EST)
    assert calm == pytest.approx(max(cloud * math.exp(1.6448536 * 0.25), cloud + 0.05))  # the floors
    shaky = dataclasses.replace(EST, uplink_sd=2.0)
    assert hedge_after(policy.decide(shaky), shaky) > calm
    assert hedge_after(d, EST, quantile=0.99) > calm
    local = make_policy("local", bundle).decide(EST)
    assert local.finish_s == 0.0 and hedge_after(local, EST) == math.inf
    ex = policy.explain(EST)
    assert ex.decision.finish_s == pytest.approx(d.finish_s)
    assert f"hedge: an answer not back {calm * 1000:.0f} ms after sending" in ex.reason


@pytest.mark.parametrize("budget", [0.0, 0.99])
def test_a_codec_this_process_cannot_run_is_never_chosen(monkeypatch, budget):
    """A bundle offering +ans codecs on an edge without the entropy extra: the smallest codec
    is out of reach, so the policy picks the best one it can encode (or runs locally)."""
    codecs = ["f32", "q8+zstd1", "q6+ans"]
    nbytes = [400_000, 100_000]
    fidelity = {
        (0, "f32"): (1.0, 400_000.0),
        (0, "q8+zstd1"): (1.0, 100_000.0),
        (0, "q6+ans"): (1.0, 1_000.0),
    }
    costs = {(0, c): (0.0, 0.0, size) for (_, c), (_, size) in fidelity.items()}
    bundle = make_bundle([1.0], nbytes, codecs, fidelity, costs)
    est = Estimates(uplink_bps=1e6, downlink_bps=1e6, rtt_s=0.01, cloud_queue_s=0.0, device_slowdown=10.0)
    with_ans = make_policy("adaptive", bundle, fidelity_budget=budget, explore=0.0).decide(est)
    assert (with_ans.cut, with_ans.codec) == (0, "q6+ans")
    monkeypatch.setitem(sys.modules, "constriction", None)  # as if the extra were not installed
    without = make_policy("adaptive", bundle, fidelity_budget=budget, explore=0.0).decide(est)
    assert (without.cut, without.codec) == (0, "q8+zstd1")
