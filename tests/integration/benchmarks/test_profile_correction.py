"""benchmarks/bench_profile_correction.py --live on the demo CNN: a real ``splitinfer serve``, a
link emulator and EdgeClients with a correct and a 3x-wrong profile, in a few seconds (the
benchmark runs it long on EfficientNet-Lite0; nothing here asserts a duration or a ratio)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import splitinfer as si
from splitinfer.lab import demo_model

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "bench_profile_correction.py"


@pytest.mark.timeout(300)  # two Python processes that import torch, on a shared machine
def test_live_half_runs_both_edges_and_writes_its_section(tmp_path: Path) -> None:
    bundle = si.compile(
        demo_model(seed=0), (torch.rand(1, 3, 32, 32),), name="democnn", runtimes=("torch",), profile=True
    )
    bundle.save(tmp_path / "repo" / "democnn")
    out = tmp_path / "profile.md"
    heading = "## A profile 3x wrong per segment, corrected on the edge (live)"
    before = "# Profiles\n\n## The replay\n\nkept as it is\n"
    out.write_text(f"{before}\n{heading}\n\nan earlier run's, replaced\n\n## After\n\nkept too\n")
    command = [
        sys.executable, str(SCRIPT), "--live", "--bundle", str(tmp_path / "repo" / "democnn"),
        "--live-rounds", "2", "--live-requests", "5", "--after", "2", "--live-slowdown", "2",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    # the section an earlier run wrote is replaced in place, the others kept
    assert text.startswith(f"{before}\n{heading}\n") and text.endswith("\n## After\n\nkept too\n")
    assert text.count(heading) == 1 and "an earlier run's" not in text
    row = r"^\| (correct|3x wrong per segment) \| (\d+) \| (\d+) \|"
    rows = {m[0]: m[1:] for m in re.findall(row, text, re.M)}
    # two rounds of one run per edge, 5 requests each, the first 2 not counted
    assert rows == {"correct": ("2", "6"), "3x wrong per segment": ("2", "6")}
    assert re.search(r"Wrong / correct: \*\*\d+\.\d{3}\*\* \(per round: \d+\.\d{3}, \d+\.\d{3}\)", text)
    assert "round 1 correct" in done.stderr and "round 2 wrong" in done.stderr
