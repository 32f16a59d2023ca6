"""compile's fidelity on the user's data (issue 28 items 1-3, issue 31 item 2): evaluation
inputs and labels, the held-out calibration, the degenerate reference, inputs checked first."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import splitinfer as si
from splitinfer.errors import ConfigError

CODECS = ["f32", "q8", "q2c"]


class Tiny(nn.Module):
    """A classifier of 10 classes over 3 x 4 x 4 inputs whose top-1 varies with the input."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)
        with torch.no_grad():
            self.fc.bias[2] += bias  # a large bias: class 2 whatever the input

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 4, 4, generator=g) for _ in range(n)]


def _rows(bundle):
    return {(r["cut"], r["codec"]): r for r in bundle.fidelity["table"]}


def test_labels_add_accuracy_and_its_drop_to_every_row():
    model, example = Tiny().eval(), (torch.randn(1, 3, 4, 4),)
    calibration, evaluation = _inputs(8, 1), _inputs(20, 2)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in evaluation]).argmax(1)
    labels = [int(c) if i % 3 else (int(c) + 1) % 10 for i, c in enumerate(reference)]  # 2/3 right
    bundle = si.compile(
        model,
        example,
        name="tiny",
        calibration=calibration,
        evaluation=evaluation,
        labels=labels,
        codecs=CODECS,
    )
    fidelity = bundle.fidelity
    assert fidelity["metric"] == "top1" and fidelity["samples"] == 20 and fidelity["labels"] == 20
    assert fidelity["float_accuracy"] == pytest.approx(13 / 20)
    assert fidelity["confidence"] == 0.9 and fidelity["interval_method"] == "wilson"
    rows = _rows(bundle)
    assert rows[(0, "f32")]["accuracy"] == pytest.approx(13 / 20) and rows[(0, "f32")]["accuracy_drop"] == 0
    row = rows[(0, "q2c")]
    x = torch.cat(evaluation)
    codec = bundle.codec_for(0, "q2c")
    with torch.no_grad():
        got = bundle.tail(0, codec.decode(codec.encode([x]))).argmax(1)
    target, ref = torch.tensor(labels), reference
    assert row["n"] == 20
    assert row["accuracy"] == pytest.approx(float((got == target).double().mean()))
    assert row["lost"] == int(((ref == target) & (got != target)).sum())
    assert row["gained"] == int(((ref != target) & (got == target)).sum())
    assert row["accuracy_drop"] == pytest.approx((row["lost"] - row["gained"]) / 20)
    assert row["drop_interval"][0] <= row["accuracy_drop"] <= row["drop_interval"][1]
    lo, hi = row["interval"]
    assert lo <= row["fidelity"] <= hi


def test_without_evaluation_every_second_calibration_input_is_held_out_and_said(caplog):
    model, example = Tiny().eval(), (torch.randn(1, 3, 4, 4),)
    calibration = _inputs(10, 3)
    with caplog.at_level(logging.WARNING, logger="splitinfer.partitioner"):
        bundle = si.compile(model, example, name="tiny", calibration=calibration, codecs=CODECS)
    assert (bundle.fidelity["samples"], bundle.fidelity["calibration_samples"]) == (5, 5)
    assert bundle.fidelity["held_out"] and bundle.fidelity["held_out_from"] == "calibration"
    (said,) = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert "no evaluation inputs" in said and "evaluation=[inputs, ...]" in said


def test_a_degenerate_reference_warns_once_and_measures_cosine(caplog):
    model, example = Tiny(bias=3.0).eval(), (torch.randn(1, 3, 4, 4),)
    with caplog.at_level(logging.WARNING, logger="splitinfer.partitioner"):
        bundle = si.compile(
            model,
            example,
            name="constant",
            calibration=_inputs(6, 4),
            evaluation=_inputs(8, 5),
            codecs=CODECS,
        )
    warned = [r.getMessage() for r in caplog.records if "predicts class" in r.getMessage()]
    assert len(warned) == 1
    assert "'constant'" in warned[0] and "class 2" in warned[0] and "cosine" in warned[0]
    fidelity = bundle.fidelity
    assert fidelity["metric"] == "cosine" and fidelity["degenerate"] == {
        "class": 2,
        "share": 1.0,
        "metric": "cosine",
    }
    q2c = _rows(bundle)[(0, "q2c")]
    assert q2c["cosine"] == q2c["fidelity"] and "sd" in q2c and q2c["n"] == 8
    # top-1 would have called q2c perfect: every output is class 2 whatever the codec
    assert q2c["fidelity"] < 1.0


