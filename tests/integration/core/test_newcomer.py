"""A newcomer's first hour (issue 19, items 2, 3, 6, 7, 8, 11 and 12): unmeasured codecs are
never used silently, compile says what cannot work, the CLI is as capable as the API, profiles
on a busy machine say so, and the docs tell the truth."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import splitinfer as si
from splitinfer.errors import CaptureError, ConfigError
from splitinfer.partitioner import make_policy

ROOT = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "splitinfer"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, **kw)


class Sensor(nn.Module):
    """A 1-D sensor net: (batch, 6 channels, 128 samples) in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 8, 5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(-1))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, cnn):
    """The demo CNN with lossy rows, one of them removed: a (cut, codec) never measured."""
    calibration = [(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    bundle = si.compile(cnn, (torch.rand(1, 3, 32, 32),), name="democnn", calibration=calibration,
                        codecs=["f32", "q8+zstd1"])  # fmt: skip
    bundle.fidelity["table"] = [
        r for r in bundle.fidelity["table"] if not (r["cut"] == 2 and r["codec"] == "q8+zstd1")
    ]
    root = tmp_path_factory.mktemp("unmeasured")
    bundle.save(root / "democnn")
    return bundle, root / "democnn"


# -- item 2: unmeasured codecs -------------------------------------------------------------


def test_static_refuses_an_unmeasured_lossy_codec_unless_told_and_then_warns(calibrated, caplog):
    bundle, _ = calibrated
    with pytest.raises(ConfigError, match="no fidelity row for lossy codec q8\\+zstd1 at cut 2"):
        make_policy("static", bundle, cut=2, codec="q8+zstd1")
    make_policy("static", bundle, cut=3, codec="q8+zstd1")  # measured: fine
    make_policy("static", bundle, cut=2, codec="f32")  # lossless: exact by definition
    caplog.set_level(logging.WARNING, logger="splitinfer.partitioner")
    policy = make_policy("static", bundle, cut=2, codec="q8+zstd1", allow_unmeasured=True)
    assert policy.decide(si.partitioner.Estimates(1e6, 1e6, 0.05)).codec == "q8+zstd1"
    assert [r.levelno for r in caplog.records if "no fidelity row" in r.getMessage()] == [logging.WARNING]


def test_adaptive_never_picks_the_unmeasured_row(calibrated):
    from splitinfer.partitioner._costs import CostModel

    bundle, _ = calibrated
    model = CostModel(bundle)
    row = int(np.flatnonzero((model.cut == 2) & (model.codec_index == model.codecs.index("q8+zstd1")))[0])
    assert model.exclusions(0.5, None)[row]  # unknown fidelity: infeasible under any budget > 0


def test_inspect_marks_unmeasured_cells(calibrated):
    _, path = calibrated
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if re.match(r"\s+2\s", line))
    assert "*" in line
    assert "unmeasured" in out.stdout
    assert out.stdout.count("tensors\n") == 1  # the header, once


# -- item 3: jpeg on a non-image model -----------------------------------------------------


def test_jpeg_on_a_model_without_image_inputs_is_refused_at_compile_time():
    calibration = [(torch.randn(1, 6, 128),) for _ in range(2)]
    with pytest.raises(ConfigError, match="image batches"):
        si.compile(Sensor().eval(), (torch.randn(1, 6, 128),), name="sensor", calibration=calibration,
                   codecs=["jpeg90"])  # fmt: skip


# -- item 7: batch-first ------------------------------------------------------------------


def test_example_inputs_without_a_batch_dim_are_named():
    with pytest.raises(ConfigError, match=re.escape("batch-first: input 0 has shape (6, 128)")):
        si.compile(Sensor().eval(), (torch.randn(6, 128),), name="sensor")


# -- item 6: the CLI's compile -------------------------------------------------------------


def test_cli_compile_takes_inputs_calibration_codecs_and_profile_files(tmp_path):
    (tmp_path / "sensors.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Sensor(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv1d(6, 8, 5)\n"
        "        self.head = nn.Linear(8, 3)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.conv(x)).mean(-1))\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Sensor().eval()\n"
    )
    torch.save((torch.randn(1, 6, 128),), tmp_path / "example.pt")
    np.savez(tmp_path / "calibration.npz", np.random.default_rng(0).standard_normal((6, 6, 128), np.float32))
    out = run(
        "compile", "sensors:make", "--example-inputs", "example.pt", "--calibration", "calibration.npz",
        "--codecs", "f32,q8+zstd1", "--profile", "--name", "sensor", "--out", str(tmp_path / "sensor"),
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "sensor" / "manifest.json").read_text())
    assert manifest["codecs"] == ["f32", "q8+zstd1"] and "host" in manifest["profiles"]
    assert any(r["codec"] == "q8+zstd1" for r in manifest["fidelity"]["table"])
    fidelity = manifest["fidelity"]  # no --evaluation: every second calibration input is held out
    assert (fidelity["samples"], fidelity["calibration_samples"], fidelity["held_out_from"]) == (3, 3, "calibration")
    bad = run(
        "compile", "sensors:make", "--example-inputs", "nope.pt", "--name", "s", "--out", "o", cwd=tmp_path
    )
    assert bad.returncode == 2 and "no file" in bad.stderr
    none = run("compile", "sensors:make", "--name", "s", "--out", "o", cwd=tmp_path)
    assert none.returncode == 2 and "--example-inputs" in none.stderr


