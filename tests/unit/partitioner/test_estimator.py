"""The online estimators: convergence, robustness to outliers, staleness, Server-Timing."""

from __future__ import annotations

import math

import pytest

from splitinfer.errors import ConfigError
from splitinfer.manifest import Cut, Manifest
from splitinfer.partitioner import Estimates, Estimator
from splitinfer.partitioner._estimate import LogEwma
from splitinfer.tensors import TensorSpec

RTT = 0.08


def feed(est: Estimator, t: float, up_bps: float, *, nbytes: int = 20_000, server: float = 0.01) -> float:
    """One request of ``nbytes`` at ``t`` over a link of ``up_bps``; returns when it ended."""
    first = t + RTT + nbytes * 8 / up_bps + server
    end = first + 4000 * 8 / 8e6
    est.observe_transfer(
        up_bytes=nbytes,
        down_bytes=4000,
        start=t,
        first_byte=first,
        end=end,
        server_timing=f"queue;dur=2, decode;dur=1, compute;dur=6, encode;dur=1, total;dur={server * 1000}",
    )
    return end


def fresh(**kwargs: object) -> Estimator:
    """An estimator that has seen one probe of the round trip (a tiny request)."""
    est = Estimator(**kwargs)  # type: ignore[arg-type]
    est.observe_rtt(RTT, now=0.0)
    return est


def test_converges_to_a_steady_link():
    est = fresh(clock=lambda: 0.0)
    t = 0.0
    for _ in range(50):
        t = feed(est, t, 2e6) + 0.1
    e = est.estimates()
    assert e.uplink_bps == pytest.approx(2e6, rel=0.05)
    assert e.rtt_s == pytest.approx(RTT, rel=0.05)
    assert e.downlink_bps == pytest.approx(8e6, rel=0.05)
    assert e.cloud_queue_s == pytest.approx(0.002)


def test_one_outlier_barely_moves_it_and_a_lasting_change_does():
    est = fresh(clock=lambda: 0.0)
    t = 0.0
    for _ in range(50):
        t = feed(est, t, 2e6) + 0.1
    t = feed(est, t, 2e7, nbytes=200_000) + 0.1  # one transfer 10x faster
    assert est.estimates().uplink_bps < 2e6 * 2.1
    for _ in range(20):  # the link drops to a tenth: 0.8 s transfers
        t = feed(est, t, 2e5) + 0.1
    assert est.estimates().uplink_bps == pytest.approx(2e5, rel=0.15)


def test_short_transfers_count_less_than_long_ones():
    ewma = LogEwma(tau=0.5)
    ewma.update(1e6, 1.0, 0.0)
    ewma.update(1e7, 0.001, 0.0)
    assert ewma.value(0) == pytest.approx(1e6, rel=0.01)
    ewma.update(1e7, 5.0, 0.0)
    assert ewma.value(0) > 1.9e6  # clipped: one sample moves at most a few deviations


def test_a_jump_is_followed_faster_than_an_outlier_is():
    """Change detection: two samples in a row beyond the clip on one side are a change, and the
    estimate follows it unclipped at a quarter of tau; a single outlier is still clipped."""

    def steady(**kw: object) -> LogEwma:
        ewma = LogEwma(tau=0.5, **kw)  # type: ignore[arg-type]
        for _ in range(30):
            ewma.update(2e6, 0.1, 0.0)
        return ewma

    one = steady(jump_after=2)
    one.update(2e5, 0.1, 0.0)  # one sample at a tenth
    assert one.value(0) > 2e6 / 2.01  # clipped to a factor of two, and weighted by 0.1 s
    one.update(2e6, 0.1, 0.0)
    assert one.run == 0
    detecting, plain = steady(jump_after=2), steady(jump_after=0)
    for ewma in (detecting, plain):
        for _ in range(3):  # the link drops to a tenth and stays there
            ewma.update(2e5, 0.1, 0.0)
    assert detecting.run == -3
    assert detecting.value(0) < 2e5 * 2 < plain.value(0)
    with pytest.raises(ConfigError, match="jump_after"):
        LogEwma(tau=0.5, jump_after=-1)
    assert Estimator(jump_after=2).uplink.jump_after == 2 and Estimator().uplink.jump_after == 0


def test_staleness_grows_uncertainty_and_asks_for_a_probe():
    now = [0.0]
    est = fresh(clock=lambda: now[0], probe_after_s=3.0)
    assert est.needs_probe()  # never measured
    t = 0.0
    for _ in range(10):
        t = feed(est, t, 1e6) + 0.1
    now[0] = t
    recent = est.uncertainty()["uplink"]
    assert not est.needs_probe()
    now[0] = t + 10.0
    assert est.needs_probe()
    assert est.uncertainty()["uplink"] > recent
    assert est.estimates().uplink_bps == pytest.approx(1e6, rel=0.1)  # the value itself stays
    assert 4096 <= est.probe_bytes() <= 256 * 1024
    est.observe_upload(est.probe_bytes(), est.probe_bytes() * 8 / 3e6, now=now[0])
    assert not est.needs_probe()


def profiled_bundle() -> Manifest:
    spec = (TensorSpec((None, 4), "float32"),)
    return Manifest(
        name="syn",
        cuts=[Cut(k, f"c{k}", spec, 16) for k in range(4)],
        inputs=spec,
        in_spec="",
        out_spec="",
        graph_hash="x",
        profiles={"host": {"segments": {"1": {"median_s": [0.01, 0.02, 0.03], "p90_s": [0.01, 0.02, 0.03]}}}},
    )


