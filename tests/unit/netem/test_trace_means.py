"""A trace's mean has one definition, time-weighted, in the code, the tool and the docs (issue 31,
item 11)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from splitinfer.netem import BandwidthTrace, shipped_traces
from splitinfer.netem._cli import _describe_link

DOCS = Path(__file__).resolve().parents[3] / "docs" / "netem.md"


def test_the_mean_weights_each_rate_by_how_long_it_holds():
    # 10 Mbit/s for 1 s, then 1 Mbit/s for 9 s: the link carries 19 Mbit in 10 s.
    trace = BandwidthTrace((0.0, 1.0), (10e6, 1e6), 10.0)
    assert trace.mean_bps() == pytest.approx(1.9e6)  # the plain average would say 5.5


def test_the_tool_prints_the_time_weighted_mean():
    trace = BandwidthTrace.load("norway-3g-bus-1")
    line = _describe_link(trace, 0.04)
    assert f"time-weighted mean {trace.mean_bps() / 1e6:.2f} Mbit/s" in line
    assert "delay 40 ms" in line


def test_the_docs_give_every_shipped_trace_its_time_weighted_mean():
    text = DOCS.read_text()
    assert "time-weighted" in text
    documented = dict(re.findall(r"^\| `([\w-]+)` \| ([\d.]+) \|$", text, re.MULTILINE))
    assert set(documented) == set(shipped_traces())
    for name, mean in documented.items():
        assert float(mean) == pytest.approx(BandwidthTrace.load(name).mean_bps() / 1e6, abs=0.005), name
