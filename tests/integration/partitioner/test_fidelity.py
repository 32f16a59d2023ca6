"""The fidelity table and calibrated ranges that compile measures, and where they end up."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import pytest
import torch

import splitinfer as si
from splitinfer.compression import ClipRanges
from splitinfer.errors import ConfigError
from tests.support.zoo import ZOO, batched

CODECS = ["f32", "f32+zstd1", "f16+zstd1", "q8+zstd1", "q4c+zstd1", "q2c"]


@pytest.fixture(scope="module")
def calibrated():
    model, inputs = ZOO["mobilenet"]()
    calibration = [batched(inputs, 1, seed=i) for i in range(12)]
    # no evaluation inputs: every second calibration input is held out for the table; the untrained
    # model's top-1 is one class on them (a degenerate reference), so top-1 is named to keep it
    bundle = si.compile(
        model,
        inputs,
        name="mnet",
        calibration=calibration,
        codecs=CODECS,
        fidelity_all_cuts=False,
        fidelity_metric="top1",
    )
    return model, bundle, calibration


def _table(bundle):
    return {(r["cut"], r["codec"]): r for r in bundle.fidelity["table"]}


def _measured(bundle):
    """Cuts with lossy rows: the input, and every cut no larger than it (but the last)."""
    return [c.index for c in bundle.cuts[:-1] if c.index == 0 or c.nbytes <= bundle.cuts[0].nbytes]


def test_every_cut_has_lossless_rows_and_small_cuts_lossy_ones(calibrated):
    _, bundle, _ = calibrated
    table = _table(bundle)
    assert bundle.codecs == CODECS
    assert bundle.fidelity["metric"] == "top1"
    assert (bundle.fidelity["samples"], bundle.fidelity["calibration_samples"]) == (6, 6)
    assert bundle.fidelity["held_out_from"] == "calibration"
    assert bundle.fidelity["method"] == "auto"
    measured = _measured(bundle)
    assert 0 < len(measured) < bundle.last_cut  # the rule skips the cuts larger than the input
    for cut in bundle.cuts:
        for spec in CODECS:
            row = table.get((cut.index, spec))
            if spec.startswith("f32") or cut.index in measured or cut.index == bundle.last_cut:
                assert 0.0 <= row["fidelity"] <= 1.0
            else:
                assert row is None
            if spec.startswith("f32"):
                assert row["fidelity"] == 1.0
    assert table[(bundle.last_cut, "q2c")]["bytes"] == 0.0


def test_auto_calibration_picks_a_method_per_cut_and_codec(calibrated):
    _, bundle, _ = calibrated
    methods = {r["method"] for by_base in bundle.calibration.values() for r in by_base.values()}
    assert methods <= {"minmax", "percentile", "mse"}
    assert len(methods) >= 2  # measured, not one method everywhere


def test_all_cuts_measures_lossy_codecs_everywhere():
    model, inputs = ZOO["mobilenet"]()
    calibration = [batched(inputs, 1, seed=i) for i in range(4)]
    bundle = si.compile(
        model,
        inputs,
        name="m",
        calibration=calibration,
        codecs=["f32", "q8"],
        calibration_method="minmax",
        fidelity_all_cuts=True,
    )
    assert {r["cut"] for r in bundle.fidelity["table"] if r["codec"] == "q8"} == set(range(len(bundle.cuts)))
    assert {r["method"] for by_base in bundle.calibration.values() for r in by_base.values()} == {"minmax"}


def test_quantized_codecs_shrink_and_cost_fidelity_in_order(calibrated):
    _, bundle, _ = calibrated
    table = _table(bundle)
    inner = _measured(bundle)
    for k in (c.index for c in bundle.cuts if c.index in inner and c.nbytes >= 4096):  # not tiny ones
        assert (
            table[(k, "q4c+zstd1")]["bytes"] < table[(k, "f16+zstd1")]["bytes"] < table[(k, "f32")]["bytes"]
        )
    mean = {
        spec: sum(table[(k, spec)]["fidelity"] for k in inner) / len(inner) for spec in ("q8+zstd1", "q2c")
    }
    assert mean["q8+zstd1"] >= mean["q2c"]
    assert mean["q8+zstd1"] > 0.9


def test_fidelity_is_what_the_tail_gives_on_decoded_frontiers(calibrated):
    """Recompute one entry by hand: the table is measured, not guessed."""
    model, bundle, calibration = calibrated
    measured = _measured(bundle)
    k = measured[len(measured) // 2]
    x = torch.cat([c[0] for c in calibration[1::2]])  # the inputs held out of the calibration
    codec = bundle.codec_for(k, "q2c")
    frontier = bundle.head(k, x)
    out = bundle.tail(k, codec.decode(codec.encode(list(frontier))))
    with torch.no_grad():
        want = model(x)
    expected = float((out.argmax(1) == want.argmax(1)).float().mean())
    assert _table(bundle)[(k, "q2c")]["fidelity"] == pytest.approx(expected, abs=1e-6)


def test_ranges_are_stored_per_cut_and_survive_save_and_load(tmp_path, calibrated):
    _, bundle, _ = calibrated
    for k in _measured(bundle):
        assert {"q8", "q4c", "q2c"} <= set(bundle.calibration[str(k)])
        ClipRanges.from_json(bundle.calibration[str(k)]["q4c"])
    loaded = si.Bundle.load(bundle.save(tmp_path / "b"))
    assert loaded.fidelity == bundle.fidelity
    assert loaded.calibration == bundle.calibration
    assert loaded.codecs == bundle.codecs
    assert loaded.codec_for(_measured(bundle)[1], "q4c+zstd1").clip is not None


def test_inspect_shows_the_smallest_codec_within_budget(tmp_path, calibrated):
    _, bundle, _ = calibrated
    path = bundle.save(tmp_path / "b")
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", "inspect", str(path), "--budget", "0.9"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "smallest within fidelity >= 0.9 (0.95)" in out
    assert "top1 agreement with the uncompressed model on 6 input(s) held out of the calibration" in out
    assert re.search(r"\(\d\.\d{3} \[\d\.\d\d-\d\.\d\d\] n=6\)", out)  # fidelity [bounds] n


def test_held_out_inputs_measure_the_table_with_intervals(tmp_path):
    model, inputs = ZOO["mobilenet"]()
    calibration = [batched(inputs, 1, seed=i) for i in range(6)]
    evaluation = [batched(inputs, 1, seed=100 + i) for i in range(10)]
    bundle = si.compile(
        model,
        inputs,
        name="mnet",
        calibration=calibration,
        evaluation=evaluation,
        codecs=["f32", "q2c", "q4c+ans"],
        fidelity_all_cuts=False,
        calibration_method="minmax",
        fidelity_metric="top1",
    )
    fidelity = bundle.fidelity
    assert (fidelity["samples"], fidelity["calibration_samples"], fidelity["held_out"]) == (10, 6, True)
    table = _table(bundle)
    k = _measured(bundle)[1]
    # agreement on the evaluation inputs, with ranges from the calibration inputs
    x = torch.cat([e[0] for e in evaluation])
    codec = bundle.codec_for(k, "q2c")
    out = bundle.tail(k, codec.decode(codec.encode(list(bundle.head(k, x)))))
    with torch.no_grad():
        want = model(x)
    hits = int((out.argmax(1) == want.argmax(1)).sum())
    row = table[(k, "q2c")]
    assert row["fidelity"] == pytest.approx(hits / 10, abs=1e-6)
    low, high = row["interval"]
    assert low <= hits / 10 <= high and high - low > 0.2  # ten inputs say little
    wilson_all = (0.787, 1.0)  # 10/10: the Wilson bounds (one-sided 0.95) are [0.79, 1], not [1, 1]
    if hits == 10:
        assert (low, high) == pytest.approx(wilson_all, abs=1e-3)
    assert table[(k, "f32")]["interval"] == [1.0, 1.0]
    assert 0 < table[(k, "q4c+ans")]["bytes"] < table[(k, "f32")]["bytes"] / 6
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", "inspect", str(bundle.save(tmp_path / "b")), "--budget", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "on 10 held-out input(s) (ranges calibrated on 6 others)" in out


def test_intervals_of_agreement():
    from splitinfer.partitioner._fidelity import interval

    assert interval("top1", torch.ones(100, dtype=torch.float64)) == pytest.approx((0.963, 1.0), abs=1e-3)
    low, high = interval("top1", torch.tensor([1.0] * 99 + [0.0], dtype=torch.float64))
    assert low == pytest.approx(0.9455, abs=1e-3) and high == pytest.approx(0.9982, abs=1e-3)
    low, high = interval("cosine", torch.tensor([0.9, 1.0] * 50, dtype=torch.float64))
    assert low < 0.95 < high and high - low == pytest.approx(2 * 1.96 * 0.05025 / 10, rel=0.01)


def test_non_classifier_outputs_use_cosine_similarity():
    model, inputs = ZOO["multi_io"]()
    calibration = [batched(inputs, 1, seed=i) for i in range(4)]
    bundle = si.compile(model, inputs, name="mio", calibration=calibration, codecs=["f32", "q8"])
    assert bundle.fidelity["metric"] == "cosine"
    assert all(r["fidelity"] > 0.99 for r in bundle.fidelity["table"] if r["codec"] == "q8")


def test_lossy_codecs_need_calibration():
    model, inputs = ZOO["mlp"]()
    with pytest.raises(ConfigError, match="need calibration inputs"):
        si.compile(model, inputs, name="m", codecs=["f32", "q8"])
    with pytest.raises(Exception, match="valid forms"):
        si.compile(model, inputs, name="m", calibration=[inputs], codecs=["q9"])


def test_without_calibration_only_lossless_codecs_are_offered():
    model, inputs = ZOO["mlp"]()
    bundle = si.compile(model, inputs, name="m")
    assert bundle.codecs == ["f32", "f32+zstd1"]
    assert all(r["fidelity"] == 1.0 for r in bundle.fidelity["table"])


class _ViewNet(torch.nn.Module):
    """x.view(n, -1) after a convolution: needs contiguous tensors, not channels-last ones."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x).relu()
        return self.fc(y.view(y.shape[0], -1))


