"""The causal reference of the replay (issue 28 item 7): the policy told the truth at each decision."""

from __future__ import annotations

import numpy as np
import pytest

from splitinfer.lab._hindsight import Link, World
from splitinfer.manifest import Cut, Manifest
from splitinfer.partitioner import make_policy
from splitinfer.tensors import TensorSpec


def manifest() -> Manifest:
    """Three cuts: cut 0 sends 100 kB, cut 1 sends 2 kB after 40 ms of profiled work, cut 2 is
    local (100 ms profiled)."""
    spec = (TensorSpec((None, 4), "float32"),)
    nbytes = [100_000, 2_000, 16]
    table = [{"cut": k, "codec": "f32", "fidelity": 1.0, "bytes": float(nbytes[k])} for k in range(2)]
    costs = [
        {"cut": k, "codec": "f32", "encode_s": 1e-4, "decode_s": 1e-4, "bytes": float(nbytes[k])}
        for k in range(2)
    ]
    return Manifest(
        name="causal",
        cuts=[Cut(k, f"c{k}", spec, nbytes[k]) for k in range(3)],
        inputs=spec,
        in_spec="",
        out_spec="",
        graph_hash="x",
        codecs=["f32"],
        fidelity={"metric": "top1", "samples": 100, "table": table},
        profiles={
            "host": {
                "segments": {"1": {"median_s": [0.04, 0.06], "p90_s": [0.04, 0.06]}},
                "codecs": costs,
                "response_bytes": 16,
            }
        },
    )


def link() -> Link:
    # 20 Mbit/s for 10 s, then 0.01 Mbit/s for 10 s, then 20 again
    return Link.from_samples("steps", np.array([0.0, 10.0, 20.0]), np.array([20.0, 0.01, 20.0]), 30.0)


def test_truth_is_the_rate_now_and_nothing_after():
    bundle = manifest()
    world = World(make_policy("adaptive", bundle, explore=0.0), link(), ds=1.0)
    assert world.truth(5.0, 0.08).uplink_bps == pytest.approx(20e6)
    assert world.truth(9.99, 0.08).uplink_bps == pytest.approx(20e6)  # the drop at 10 s is unknown yet
    assert world.truth(10.0, 0.08).uplink_bps == pytest.approx(1e4)
    assert world.truth(35.0, 0.08).uplink_bps == pytest.approx(20e6)  # the trace loops


def test_the_causal_reference_follows_the_link_and_never_beats_the_oracle():
    bundle = manifest()
    policy = make_policy("adaptive", bundle, explore=0.0)
    world = World(policy, link(), ds=10.0)  # local: 1 s on the device
    n = bundle.last_cut
    fast = world.causal(policy, 5.0, 0.01)
    slow = world.causal(policy, 15.0, 0.01)
    assert int(world.model.cut[fast[1]]) == 0  # 100 kB at 20 Mbit/s: 40 ms + rtt + 100 ms tail
    assert int(world.model.cut[slow[1]]) == n  # 10 kbit/s: all on the device
    assert slow[0] == pytest.approx(1.0)
    for t in np.arange(0.0, 30.0, 0.5):
        causal, _ = world.causal(policy, float(t), 0.01)
        oracle, _ = world.oracle(policy.rows, float(t), 0.01)
        assert causal >= oracle - 1e-12
    # just before the drop the causal reference sends (it cannot know), and the oracle does not
    causal, row = world.causal(policy, 9.99, 0.01)
    oracle, _ = world.oracle(policy.rows, 9.99, 0.01)
    assert int(world.model.cut[row]) == 0 and causal > 2.0 and oracle == pytest.approx(1.0)
    hedged, _ = world.causal(policy, 9.99, 0.01, hedged=True)
    assert oracle <= hedged < causal  # finishing on the device once overdue bounds the loss
