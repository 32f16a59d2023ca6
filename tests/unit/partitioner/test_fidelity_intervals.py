"""The interval rule (issue 28 item 2): a policy admits a fidelity row only where its bound at
the confidence level meets the budget. Torch-free: synthetic manifests."""

from __future__ import annotations

import math

import pytest

from splitinfer.errors import ConfigError
from splitinfer.manifest import Cut, Manifest
from splitinfer.partitioner import Estimates, make_policy
from splitinfer.partitioner._intervals import (
    DEFAULT_CONFIDENCE,
    drop_interval,
    inputs_to_decide,
    mean_interval,
    row_bounds,
    wilson,
)
from splitinfer.tensors import TensorSpec

SPEC = (TensorSpec((None, 4), "float32"),)
EST = Estimates(uplink_bps=1e5, downlink_bps=1e6, rtt_s=0.01, device_slowdown=50.0)


def test_wilson_bounds_without_a_miss_are_n_over_n_plus_z_squared():
    assert DEFAULT_CONFIDENCE == 0.9  # docs/fidelity.md says why
    z = 1.6448536269514722  # one-sided 0.95
    for n in (48, 100, 268, 1000):
        assert wilson(1.0, n, 0.95)[0] == pytest.approx(n / (n + z * z))
        assert wilson(1.0, n, 0.95)[1] == pytest.approx(1.0)
    assert wilson(1.0, 48)[0] < 0.99  # 48 inputs cannot show 0.99 ...
    assert wilson(1.0, 163)[0] >= 0.99 > wilson(1.0, 162)[0]  # ... 163 can, at the default level
    assert wilson(1.0, 268, 0.95)[0] >= 0.99 > wilson(1.0, 267, 0.95)[0]  # 268 at 0.95
    assert wilson(1.0, 48, 0.75)[0] >= 0.99  # at a one-sided 0.75 it can
    lo95, _ = wilson(0.9, 100, 0.975)  # two-sided 95 %: the textbook Wilson interval
    assert lo95 == pytest.approx(0.8256, abs=1e-3)


def test_mean_and_drop_intervals():
    lo, hi = mean_interval(0.99, 0.02, 100, 0.95)
    assert (lo, hi) == pytest.approx((0.99 - 1.6449 * 0.002, 0.99 + 1.6449 * 0.002), abs=1e-4)
    lo, hi = drop_interval(0, 0, 100, 0.95)  # nothing lost or gained: the drop is near 0, not exactly
    assert lo < 0 < hi < 0.02
    lo, hi = drop_interval(5, 1, 200, 0.95)  # Agresti-Min: (5.5 - 1.5) / 202 +- z * sqrt(...)
    d = 4 / 202
    var = (7 - 16 / 202) / 202**2
    assert (lo, hi) == pytest.approx((d - 1.6449 * math.sqrt(var), d + 1.6449 * math.sqrt(var)), abs=1e-4)


def test_inputs_to_decide():
    assert inputs_to_decide(1.0, 0.99) == 163
    assert inputs_to_decide(1.0, 0.99, 0.95) == 268
    assert inputs_to_decide(0.999, 0.99) > 163  # a miss costs more inputs
    assert inputs_to_decide(0.95, 0.99) is not None  # below the budget: how many show it is below
    assert inputs_to_decide(0.99, 0.99) is None
    assert inputs_to_decide(0.995, 0.99, 0.95, sd=0.01) == math.ceil((1.6449 * 0.01 / 0.005) ** 2)


def test_old_rows_without_n_use_the_table_size_then_the_stored_interval_then_the_estimate():
    assert row_bounds({"fidelity": 1.0}, "top1", DEFAULT_CONFIDENCE, 48) == wilson(1.0, 48)
    assert row_bounds({"fidelity": 1.0, "interval": [0.93, 1.0]}, "top1", DEFAULT_CONFIDENCE) == (0.93, 1.0)
    assert row_bounds({"fidelity": 1.0}, "top1", DEFAULT_CONFIDENCE) is None


