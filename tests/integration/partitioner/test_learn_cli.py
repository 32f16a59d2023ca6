"""``splitinfer compile --train`` and ``inspect`` of the early exits, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

CLI = [sys.executable, "-m", "splitinfer"]

MODEL = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(64, 6))
"""


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def test_compile_train_and_inspect_the_exits(tmp_path):
    (tmp_path / "tinynet.py").write_text(MODEL)
    torch.save(torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1)), tmp_path / "train.pt")
    common = ["compile", "tinynet:make", "--input-shape", "1,3,8,8", "--name", "tiny"]
    out = run(*common, "--out", str(tmp_path / "b"), "--exits", "2", cwd=tmp_path)
    assert out.returncode != 0 and "--exits needs --train" in out.stderr
    out = run(
        *common,
        "--out",
        str(tmp_path / "b"),
        "--train",
        "train.pt",
        "--train-steps",
        "40",
        "--budget",
        "0.5",
        "--confidence",
        "0.75",
        "--seed",
        "2",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    shown = run("inspect", str(tmp_path / "b"))
    assert shown.returncode == 0, shown.stderr
    assert "early exit(s)" in shown.stdout
    doc = json.loads(run("inspect", str(tmp_path / "b"), "--json").stdout)
    assert len(doc["exits"]) == 2
    for e in doc["exits"]:
        assert e["samples"] == 12 and e["held_out_from"] == "training"
        assert e["training"]["seed"] == 2 and e["training"]["steps"] == 40
        assert e["offered"] == (e["threshold"] is not None)
        if e["offered"]:
            assert e["lo"] >= 0.5 and e["n"] == round(e["exit_rate"] * 12)
