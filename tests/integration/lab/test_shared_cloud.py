"""A shared cloud, short: 24 edge devices on real trace stretches and a ramping tenant against one
``splitinfer serve`` subprocess (benchmarks/bench_shared_cloud.py runs it long, on EfficientNet-Lite0)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from splitinfer.lab._demo import MODELS, prepare_bundle, stretch
from splitinfer.lab._live import live_stack
from splitinfer.lab._shared import Device, run_shared, tenant_rate
from splitinfer.netem import BandwidthTrace

TRACES = ["norway-3g-bus-1", "norway-3g-train-1", "norway-3g-tram-10", "fcc-hsdpa-ferry-10-part0"]


def test_the_tenant_ramps_up_and_down():
    assert tenant_rate(0.0, 10.0, 50.0) == 0.0
    assert tenant_rate(5.0, 10.0, 50.0) == 50.0
    assert tenant_rate(2.5, 10.0, 50.0) == tenant_rate(7.5, 10.0, 50.0) == 25.0
    assert tenant_rate(11.0, 10.0, 50.0) == 0.0


@pytest.mark.slow
def test_24_devices_and_a_tenant_share_one_cloud(tmp_path: Path):
    spec = MODELS["democnn"]
    repo = prepare_bundle(spec, tmp_path / "cache", lambda line: None, False)
    speeds = [0.25, 0.5, 1.0, 2.0, 4.0]
    devices = [
        Device(stretch(BandwidthTrace.load(TRACES[i % 4]), 7.0 * i), 10.0 / speeds[i % 5]) for i in range(24)
    ]
    with live_stack(repo, spec.name, spec.image_size) as live:
        for policy in ("adaptive", "cloud"):
            result = asyncio.run(
                run_shared(
                    url=live.server.url,
                    server_pid=live.server.pid,
                    bundle=live.bundle,
                    repo_model=repo / spec.name,
                    policy=policy,
                    devices=devices,
                    images=live.images,
                    reference=live.reference,
                    duration_s=4.0,
                    tenant_peak_rps=100.0,
                    interval_s=0.25,
                )
            )
            served = {r[0] for r in result.requests}
            assert served == set(range(24)), policy  # every device was answered
            # lossy codecs met the budget on the demo CNN's 8 calibration inputs, not on these photos
            assert result.agree >= 0.75 * len(result.latencies)
            assert result.tenant_sent > 0 and result.tenant_ok + result.tenant_shed >= result.tenant_sent
            assert result.utilisation and max(u[1] for u in result.utilisation) > 0
            summary = result.summary(slo_s=1.0)
            assert (
                summary["requests"] == len(result.latencies) and summary["p95_s"] >= summary["mean_s"] * 0.5
            )
            if policy == "cloud":
                assert summary["cloud_share"] > 0
