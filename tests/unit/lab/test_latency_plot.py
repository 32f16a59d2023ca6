"""The demo's latency plot (issue 31, item 12): one panel per device, and in each, per policy, a
line of the rolling median over points for the requests, so that a reader sees which policy
wins where."""

from __future__ import annotations

import numpy as np
import pytest

from splitinfer.lab._report import Record, latency_figure, rolling_median, summarize, write_report
from splitinfer.netem import BandwidthTrace

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  # after choosing the Agg backend

POLICIES = ["adaptive", "neurosurgeon", "static", "local", "cloud"]


def records(devices=3, per_policy=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for d in range(devices):
        for i, policy in enumerate(POLICIES):
            for t in np.sort(rng.uniform(0, 60, per_policy)):
                latency = 0.05 * (i + 1) * (d + 1) * rng.lognormal(0, 0.3)
                out.append(Record(policy, float(t), latency, 2, "f32", 100, 10, "", True, 0.1, device=d))
    return out


def latency_panels(fig):
    return [ax for ax in fig.axes if ax.get_ylabel() == "latency, ms"]


def test_one_panel_per_device_with_a_median_line_and_points_per_policy():
    traces = [BandwidthTrace.load(n) for n in ("norway-3g-bus-1", "norway-3g-train-1", "norway-3g-tram-10")]
    fig = latency_figure(records(), POLICIES, traces, 60.0)
    try:
        panels = latency_panels(fig)
        assert len(panels) == 3
        for device, ax in enumerate(panels):
            assert [line.get_label() for line in ax.get_lines()] == POLICIES
            points = [c for c in ax.collections if len(c.get_offsets())]
            assert len(points) == len(POLICIES) and all(len(c.get_offsets()) == 40 for c in points)
            assert f"device {device + 1}: link {traces[device].name}" in ax.get_title(loc="left")
            # One colour per policy, the same in every panel.
            assert [line.get_color() for line in ax.get_lines()] == [f"C{i}" for i in range(5)]
    finally:
        plt.close(fig)


def test_a_single_device_run_has_one_panel():
    fig = latency_figure(records(devices=1), POLICIES, [BandwidthTrace.constant(2e6)], 60.0)
    try:
        assert len(latency_panels(fig)) == 1
    finally:
        plt.close(fig)


def test_the_rolling_median_is_not_dragged_by_one_slow_request():
    ts = [float(t) for t in range(10)]
    values = [1.0] * 10
    values[5] = 1000.0
    assert rolling_median(ts, values, 4.0) == [1.0] * 10
    assert rolling_median([0.0, 10.0], [1.0, 3.0], 4.0) == [1.0, 3.0]  # alone in its window


def test_the_report_writes_the_plot(tmp_path):
    import torch

    import splitinfer as si

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    bundle = si.compile(model, (torch.randn(1, 4),), name="tiny", runtimes=("torch",))
    rs = records()
    traces = [BandwidthTrace.load(n) for n in ("norway-3g-bus-1", "norway-3g-train-1", "norway-3g-tram-10")]
    write_report(
        tmp_path, title="t", facts=[], records=rs, bundle=bundle, duration_s=60.0,
        summaries=summarize(rs, last_cut=bundle.last_cut, policies=POLICIES),
        trace=traces[0], device_traces=traces,
    )  # fmt: skip
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
