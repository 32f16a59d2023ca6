"""Early exits on the edge (issue 32): the head runs to the exit's cut and answers there when
the exit is confident, otherwise the request goes on; the policy prices the mix; traces and
metrics show it. An in-process cloud (no sockets)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

import splitinfer as si
from splitinfer.edge import EdgeClient, InProcessTransport
from splitinfer.errors import ConfigError
from splitinfer.partitioner import Estimates, make_policy
from splitinfer.partitioner._costs import CostModel, latency_weights
from tests.support.zoo import TinyClassifier
from tests.support.zoo import seeded_rows as _rows
from tests.unit.edge.test_pipeline import cloud, infers

LINK = Estimates(uplink_bps=1e8, downlink_bps=1e8, rtt_s=0.001)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return TinyClassifier().eval()


@pytest.fixture(scope="module")
def bundle(model) -> si.Bundle:
    return si.compile(
        model,
        (torch.randn(1, 3, 8, 8),),
        name="tiny",
        codecs=["f32"],
        runtimes=("torch",),
        profile=True,
        training=_rows(64, 1),
        exits=None,
        fidelity_budget=0.3,
        confidence=0.75,
        train_steps=60,
    )


def _with_threshold(bundle: si.Bundle, threshold: float) -> si.Bundle:
    """The bundle with its first exit answering always (0) or never (> 1), the other dropped."""
    b = copy.copy(bundle)
    first = next(e for e in bundle.exits if e["threshold"] is not None)
    b.exits = [dict(first, threshold=threshold, exit_rate=0.5)]
    return b


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(9))


async def test_a_confident_exit_answers_on_the_device_and_sends_nothing(bundle):
    b = _with_threshold(bundle, 0.0)
    e = b.exits[0]["cut"]
    registry = CollectorRegistry()
    transport = InProcessTransport(cloud(b))
    async with EdgeClient(
        "http://cloud",
        bundle=b,
        transport=transport,
        policy="static",
        cut=e,
        codec="f32",
        hedge=False,
        registry=registry,
    ) as client:
        out, trace = await client.ainfer(X, return_trace=True)
    (logits,), confident = b.run_exit(e, b.head(e, X))
    assert confident == [True] and torch.equal(out, logits) and out.shape == (1, 6)
    assert trace.exited and trace.exit_cut == e and trace.ran_on == "device" and trace.bytes_up == 0
    assert not infers(transport)
    got = registry.get_sample_value(
        "splitinfer_edge_exits_total", {"model": "tiny", "cut": str(e), "outcome": "exited"}
    )
    assert got == 1.0


async def test_an_unsure_exit_goes_on_to_the_cloud_or_the_device(bundle, model):
    b = _with_threshold(bundle, 1.01)
    e = b.exits[0]["cut"]
    transport = InProcessTransport(cloud(b))
    async with EdgeClient(
        "http://cloud", bundle=b, transport=transport, policy="static", cut=e + 1, codec="f32", hedge=False
    ) as client:
        out, trace = await client.ainfer(X, return_trace=True)
    async with EdgeClient(
        "http://cloud", bundle=b, transport=InProcessTransport(cloud(b)), policy="local"
    ) as client:
        local, local_trace = await client.ainfer(X, return_trace=True)
    with torch.no_grad():
        want = model(X)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local, want, rtol=1e-5, atol=1e-5)
    assert (
        trace.exit_cut == e and not trace.exited and trace.ran_on == "cloud" and len(infers(transport)) == 1
    )
    assert local_trace.exit_cut is not None and not local_trace.exited


def test_the_policy_prices_an_exit_by_its_rate(bundle):
    b = _with_threshold(bundle, 0.5)
    e, rate = b.exits[0]["cut"], 0.5
    plain = copy.copy(bundle)
    plain.exits = []
    priced, base = CostModel(b), CostModel(plain)
    assert (base.exit_cut == -1).all() and not base.exit_rate.any()
    local = priced.local
    head_e = float(base.head[int(np.flatnonzero(base.cut == e)[0])])
    own = float(b.profiles["host"]["exits"]["1"][str(e)])  # the exit head's profiled time
    assert priced.exit_time[local] == own > 0
    slow = Estimates(uplink_bps=1e8, downlink_bps=1e8, rtt_s=0.001, device_slowdown=3.0)
    for est in (LINK, slow):
        going_on = float(base.stage_matrix(est)[local].sum())
        want = (rate * head_e + own) * est.device_slowdown + (1 - rate) * going_on
        assert float(priced.stage_matrix(est)[local].sum()) == pytest.approx(want)
        assert float(priced.features[local] @ latency_weights(est)) == pytest.approx(want)
    early = np.flatnonzero(priced.cut < e)
    assert (priced.stage_matrix(LINK)[early] == base.stage_matrix(LINK)[early]).all()
    decision = make_policy("local", b).decide(LINK)
    assert decision.exit_cut == e and decision.exit_rate == rate
    assert make_policy("local", plain).decide(LINK).exit_cut is None
    assert (
        f"early exit at cut {e} on the way: it answers 50.0%"
        in make_policy("local", b).explain(LINK).format()
    )


def test_the_profile_times_each_exit_head_and_old_profiles_still_load(bundle):
    answering = [e["cut"] for e in bundle.exits if e["threshold"] is not None]
    times = bundle.profiles["host"]["exits"]
    assert set(times) == {"1", "8"}  # the batch sizes the segments are timed at
    for batch in times.values():
        assert sorted(int(k) for k in batch) == sorted(answering) and all(t > 0 for t in batch.values())
    b = _with_threshold(bundle, 0.5)
    old = copy.copy(b)
    old.profiles = {"host": {k: v for k, v in b.profiles["host"].items() if k != "exits"}}
    before, now = CostModel(old), CostModel(b)
    assert not before.exit_time.any() and before.exit_rate.any()  # priced at 0 s, as before issue 32
    assert (now.exit_time[now.exit_cut >= 0] > 0).all()
    assert float(now.stage_matrix(LINK)[now.local].sum()) > float(
        before.stage_matrix(LINK)[before.local].sum()
    )
    bad = copy.copy(b)
    bad.profiles = {"host": {**b.profiles["host"], "exits": {"1": {str(b.exits[0]["cut"]): -1.0}}}}
    with pytest.raises(ConfigError, match="exit at cut"):
        CostModel(bad)