def test_tails_that_need_contiguous_tensors_are_measured_too():
    torch.manual_seed(0)
    model, x = _ViewNet().eval(), torch.randn(1, 3, 8, 8)
    calibration = [torch.randn(1, 3, 8, 8) for _ in range(4)]
    bundle = si.compile(model, (x,), name="v", calibration=calibration, codecs=["f32", "f16"])
    assert all(
        r["fidelity"] == 1.0 for r in bundle.fidelity["table"] if r["codec"] == "f16" and r["cut"] == 0
    )


def test_pca_codecs_get_a_projection_per_cut_stored_hashed_and_bound(tmp_path):
    pytest.importorskip("constriction")
    import hashlib
    import json

    from splitinfer.errors import BundleError

    codecs = ["f32", "pca4q6+ans", "pca2q8"]
    model, inputs = ZOO["multi_io"]()  # every cut carries two tensors or more: no projection
    calibration = [batched(inputs, 2, seed=i) for i in range(4)]
    multi = si.compile(model, inputs, name="mio", calibration=calibration, codecs=codecs)
    assert multi.projections == {}
    last = multi.cuts[-1].index  # the output: nothing is sent, every codec has a row
    assert not any(r["codec"].startswith("pca") and r["cut"] != last for r in multi.fidelity["table"])
    model, inputs = ZOO["mobilenet"]()
    calibration = [batched(inputs, 2, seed=i) for i in range(4)]
    bundle = si.compile(model, inputs, name="mnet", calibration=calibration, codecs=codecs)
    table = _table(bundle)
    single = [
        c.index
        for c in bundle.cuts[:-1]
        if len(c.tensors) == 1 and len(c.tensors[0].shape) >= 2 and _enough_vectors(c, rows=8)
    ]
    assert single
    assert set(bundle.projections) == {str(k) for k in single}
    assert all((k, "pca4q6+ans") in table and (k, "pca2q8") in table for k in single)
    path = bundle.save(tmp_path / "b")
    doc = json.loads((path / "manifest.json").read_text())
    k = single[0]
    entry = doc["projections"][str(k)]
    data = (path / entry["file"]).read_bytes()
    assert doc["files"][entry["file"]] == hashlib.sha256(data).hexdigest()
    assert entry["id"] == bundle.projections[str(k)].id
    loaded = si.Bundle.load(path)
    frontier = list(loaded.head(k, *[t[:1] for t in calibration[0]]))
    blob = loaded.codec_for(k, "pca4q6+ans").encode(frontier)
    (got,) = loaded.decoder_for(k, "pca4q6+ans").decode(blob)
    assert got.shape == frontier[0].shape
    assert row_fidelity_ok(table[(k, "pca4q6+ans")])
    (path / entry["file"]).write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="sha256"):
        si.Bundle.load(path)


