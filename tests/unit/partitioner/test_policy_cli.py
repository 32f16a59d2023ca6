"""`splitinfer plan` and `splitinfer profile`, through their own argparse parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import splitinfer as si
from splitinfer._units import parse_duration, parse_rate
from splitinfer.errors import ConfigError
from splitinfer.manifest import read_manifest
from splitinfer.partitioner._cli import add_plan_parser, add_profile_parser
from tests.conftest import TORCH_ONLY


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="splitinfer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)
    add_profile_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    bundle = si.compile(model, (torch.randn(1, 8),), name="t", runtimes=TORCH_ONLY)
    return bundle.save(tmp_path_factory.mktemp("cli") / "t")


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("2Mbit", 2e6),
        ("500kbit", 5e5),
        ("1.5Gbit", 1.5e9),
        ("2Mbit/s", 2e6),
        ("20mbps", 2e7),
        ("250kB/s", 2e6),
        (" 3e3bit ", 3e3),
    ],
)
def test_parse_rate(text, bps):
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["2", "2M", "2MB", "-1Mbit", "0kbit", "fast", "2Mbit/h", "2mbps/s"])
def test_parse_rate_errors(text):
    with pytest.raises(ConfigError, match="such as 2Mbit"):
        parse_rate(text)


@pytest.mark.parametrize(("text", "s"), [("80ms", 0.08), ("0.1s", 0.1), ("250us", 250e-6), ("1min", 60.0)])
def test_parse_duration(text, s):
    assert parse_duration(text) == pytest.approx(s)


@pytest.mark.parametrize("text", ["80", "80 msec", "-1ms", "soon"])
def test_parse_duration_errors(text):
    with pytest.raises(ConfigError, match="such as 80ms"):
        parse_duration(text)


def test_profile_then_plan(saved, capsys, tmp_path):
    assert run(["profile", str(saved), "--name", "host", "--repeats", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "profile 'host' of t" in out
    profiles = read_manifest(saved)["profiles"]
    assert set(profiles) == {"host"}
    assert si.Bundle.load(saved).profiles["host"]["segments"]["1"]["median_s"]

    argv = ["plan", str(saved), "--uplink", "2Mbit", "--rtt", "80ms", "--device-slowdown", "8", "--top", "3"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "winner: cut" in out and "rank" in out

    png = tmp_path / "plan.png"
    assert run([*argv, "--plot", str(png), "--policy", "neurosurgeon"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_errors(saved):
    with pytest.raises(ConfigError, match="--uplink must be a positive rate"):
        run(["plan", str(saved), "--uplink", "2"])
    with pytest.raises(ConfigError, match="--rtt must be a duration"):
        run(["plan", str(saved), "--uplink", "2Mbit", "--rtt", "80"])
    with pytest.raises(ConfigError, match="valid policies"):
        run(["plan", str(saved), "--uplink", "2Mbit", "--policy", "greedy"])
    with pytest.raises(ConfigError, match="no profile 'phone'"):
        run(["plan", str(saved), "--uplink", "2Mbit", "--profile", "phone"])
    with pytest.raises(ConfigError, match="--name"):
        run(["profile", str(saved), "--name", "a/b"])


def test_each_subcommand_has_help(capsys):
    for cmd in ("plan", "profile"):
        with pytest.raises(SystemExit) as exc:
            run([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: splitinfer " + cmd in capsys.readouterr().out