def _bundle(rows, *, samples=None, labels=None):
    fidelity = {"metric": "top1", "table": rows}
    if samples is not None:
        fidelity["samples"] = samples
    if labels is not None:
        fidelity["labels"] = labels
    return Manifest(
        name="syn",
        cuts=[Cut(k, f"c{k}", SPEC, 4000) for k in range(3)],
        inputs=SPEC,
        in_spec="",
        out_spec="",
        graph_hash="x",
        codecs=["f32", "q2c"],
        fidelity=fidelity,
        profiles={
            "host": {
                "machine": "synthetic",
                "created": "2024-01-01T00:00:00+00:00",
                "segments": {"1": {"median_s": [0.001, 0.001], "p90_s": [0.001, 0.001]}},
                "codecs": [],
                "response_bytes": 40.0,
            }
        },
    )


def _rows(q2c_row):
    rows = []
    for k in range(2):
        rows.append({"cut": k, "codec": "f32", "fidelity": 1.0, "bytes": 16000.0})
        rows.append({"cut": k, "codec": "q2c", "bytes": 100.0, **q2c_row})
    return rows


def test_a_row_is_admitted_only_where_its_lower_bound_meets_the_budget():
    small = _bundle(_rows({"fidelity": 1.0, "n": 48}))  # 48 of 48 agree: estimate 1.0, bound 0.967
    big = _bundle(_rows({"fidelity": 1.0, "n": 400}))
    for policy in ("adaptive", "cloud"):
        assert make_policy(policy, small, fidelity_budget=0.99).decide(EST).codec == "f32"
        assert make_policy(policy, big, fidelity_budget=0.99).decide(EST).codec == "q2c"
        assert make_policy(policy, small, fidelity_budget=0.99, confidence=0.6).decide(EST).codec == "q2c"
        assert make_policy(policy, small, fidelity_budget=0.96).decide(EST).codec == "q2c"
    summary = make_policy("adaptive", small, fidelity_budget=0.99, explore=0.0).explain(EST).format(top=0)
    assert "fidelity's lower bound below the budget" in summary
    reasons = make_policy("adaptive", small, fidelity_budget=0.99).model.exclusions(0.99, None)
    assert any("lower bound 0.9669 at 0.9 on 48 inputs < 0.99" in r for r in reasons)


def test_rows_without_n_take_the_table_size_and_tables_without_either_their_point_estimate():
    per_table = _bundle(_rows({"fidelity": 1.0}), samples=48)
    assert make_policy("cloud", per_table, fidelity_budget=0.99).decide(EST).codec == "f32"
    old = _bundle(_rows({"fidelity": 0.995}))  # before issue 22: no n, no interval
    assert make_policy("cloud", old, fidelity_budget=0.99).decide(EST).codec == "q2c"


def test_an_accuracy_drop_budget_admits_on_the_drops_upper_bound():
    rows = _rows({"fidelity": 0.97, "n": 400, "accuracy": 0.77, "lost": 1, "gained": 1})
    labelled = _bundle(rows, labels=400)
    assert make_policy("cloud", labelled, accuracy_drop=0.01).decide(EST).codec == "q2c"
    assert make_policy("cloud", labelled, fidelity_budget=0.99).decide(EST).codec == "f32"  # agreement
    worse = _bundle(_rows({"fidelity": 0.97, "n": 400, "lost": 9, "gained": 2}), labels=400)
    assert make_policy("cloud", worse, accuracy_drop=0.01).decide(EST).codec == "f32"
    # EdgeClient passes its agreement budget to every policy: the accuracy drop wins
    assert make_policy("cloud", labelled, fidelity_budget=0.99, accuracy_drop=0.01).decide(EST).codec == "q2c"
    with pytest.raises(ConfigError, match="labels"):
        make_policy("adaptive", _bundle(_rows({"fidelity": 1.0, "n": 400})), accuracy_drop=0.01)
    with pytest.raises(ConfigError, match="confidence"):
        make_policy("adaptive", labelled, confidence=1.0)