def _enough_vectors(cut, rows):
    from splitinfer.partitioner._fidelity import VECTORS_PER_CHANNEL

    shape = cut.tensors[0].shape
    return rows * math.prod(shape[2:]) >= VECTORS_PER_CHANNEL * shape[1]


class _PooledNet(torch.nn.Module):
    """A convolution, then pooled features of 8 channels (a 2-D ``N x 8`` frontier), then a head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


def test_pca_is_left_out_where_the_calibration_cannot_fit_a_projection(caplog):
    """Pooled features give one channel vector an input: a few dozen calibration inputs cannot
    estimate a C x C covariance, and a table measured on those inputs would flatter it."""
    pytest.importorskip("constriction")
    torch.manual_seed(0)
    model, x = _PooledNet().eval(), torch.randn(1, 3, 8, 8)
    codecs = ["f32", "q8", "pca8q6+ans"]
    few = [torch.randn(1, 3, 8, 8) for _ in range(6)]  # 6 vectors of 8 channels at the pooled cut
    evaluation = [torch.randn(1, 3, 8, 8) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="splitinfer.partitioner"):
        bundle = si.compile(model, (x,), name="pooled", calibration=few, evaluation=evaluation, codecs=codecs)
    pooled = [c.index for c in bundle.cuts[:-1] if len(c.tensors[0].shape) == 2]
    assert pooled
    rows = _table(bundle)
    assert all((k, "pca8q6+ans") not in rows and (k, "q8") in rows for k in pooled)
    assert all(str(k) not in bundle.projections for k in pooled)
    assert any(str(c.index) in bundle.projections for c in bundle.cuts[:-1] if c.index not in pooled)
    warned = [r.getMessage() for r in caplog.records if "pca codecs left out" in r.getMessage()]
    assert len(warned) == 1 and "8 channels but 6 vectors" in warned[0] and "at least 32" in warned[0]
    enough = [torch.randn(1, 3, 8, 8) for _ in range(32)]
    bundle = si.compile(model, (x,), name="pooled", calibration=enough, evaluation=evaluation, codecs=codecs)
    assert all((k, "pca8q6+ans") in _table(bundle) for k in pooled)


def row_fidelity_ok(row):
    return 0.0 <= row["fidelity"] <= 1.0 and row["bytes"] > 0
