"""Profiling a small real compiled model, and the profile feeding a policy."""

from __future__ import annotations

import datetime
import json

import pytest
import torch

import splitinfer as si
from splitinfer.errors import ConfigError, CutNotLoadedError
from splitinfer.partitioner import Estimates, make_policy, profile_bundle
from tests.conftest import TORCH_ONLY


@pytest.fixture(scope="module")
def mlp_bundle() -> si.Bundle:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
    return si.compile(model, (torch.randn(1, 8),), name="t", runtimes=TORCH_ONLY)


def test_profile_format(mlp_bundle, capsys):
    profile = profile_bundle(mlp_bundle, batch_sizes=(4,), repeats=3, warmup=1)
    n = mlp_bundle.n_segments
    assert set(profile) >= {"machine", "created", "segments", "codecs", "response_bytes"}
    datetime.datetime.fromisoformat(profile["created"])
    assert set(profile["segments"]) == {"1", "4"}  # batch 1 always
    for seg in profile["segments"].values():
        assert len(seg["median_s"]) == len(seg["p90_s"]) == n
        assert all(m > 0 for m in seg["median_s"])
    pairs = {(r["cut"], r["codec"]) for r in profile["codecs"]}
    assert pairs == {(k, c) for k in range(n) for c in mlp_bundle.codecs}
    for r in profile["codecs"]:
        assert r["encode_s"] > 0 and r["decode_s"] > 0 and r["bytes"] > 0
    assert profile["response_bytes"] >= 4 * 4
    # issue 28: timed in interleaved rounds, at least `repeats` of them, and what stayed suspect
    assert all(r >= 3 for r in profile["rounds"].values()) and set(profile["rounds"]) == {"1", "4"}
    assert isinstance(profile["suspects"], list)
    json.dumps(profile)  # what the manifest stores
    assert "profile t" in capsys.readouterr().err  # the progress bar


def test_a_codec_that_does_not_exist_is_skipped_with_a_warning(mlp_bundle):
    with pytest.warns(RuntimeWarning, match="skipping codec 'zz9'"):
        profile = profile_bundle(mlp_bundle, codecs=["f32", "zz9"], repeats=1, warmup=0, progress=False)
    assert {r["codec"] for r in profile["codecs"]} == {"f32"}


def test_profile_drives_a_policy(mlp_bundle):
    mlp_bundle.profiles["host"] = profile_bundle(mlp_bundle, repeats=2, warmup=0, progress=False)
    try:
        policy = make_policy("adaptive", mlp_bundle, explore=0.0)
        slow_device = Estimates(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.0, device_slowdown=1e4)
        no_link = Estimates(uplink_bps=1.0, downlink_bps=1.0, rtt_s=1.0)
        assert policy.decide(no_link).cut == mlp_bundle.last_cut
        d = policy.decide(slow_device)  # the least device work of all: a cut near the input
        allowed = [c for c in policy.explain(slow_device).candidates if c.feasible]
        device = [c.stages["head"] + c.stages.get("encode", 0.0) for c in allowed]
        assert d.cut < mlp_bundle.last_cut
        assert d.stages["head"] + d.stages["encode"] <= min(device) + 1e-4
    finally:
        mlp_bundle.profiles.clear()


def test_profile_needs_every_segment_and_sane_settings(mlp_bundle, tmp_path):
    path = mlp_bundle.save(tmp_path / "b")
    with pytest.raises(CutNotLoadedError, match="every segment"):
        profile_bundle(si.Bundle.load(path, upto_cut=1), progress=False)
    with pytest.raises(ConfigError, match="repeats"):
        profile_bundle(mlp_bundle, repeats=0, progress=False)
    with pytest.raises(ConfigError, match="batch_sizes"):
        profile_bundle(mlp_bundle, batch_sizes=(0,), progress=False)
