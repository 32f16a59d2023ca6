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