def test_cli_random_bool_inputs_mask_nothing():
    from splitinfer.partitioner._cli import _random_inputs

    _, mask = _random_inputs(["1,12", "1,12"], ["int64", "bool"])
    assert mask.dtype == torch.bool and not mask.any()  # all True would pad every position


def test_a_chain_that_differs_names_the_output_the_difference_and_nans():
    from splitinfer.partitioner._capture import _check_equal

    want = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(CaptureError, match=r"output 0 differs by up to 0\.5.*1 NaN"):
        _check_equal([torch.tensor([[float("nan"), 1.5]])], [want])


# -- item 8: the CLI's units and checks ----------------------------------------------------


def test_netem_delay_needs_a_unit_and_inspect_budget_is_checked(calibrated):
    out = run("netem", "--upstream", "127.0.0.1:9", "--rate", "2Mbit", "--delay", "50")
    assert out.returncode == 2 and "unit" in out.stderr
    _, path = calibrated
    out = run("inspect", str(path), "--budget", "1.5")
    assert out.returncode == 2 and "--budget" in out.stderr


def test_serve_says_a_bundle_is_not_a_repository(calibrated):
    _, path = calibrated
    out = run("serve", "--repository", str(path))
    assert out.returncode == 2
    assert "is a bundle" in out.stderr and str(path.parent) in out.stderr


def test_serve_does_not_claim_to_serve_before_the_bind_fails(calibrated):
    _, path = calibrated
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("serve", "--repository", str(path.parent), "--port", str(port), "--log-level", "INFO")
    assert out.returncode != 0 and "cannot listen" in out.stderr
    assert "serving" not in out.stderr


# -- item 11: profiles on a busy machine ---------------------------------------------------


def test_a_profile_on_a_busy_machine_says_how_to_re_profile():
    from splitinfer.partitioner._profile import busy_warning

    assert busy_warning("m", [0.0007, 0.0008, 0.0009], 0.2) is None
    wild = busy_warning("m", [0.0007, 0.098, 0.0009], 0.2)
    assert wild is not None and "0.7 to 98 ms" in wild and "splitinfer profile" in wild
    loaded = busy_warning("m", [0.0007, 0.0008], 3.5)
    assert loaded is not None and "3.50 per core" in loaded


def test_profiles_record_their_spread_and_load(cnn):
    from splitinfer.partitioner import profile_bundle

    bundle = si.compile(cnn, (torch.rand(1, 3, 32, 32),), name="democnn")
    profile = profile_bundle(bundle, batch_sizes=(1,), repeats=2, progress=False)
    assert profile["spread"] >= 1.0 and "load_per_core" in profile


# -- item 12: docs that told lies ----------------------------------------------------------


def test_the_docs_say_what_the_code_does():
    from splitinfer.edge import _client

    decision = (ROOT / "docs" / "decision.md").read_text()
    assert "2 Mbit/s up, 8 Mbit/s down, 50 ms round trip" in decision
    source = (ROOT / "edge" / "_client.py").read_text()
    assert "Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.05)" in source and _client
    assert "arrives with" not in (ROOT / "examples" / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "[--listen 127.0.0.1:9000]" not in readme
    assert "no profile" in readme and "--example-inputs" in readme
    assert "DEFAULT_CODECS" not in (si.compile.__doc__ or "")


def test_the_plan_plot_title_fits(calibrated, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from splitinfer.partitioner import Estimates, _cli

    bundle, _ = calibrated
    explanation = make_policy("cloud", bundle).explain(Estimates(2e6, 8e6, 0.05))
    titles = []
    close = plt.close

    def keep(fig=None):
        if fig is not None:
            fig.canvas.draw()
            ax = fig.axes[0]
            titles.append((ax.title.get_window_extent(), fig.bbox))
        close(fig)

    plt.close = keep
    try:
        _cli.plot_plan(explanation, bundle.last_cut, tmp_path / "plan.png")
    finally:
        plt.close = close
    (title, figure), = titles  # fmt: skip
    assert figure.x0 <= title.x0 and title.x1 <= figure.x1  # not clipped