def test_a_model_that_tells_inputs_apart_keeps_top1_without_a_warning(caplog):
    model, example = Tiny().eval(), (torch.randn(1, 3, 4, 4),)
    with caplog.at_level(logging.WARNING, logger="splitinfer.partitioner"):
        bundle = si.compile(
            model, example, name="tiny", calibration=_inputs(6, 6), evaluation=_inputs(10, 7), codecs=CODECS
        )
    assert bundle.fidelity["metric"] == "top1" and "degenerate" not in bundle.fidelity
    assert not [r for r in caplog.records if "predicts class" in r.getMessage()]


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("the model ran: inputs were not checked first")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"calibration": [torch.randn(3, 4, 4)]},
            r"calibration input 0 \(of 1\).*float32\[3x4x4\].*add a batch dim",
        ),
        (
            {"calibration": [torch.randn(1, 3, 4, 4)], "evaluation": [torch.randn(1, 3, 5, 5)]},
            r"evaluation input 0 \(of 1\): tensor 0 is float32\[1x3x5x5\], expected float32\[Bx3x4x4\]",
        ),
        ({"calibration": [torch.randn(1, 3, 4, 4).double()]}, r"float64.*x.to\(torch.float32\)"),
        (
            {"calibration": [(torch.randn(1, 3, 4, 4), torch.randn(1, 2))]},
            r"has 2 tensor\(s\); the model takes 1",
        ),
        ({"evaluation": [torch.randn(1, 3, 4, 4)]}, r"evaluation inputs need calibration inputs"),
        ({"calibration": [torch.randn(1, 3, 4, 4)], "labels": [1, 2]}, r"2 label\(s\) for 1 calibration"),
        ({"codecs": ["f32", "q8"]}, r"pass calibration=\[inputs, \.\.\.\]"),
    ],
)
def test_inputs_are_checked_before_the_model_runs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        si.compile(Exploding(), (torch.randn(1, 3, 4, 4),), name="x", **kwargs)


def test_early_stop_ends_a_row_once_its_interval_cannot_meet_the_budget():
    """A row that cannot meet the budget stops after a chunk or two; a row that may keeps every
    evaluation input and equals the row measured without early stop."""
    from splitinfer.partitioner._fidelity import STOP_CHUNK
    from splitinfer.partitioner._intervals import wilson

    model, example = Tiny().eval(), (torch.randn(1, 3, 4, 4),)
    calibration, evaluation = _inputs(8, 1), _inputs(4 * STOP_CHUNK, 2)
    kw = dict(name="tiny", calibration=calibration, evaluation=evaluation, codecs=CODECS)
    full = _rows(si.compile(model, example, **kw))
    stopped_bundle = si.compile(model, example, fidelity_budget=0.99, fidelity_early_stop=True, **kw)
    stopped = _rows(stopped_bundle)
    assert stopped_bundle.fidelity["stopped_below"] == 0.99
    n = 4 * STOP_CHUNK
    cut_rows = [key for key in full if key[0] < stopped_bundle.last_cut]
    shorter = [key for key in cut_rows if stopped[key]["n"] < n]
    assert shorter, "q2c on random inputs misses 0.99: it should stop early"
    for key in cut_rows:
        row, ref = stopped[key], full[key]
        assert ref["n"] == n
        if row["n"] < n:  # it could not be admitted at 0.99 even if every input left agreed
            hits = round(row["fidelity"] * row["n"])
            assert row["n"] % STOP_CHUNK == 0
            assert row["interval"][1] < 0.99 or wilson((hits + n - row["n"]) / n, n)[0] < 0.99
            assert key[1] != "f32"  # lossless rows are exact, never measured
        else:
            assert row == ref


def test_early_stop_measures_every_input_where_labels_make_the_budget_an_accuracy():
    model, example = Tiny().eval(), (torch.randn(1, 3, 4, 4),)
    calibration, evaluation = _inputs(8, 1), _inputs(64, 2)
    bundle = si.compile(
        model,
        example,
        name="tiny",
        calibration=calibration,
        evaluation=evaluation,
        labels=[0] * 64,
        codecs=CODECS,
        fidelity_early_stop=True,
    )
    assert "stopped_below" not in bundle.fidelity
    assert {r["n"] for r in bundle.fidelity["table"]} == {64}
