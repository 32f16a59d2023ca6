"""Static tuning in hindsight (lab/_tuning.py): the one static a deployment ships and the device
slowdown at which neither end wins, on a synthetic bundle and links of known rates."""

from __future__ import annotations

import numpy as np
import pytest

from splitinfer.errors import ConfigError
from splitinfer.lab.evaluation import Link, World, choose_static, tie_slowdown
from splitinfer.manifest import Cut, Manifest
from splitinfer.netem import BandwidthTrace
from splitinfer.partitioner import make_policy
from splitinfer.tensors import TensorSpec

SPEC = (TensorSpec((None, 4), "float32"),)
#: Device seconds of the two segments, and the bytes sent at cuts 0 (the input), 1 and 2 (local).
SEGMENTS = [0.004, 0.004]
NBYTES = [200_000, 2_000, 40]


def bundle() -> Manifest:
    """Two segments; the input is large and the middle small, so each end wins somewhere."""
    cuts = range(len(NBYTES))
    return Manifest(
        name="syn",
        cuts=[Cut(k, f"c{k}", SPEC, NBYTES[k]) for k in cuts],
        inputs=SPEC,
        in_spec="",
        out_spec="",
        graph_hash="x",
        codecs=["f32"],
        fidelity={
            "metric": "top1",
            "samples": 10,
            "table": [{"cut": k, "codec": "f32", "fidelity": 1.0, "bytes": NBYTES[k]} for k in cuts],
        },
        profiles={
            "host": {
                "machine": "synthetic",
                "created": "2024-01-01T00:00:00+00:00",
                "segments": {"1": {"median_s": SEGMENTS, "p90_s": SEGMENTS}},
                "codecs": [
                    {"cut": k, "codec": "f32", "encode_s": 1e-4, "decode_s": 1e-4, "bytes": NBYTES[k]}
                    for k in cuts
                ],
                "response_bytes": 400.0,
            }
        },
    )


def link(rate_bps: float, seconds: float = 20.0) -> Link:
    return Link.from_trace(BandwidthTrace.constant(rate_bps), seconds)


def test_a_fast_link_tunes_to_the_cloud_and_a_slow_one_to_the_device():
    b = bundle()
    assert choose_static(b, [link(1e9)], ds=50.0) == (0, "f32")
    assert choose_static(b, [link(1e4)], ds=1.0) == (2, "f32")


def test_a_whole_link_and_its_span_tune_alike():
    b, fast = bundle(), link(5e6)
    assert choose_static(b, [fast], ds=8.0) == choose_static(b, [(fast, fast.duration, "fast")], ds=8.0)


def test_at_the_tie_slowdown_neither_end_wins():
    b = bundle()
    trace = BandwidthTrace((0.0, 5.0), (2e6, 5e5), 10.0, "steps")
    ds = tie_slowdown(b, trace, duration_s=20.0)
    assert ds == tie_slowdown(b, [(Link.from_trace(trace, 80.0), 20.0, "steps")])
    cloud = make_policy("cloud", b)
    world = World(cloud, Link.from_trace(trace, 80.0), ds)
    cloud_mean = float(np.mean([world.latencies(cloud.rows, t, 0.08).min() for t in np.arange(0, 20, 0.2)]))
    local = float(make_policy("local", b).model.head[-1]) * ds
    # ds is rounded to an integer: local and the cloud's mean are within one device's head apart
    assert abs(local - cloud_mean) <= float(make_policy("local", b).model.head[-1]) * 1.01


def test_a_trace_without_its_duration_is_refused():
    with pytest.raises(ConfigError, match="duration_s"):
        tie_slowdown(bundle(), BandwidthTrace.constant(1e6))


def labelled_bundle() -> Manifest:
    """:func:`bundle` with labels and a small ``q8+zstd1`` upload at the input that agrees with
    the model on every input but loses 10 points of accuracy (40 of 400 inputs)."""
    b = bundle()
    row = {"cut": 0, "codec": "q8+zstd1", "fidelity": 1.0, "n": 400, "bytes": 2_000}
    row |= {"accuracy": 0.6, "accuracy_drop": 0.1, "lost": 40, "gained": 0}
    table = [
        {**r, "n": 400, "accuracy": 0.7, "accuracy_drop": 0.0, "lost": 0, "gained": 0}
        for r in b.fidelity["table"]
    ]
    b.codecs = ["f32", "q8+zstd1"]
    b.fidelity = {**b.fidelity, "samples": 400, "labels": 400, "table": [*table, row]}
    codec = {"cut": 0, "codec": "q8+zstd1", "encode_s": 1e-4, "decode_s": 1e-4, "bytes": 2_000}
    b.profiles["host"]["codecs"].append(codec)
    return b


def test_an_accuracy_drop_budget_rules_out_what_the_agreement_budget_admits():
    b, slow = labelled_bundle(), [link(1e5)]
    assert choose_static(b, slow, ds=50.0) == (0, "q8+zstd1")
    assert choose_static(b, slow, ds=50.0, accuracy_drop=0.01) != (0, "q8+zstd1")
    # the cloud's upload is the 200 kB input then, so the device ties with it only when slower
    assert tie_slowdown(b, slow, accuracy_drop=0.01) > tie_slowdown(b, slow)
    with pytest.raises(ConfigError, match="labels"):
        choose_static(bundle(), slow, ds=50.0, accuracy_drop=0.01)
    with pytest.raises(ConfigError, match="labels"):
        tie_slowdown(bundle(), slow, accuracy_drop=0.01)
