"""The locust load test, short: real bundle, real server and real locust, each in a subprocess.

locust patches sockets with gevent when imported, so neither this process nor the server may
import it: both run as subprocesses (``splitinfer serve`` on a free port, ``python -m locust``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import splitinfer as si
from splitinfer.errors import BundleError
from splitinfer.lab import Recording, ServerProcess, demo_model, prepare

ROOT = Path(__file__).resolve().parents[3]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
POLICIES = {"adaptive", "neurosurgeon", "cloud", "static", "local"}

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import locust"], capture_output=True).returncode != 0,
    reason="locust is not installed (pip install -e '.[loadtest]')",
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A profiled bundle of the demo CNN (lossless codecs: no calibration) and its recording."""
    root = tmp_path_factory.mktemp("loadtest")
    bundle = si.compile(demo_model(seed=0), (torch.rand(1, 3, 32, 32),), name="democnn", profile=True)
    bundle.save(root / "repo" / "democnn")
    recording = root / "democnn.rec"
    prepare(root / "repo" / "democnn", recording, samples=2)
    return root / "repo", recording


@pytest.fixture(scope="module")
def server_url(prepared: tuple[Path, Path]) -> Iterator[str]:
    repo, _ = prepared
    with ServerProcess(repo) as server:
        yield server.url


def test_recording_holds_what_the_policies_send(prepared: tuple[Path, Path]) -> None:
    _, path = prepared
    rec = Recording(path)
    assert rec.bundle.name == "democnn"
    assert rec.static is not None and 0 < rec.static[0] < rec.bundle.last_cut
    assert rec.static in rec
    for cut, codec in rec.pairs:
        for payload, tensors in rec.frames(cut, codec):
            assert len(payload) > 0
            want = [list(t.shape)[1:] for t in rec.bundle.cuts[cut].tensors]
            assert [list(t.shape)[1:] for t in tensors] == want


def test_recording_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.rec"
    bad.write_bytes(b"not a recording at all")
    with pytest.raises(BundleError, match="loadtest prepare"):
        Recording(bad)


@pytest.mark.slow
def test_locust_run_serves_every_policy(prepared: tuple[Path, Path], server_url: str, tmp_path: Path) -> None:
    _, recording = prepared
    env = {**os.environ, "SPLITLOAD_SHAPE": ""}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", server_url]
    cmd += ["--recording", str(recording), "--users", "10", "--spawn-rate", "10", "--run-time", "12s"]
    cmd += ["--interval", "0.5", "--fleet", "wifi:4,3g:16", "--csv", str(tmp_path / "run")]
    cmd += ["--splitload-out", str(tmp_path / "mix.json"), "--only-summary", "--stop-timeout", "10"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]

    with (tmp_path / "run_stats.csv").open() as f:
        rows = {r["Name"]: r for r in csv.DictReader(f) if r["Name"] != "Aggregated"}
    assert set(rows) == POLICIES, rows.keys()
    for name, row in rows.items():
        assert int(row["Request Count"]) >= 5, (name, row)
        assert int(row["Failure Count"]) == 0, (name, row)

    mix = json.loads((tmp_path / "mix.json").read_text())
    assert mix["process"] == {"torch": False}  # the locust process imported the real modules, not torch
    served = {p: 0 for p in POLICIES}
    sent = {p: 0 for p in POLICIES}
    for r in mix["rows"]:
        assert r["failures"] == 0, r
        served[r["policy"]] += r["requests"]
        sent[r["policy"]] += r["sent"]
    # The mix may also hold requests that ended after locust's last CSV write.
    assert all(served[p] >= int(rows[p]["Request Count"]) for p in POLICIES), served
    # `cloud` and `static` always send and `local` never does; `adaptive` and `neurosurgeon` may
    # keep every request on the device, depending on the profile this machine just measured.
    assert sent["local"] == 0 and sent["cloud"] > 0 and sent["static"] > 0, sent
    assert any(r["compute_s"] > 0 for r in mix["rows"] if r["sent"])  # Server-Timing was read