def test_device_and_cloud_speed_against_the_profile():
    est = Estimator(profiled_bundle(), clock=lambda: 0.0)
    for _ in range(30):
        est.observe_head(2, 0.03 * 8)  # head(2) = 0.03 s profiled
        est.observe_server_timing("queue;dur=5, compute;dur=75", cut=1)  # tail(1) = 0.05 s profiled
    e = est.estimates()
    assert e.device_slowdown == pytest.approx(8.0, rel=0.01)
    assert e.cloud_slowdown == pytest.approx(1.5, rel=0.01)
    assert e.cloud_queue_s == pytest.approx(0.005)
    est.observe_head(0, 1.0)  # head(0) is empty: no information
    est.observe_head(9, 1.0)  # no such cut: ignored
    assert est.estimates().device_slowdown == pytest.approx(8.0, rel=0.01)


def test_without_a_profile_slowdowns_stay_at_the_prior():
    est = Estimator(prior=Estimates(uplink_bps=1e6, downlink_bps=1e6, rtt_s=0.1, device_slowdown=3.0))
    est.observe_head(1, 5.0)
    est.observe_server_timing({"compute": 1.0}, cut=0)
    assert est.estimates().device_slowdown == 3.0
    assert est.estimates().cloud_slowdown == 1.0


def test_the_prior_until_something_is_observed():
    est = Estimator()
    assert est.estimates() == est.prior
    assert est.summary()["uplink_samples"] == 0


def test_rejects_inconsistent_transfers():
    est = Estimator()
    with pytest.raises(ConfigError, match="start <= first_byte <= end"):
        est.observe_transfer(up_bytes=10, down_bytes=10, start=2.0, first_byte=1.0, end=3.0)
    with pytest.raises(ConfigError, match="probe_after_s"):
        Estimator(probe_after_s=0)


def test_a_fast_link_timed_inside_the_rtt_estimate_does_not_break_it():
    est = fresh(clock=lambda: 0.0)
    t = 0.0
    for _ in range(20):
        t = feed(est, t, 1e6) + 0.1
    # A request answered sooner than the estimated round trip allows (jitter).
    est.observe_transfer(up_bytes=5000, down_bytes=0, start=t, first_byte=t + 0.05, end=t + 0.05)
    e = est.estimates()
    assert math.isfinite(e.uplink_bps) and e.uplink_bps > 0
    assert e.rtt_s == pytest.approx(RTT, rel=0.1)


def test_a_hanging_request_caps_the_uplink_until_it_ends():
    est = fresh(clock=lambda: 0.0)
    t = 0.0
    for _ in range(20):
        t = feed(est, t, 2e6) + 0.1
    before = est.estimates(now=t).uplink_bps
    tid = est.start_transfer(20_000, t)  # 0.08 s at 2 Mbit/s, but the link has just died
    assert est.estimates(now=t + 0.1).uplink_bps == before  # not late yet
    stuck = est.estimates(now=t + 2.0).uplink_bps
    assert stuck <= 20_000 * 8 / (2.0 - RTT) * 1.01  # it would still be uploading at this rate
    est.observe_transfer(
        up_bytes=20_000, down_bytes=0, start=t, first_byte=t + 3.0, end=t + 3.0, transfer_id=tid
    )
    after = est.estimates(now=t + 3.0).uplink_bps
    assert after < before  # the slow sample itself, now in the running estimate
    assert est.estimates(now=t + 10.0).uplink_bps == after  # no cap once it has ended


def test_risk_prices_in_the_rates_spread():
    def run(risk: float) -> float:
        est = fresh(clock=lambda: 0.0, risk=risk)
        t = 0.0
        for i in range(60):
            t = feed(est, t, 2e6 if i % 2 else 5e5) + 0.1  # a link flipping between two rates
        return est.estimates(now=t).uplink_bps

    assert run(0.5) < run(0.0)


def test_the_round_trip_asks_for_a_probe_when_it_has_no_recent_sample():
    now = [0.0]
    est = Estimator(clock=lambda: now[0], rtt_probe_after_s=30.0)
    assert est.needs_rtt_probe()  # never measured: uplink samples would absorb the prior's error
    est.observe_rtt(RTT)
    assert not est.needs_rtt_probe()
    now[0] = 31.0
    assert est.needs_rtt_probe()
    with pytest.raises(ConfigError, match="rtt_probe_after_s"):
        Estimator(rtt_probe_after_s=0)


def test_a_cancelled_transfer_no_longer_caps_the_uplink():
    est = fresh(clock=lambda: 0.0)
    tid = est.start_transfer(20_000, 0.0)
    capped = est.estimates(now=5.0).uplink_bps
    assert capped < est.prior.uplink_bps
    est.cancel_transfer(tid)
    assert est.estimates(now=5.0).uplink_bps == est.prior.uplink_bps
    assert est.summary()["uplink_samples"] == 0  # a failed request says nothing about the link


def test_any_device_work_with_its_profiled_time_measures_the_device():
    """At cut 0 the head is empty and the encode is the device's only work: it must count, or a
    device estimate that ran high would keep every request at cut 0 for good."""
    est = Estimator(profiled_bundle(), clock=lambda: 0.0)
    est.observe_head(3, 0.06 * 40)  # a cold first run: 40x the profile
    for _ in range(60):
        est.observe_device(0.004, 0.004 * 8)  # encodes profiled at 4 ms, taking 8x that
    assert est.estimates().device_slowdown == pytest.approx(8.0, rel=0.05)
    est.observe_device(0.0, 1.0)  # nothing profiled: no information
    assert est.estimates().device_slowdown == pytest.approx(8.0, rel=0.05)
