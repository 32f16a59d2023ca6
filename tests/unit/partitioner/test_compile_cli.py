"""``splitinfer compile``, ``inspect`` and ``plan`` with the fidelity flags (issue 28 items 1-2,
issue 31 items 1, 2, 4 and 6's inspect): in-process through the dispatcher's ``main``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from splitinfer.cli import main

MODEL = """
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))

def make():
    return Tiny().eval()
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "tinycls.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _images(folder, n, *, size=20, labelled=True, seed=0):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        name = f"{i % 10:03d}_photo{i}.png" if labelled else f"photo{i}.png"
        Image.fromarray(pixels).save(folder / name)
    return folder


def _compile(*extra):
    return main(["compile", "tinycls:make", "--input-shape", "1,3,16,16", "--name", "tiny", *extra])


def test_evaluation_folder_of_labelled_images_gives_accuracy_and_inspect_json(project, capsys):
    cal, ev = _images(project / "cal", 6, seed=1), _images(project / "ev", 10, seed=2)
    args = [
        "--calibration",
        str(cal),
        "--evaluation",
        str(ev),
        "--image-size",
        "16",
        "--codecs",
        "f32,q8,q2c",
    ]
    assert _compile(*args, "--out", "b") == 0
    doc = json.loads((project / "b" / "manifest.json").read_text())
    fidelity = doc["fidelity"]
    assert (fidelity["samples"], fidelity["calibration_samples"], fidelity["labels"]) == (10, 6, 10)
    assert 0.0 <= fidelity["float_accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["inspect", "b", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["verified"] is True and table["confidence"] == 0.9 and table["interval_method"] == "wilson"
    assert table["float_accuracy"] == fidelity["float_accuracy"]
    row = next(r for r in table["rows"] if r["cut"] == 0 and r["codec"] == "q2c")
    assert {"cut", "codec", "bytes", "agreement", "lo", "hi", "n", "accuracy", "admitted", "decided"} <= set(
        row
    )
    assert row["n"] == 10 and row["lo"] <= row["agreement"] <= row["hi"]
    assert main(["plan", "b", "--uplink", "1Mbit", "--policy", "cloud", "--accuracy-drop", "0.05"]) == 0
    assert "accuracy drop <= 0.05 at confidence 0.9" in capsys.readouterr().out


def test_images_are_loaded_at_the_size_with_imagenet_normalisation(project):
    from splitinfer.partitioner._inputs import IMAGENET_MEAN, IMAGENET_STD, load_images

    folder = project / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.full((30, 40, 3), 255, np.uint8)).save(folder / "007_white.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "042_black.png")
    batch, labels = load_images(folder, 16)
    assert batch.shape == (2, 3, 16, 16) and labels == [7, 42]
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(batch[0, :, 8, 8], white, atol=1e-5)
    raw, _ = load_images(folder, 16, normalize=False)
    assert float(raw[1].max()) == 0.0 and float(raw[0].min()) == 1.0


def test_an_unlabelled_folder_has_no_labels_and_a_half_labelled_one_is_refused(project, capsys):
    from splitinfer.partitioner._inputs import load_images

    _, labels = load_images(_images(project / "u", 3, labelled=False), 16)
    assert labels is None
    mixed = _images(project / "m", 2)
    (mixed / "cat.png").write_bytes((mixed / "000_photo0.png").read_bytes())
    assert _compile("--calibration", str(mixed), "--image-size", "16", "--out", "o") == 2
    assert "'cat.png' does not" in capsys.readouterr().err


def test_compile_refuses_an_existing_bundle_unless_forced_and_checks_before_building(project, capsys):
    cal = project / "cal.pt"
    torch.save((torch.randn(4, 3, 16, 16),), cal)
    assert _compile("--calibration", str(cal), "--codecs", "f32,q8", "--out", "b") == 0
    before = (project / "b" / "manifest.json").read_text()
    capsys.readouterr()
    assert _compile("--out", "b") == 2
    err = capsys.readouterr().err
    assert "--out b is an existing bundle: pass --force" in err
    assert (project / "b" / "manifest.json").read_text() == before  # untouched
    assert _compile("--out", "b", "--force") == 0
    assert (project / "b" / "manifest.json").read_text() != before
    assert not [p for p in project.iterdir() if p.name.startswith(".b.")]  # no temporary left
    (project / "notes").mkdir()
    (project / "notes" / "todo.txt").write_text("mine")
    assert _compile("--out", "notes", "--force") == 2
    assert "not a bundle" in capsys.readouterr().err and (project / "notes" / "todo.txt").exists()


def test_cli_messages_use_the_cli_words(project, capsys, caplog):
    assert _compile("--codecs", "f32,q8", "--out", "o") == 2
    err = capsys.readouterr().err
    assert "--calibration FILE|DIR" in err and "calibration=[" not in err
    wrong = project / "wrong.pt"
    torch.save((torch.randn(5, 6, 128),), wrong)
    assert _compile("--calibration", str(wrong), "--out", "o") == 2
    err = capsys.readouterr().err
    assert f"--calibration {wrong}: tensor 0 has rows of float32[6x128]" in err
    assert "input 0 is float32[3x16x16]" in err and "N x 3x16x16" in err
    cal = project / "cal.pt"
    torch.save((torch.randn(4, 3, 16, 16),), cal)
    with caplog.at_level(logging.WARNING, logger="splitinfer.partitioner"):
        assert _compile("--calibration", str(cal), "--codecs", "f32,q8", "--out", "o") == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "no --evaluation inputs" in said and "--evaluation FILE|DIR" in said
    assert "evaluation=[" not in said


def test_fidelity_all_cuts_flag_measures_every_cut(project):
    cal = project / "cal.pt"
    torch.save((torch.randn(4, 3, 16, 16),), cal)
    assert _compile("--calibration", str(cal), "--codecs", "f32,q8", "--fidelity-all-cuts", "--out", "b") == 0
    doc = json.loads((project / "b" / "manifest.json").read_text())
    cuts = {r["cut"] for r in doc["fidelity"]["table"] if r["codec"] == "q8"}
    assert cuts == set(range(len(doc["cuts"])))


def test_inspect_marks_undecided_rows_and_warns_on_a_damaged_bundle(project, capsys):
    cal = project / "cal.pt"
    torch.save((torch.randn(8, 3, 16, 16),), cal)
    assert _compile("--calibration", str(cal), "--codecs", "f32,q8", "--out", "b") == 0
    manifest = project / "b" / "manifest.json"
    doc = json.loads(manifest.read_text())
    for row in doc["fidelity"]["table"]:  # make every lossy row a perfect score on 4 inputs
        if row["codec"] == "q8":
            row.update(fidelity=1.0, n=4)
    manifest.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["inspect", "b"]) == 0
    out = capsys.readouterr().out
    assert "files    " in out and "verified against their sha256" in out
    assert "? at " in out and "cannot decide" in out and "about 163 evaluation inputs would decide it" in out
    assert main(["inspect", "b", "--json", "--budget", "0.95"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    q8 = next(r for r in rows if r["codec"] == "q8" and r["cut"] == 0)
    assert q8["decided"] is False and q8["inputs_to_decide"] == 32 and q8["admitted"] is False
    segment = next(p for p in (project / "b").iterdir() if p.name.startswith("segment"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert main(["inspect", "b"]) == 1
    captured = capsys.readouterr()
    assert f"DAMAGED: {segment.name} (sha256 differs" in captured.out and "damaged" in captured.err
    assert main(["inspect", "b", "--no-verify"]) == 0
    assert "not verified" in capsys.readouterr().out
    assert main(["inspect", "b", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verified"] is False


def test_plan_takes_the_budget_flags(project, capsys):
    cal = project / "cal.pt"
    torch.save((torch.randn(4, 3, 16, 16),), cal)
    assert _compile("--calibration", str(cal), "--codecs", "f32,q8", "--profile", "--out", "b") == 0
    capsys.readouterr()
    assert main(["plan", "b", "--uplink", "1Mbit", "--confidence", "0.9"]) == 0
    assert "at confidence 0.9" in capsys.readouterr().out
    assert main(["plan", "b", "--uplink", "1Mbit", "--accuracy-drop", "0.01"]) == 2
    assert "labels" in capsys.readouterr().err
    assert main(["plan", "b", "--uplink", "1Mbit", "--confidence", "1.5"]) == 2


def test_bottleneck_cuts_train_the_named_bn_codec_and_its_absence_names_the_flags(project, capsys):
    cal, train = project / "cal.pt", project / "train.pt"
    torch.save((torch.randn(8, 3, 16, 16),), cal)
    torch.save((torch.randn(16, 3, 16, 16),), train)
    common = ("--calibration", str(cal), "--codecs", "f32,bn2q2+zstd1")
    assert _compile(*common, "--out", "o") == 2
    err = capsys.readouterr().err
    assert "pass --train inputs" in err and "--bottleneck-cuts" in err
    extra = ("--train", str(train), "--bottleneck-cuts", "1", "--exits", "", "--train-steps", "3")
    assert _compile(*common, *extra, "--out", "b") == 0
    doc = json.loads((project / "b" / "manifest.json").read_text())
    assert list(doc["bottlenecks"]["1"]) == ["bn2q2"] and "exits" not in doc
    assert any(r["cut"] == 1 and r["codec"] == "bn2q2+zstd1" for r in doc["fidelity"]["table"])
