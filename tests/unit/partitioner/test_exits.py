"""Early exits (issue 32): trained at compile from unlabelled inputs, calibrated on held-out
ones, saved like segments, loaded and run; refused where they cannot answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import splitinfer as si
from splitinfer.errors import BundleError, ConfigError
from splitinfer.partitioner._exits import (
    ExitHead,
    calibrate_threshold,
    feature_cut,
    frontier_refusal,
    pick_exits,
)
from splitinfer.partitioner._intervals import wilson
from splitinfer.partitioner._learn import Training, augment_images
from tests.support.zoo import TinyClassifier, mlp, multi_io, resnet
from tests.support.zoo import seeded_rows as _rows

TORCH_ONLY = ("torch",)


@pytest.fixture(scope="module")
def with_exits():
    model, inputs = TinyClassifier().eval(), (torch.randn(1, 3, 8, 8),)
    bundle = si.compile(
        model,
        inputs,
        name="tiny",
        runtimes=TORCH_ONLY,
        training=_rows(96, 1),
        evaluation=None,
        calibration=_rows(64, 2),
        codecs=["f32", "q8+zstd1"],
        exits=None,  # picked by cost
        fidelity_budget=0.6,
        confidence=0.8,
        train_steps=150,
        seed=3,
    )
    return model, inputs, bundle


def test_without_training_the_manifest_is_unchanged(tmp_path):
    model, inputs = mlp()
    plain = si.compile(model, inputs, name="mlp", runtimes=TORCH_ONLY)
    again = si.compile(model, inputs, name="mlp", runtimes=TORCH_ONLY, training=None, exits=None, seed=5)
    assert "exits" not in plain.to_json()
    assert plain.to_json() == again.to_json()
    out = plain.save(tmp_path / "b")
    assert not list(out.glob("exit_*"))
    assert "exits" not in json.loads((out / "manifest.json").read_text())


def test_exits_are_trained_and_calibrated_on_held_out_inputs(with_exits):
    _, _, bundle = with_exits
    assert [e["cut"] for e in bundle.exits] == pick_exits(bundle) and len(bundle.exits) == 2
    for entry in bundle.exits:
        assert entry["held_out_from"] == "calibration" and entry["samples"] == 64
        assert entry["training"]["inputs"] == 96 and entry["training"]["augmented"]
        assert entry["training"]["views"] >= 1 and entry["training"]["steps"] == 150
        loss = entry["training"]["loss"]
        assert loss[-1][1] < loss[0][1]  # the heads learn the teacher's distribution
        if entry["threshold"] is not None:
            n, agreement = entry["n"], entry["agreement"]
            assert entry["exit_rate"] == pytest.approx(n / 64, abs=1e-6)
            assert wilson(agreement, n, 0.8)[0] >= 0.6  # the bound, not the estimate, meets the budget
    assert any(e["threshold"] is not None for e in bundle.exits)


def test_exits_save_load_and_answer_as_calibrated(with_exits, tmp_path):
    model, _, bundle = with_exits
    out = bundle.save(tmp_path / "b")
    doc = json.loads((out / "manifest.json").read_text())
    for entry in doc["exits"]:
        if entry["file"]:
            assert entry["file"] in doc["files"]
    loaded = si.Bundle.load(out)
    held = torch.cat([r[0] for r in _rows(64, 2)])
    k0 = bundle.exits[0]["cut"]
    with torch.no_grad():
        want = model(held).argmax(dim=1)
    for entry in bundle.exits:
        k = entry["cut"]
        if entry["threshold"] is None:
            assert loaded.exit_at(k) is None
            continue
        (logits,), confident = loaded.run_exit(k, loaded.head(k, held))
        assert logits.shape == (64, 6)
        mask = torch.tensor(confident)
        assert int(mask.sum()) == entry["n"]  # the calibration reproduces on the loaded head
        agreeing = int((logits.argmax(dim=1)[mask] == want[mask]).sum())
        assert agreeing == round(entry["agreement"] * entry["n"])
        (np_logits,), np_confident = loaded.run_exit(k, [loaded.head(k, held)[0].numpy()])
        assert np_confident == confident and np_logits.shape == (64, 6)
    # only the head's side loads exits: a cloud serving tails has none
    assert si.Bundle.load(out, from_cut=k0).exit_heads == {}


def test_a_tampered_exit_head_is_refused(with_exits, tmp_path):
    _, _, bundle = with_exits
    out = bundle.save(tmp_path / "b")
    files = sorted(out.glob("exit_*.pt2"))
    assert files
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        si.Bundle.load(out)


def _mlp_with_an_exit(runtimes):
    """The zoo's MLP with an exit at cut 2, trained (seeded) to a lenient budget."""
    model, inputs = mlp()
    return si.compile(
        model,
        inputs,
        name="mlp",
        runtimes=runtimes,
        training=_rows(64, 4, (20,)),
        exits=[2],
        fidelity_budget=0.5,
        confidence=0.75,
        train_steps=60,
    )


def test_an_exit_on_a_vector_frontier_at_a_named_cut():
    bundle = _mlp_with_an_exit(TORCH_ONLY)
    (entry,) = bundle.exits
    assert entry["cut"] == 2 and entry["held_out_from"] == "training" and entry["samples"] == 16
    assert not entry["training"]["augmented"] and entry["training"]["views"] == 1


def test_threshold_is_the_lowest_whose_lower_bound_meets_the_budget():
    conf = [0.99, 0.98, 0.97, 0.9, 0.8, 0.5]
    agree = [True, True, True, True, False, False]
    threshold, exited, agreeing = calibrate_threshold(conf, agree, 0.7, 0.8)
    assert (threshold, exited, agreeing) == (pytest.approx(0.85), 4, 4)  # midway to the next input
    assert calibrate_threshold(conf, agree, 0.999, 0.95) == (None, 0, 0)  # 6 inputs cannot show it
    many = [0.9] * 300
    assert calibrate_threshold(many, [True] * 300, 0.99, 0.95) == (pytest.approx(0.9, abs=1e-6), 300, 300)


def test_exits_are_refused_where_they_cannot_answer():
    model, inputs = multi_io()
    pairs = [(torch.randn(1, 3, 8, 8), torch.randn(1, 6)) for _ in range(8)]
    with pytest.raises(ConfigError, match="outputs; an exit answers for one"):
        si.compile(model, inputs, name="m", runtimes=TORCH_ONLY, training=pairs, exits=[1])
    model, inputs = mlp()
    with pytest.raises(ConfigError, match="exits need training inputs"):
        si.compile(model, inputs, name="mlp", runtimes=TORCH_ONLY, exits=[3])
    with pytest.raises(ConfigError, match=r"cuts 1\.\."):
        si.compile(model, inputs, name="mlp", runtimes=TORCH_ONLY, training=_rows(8, 1, (20,)), exits=[0])
    res, res_inputs = resnet()
    bundle = si.compile(res, res_inputs, name="r", runtimes=TORCH_ONLY)
    branchy = [c for c in bundle.cuts if len(c.tensors) > 1]
    assert branchy and "tensors" in (frontier_refusal(branchy[0]) or "")
    assert all(len(bundle.cut(k).tensors) == 1 for k in pick_exits(bundle))


def test_augmentation_is_seeded_and_keeps_the_shape():
    x = torch.randn(4, 3, 32, 32)
    a = augment_images(x, torch.Generator().manual_seed(1))
    b = augment_images(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ConfigError, match="train_steps"):
        Training(steps=0)


def test_exit_heads_are_exported_to_onnx_and_run_without_torch_modules(tmp_path):
    pytest.importorskip("onnxruntime")
    bundle = _mlp_with_an_exit(("torch", "onnxruntime"))
    (entry,) = bundle.exits
    # seeded: the head distils well enough that a threshold meets the lenient budget
    assert entry["threshold"] is not None, entry
    out = bundle.save(tmp_path / "b")
    assert (out / entry["onnx"]).is_file()
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(7))
    on_torch = si.Bundle.load(out)
    on_ort = si.Bundle.load(out, runtime="onnxruntime")
    frontier = on_torch.head(2, x)
    (want,), want_confident = on_torch.run_exit(2, [frontier[0].numpy()])
    (got,), confident = on_ort.run_exit(2, [frontier[0].numpy()])
    assert type(got).__module__ == "numpy" and got.shape == (5, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert confident == want_confident


def test_a_head_classifies_directly_where_no_feature_cut_follows(with_exits):
    _, _, bundle = with_exits
    last_vector = max(c.index for c in bundle.cuts[:-1] if len(c.tensors[0].shape) == 2)
    assert feature_cut(bundle, 1) == last_vector and feature_cut(bundle, last_vector) is None
    head = ExitHead(16, 6)
    assert head(torch.randn(3, 16, 4, 4)).shape == (3, 6) and not len(head.tail)


def test_matching_the_teachers_features_brings_the_heads_features_nearer(with_exits):
    from splitinfer.partitioner._exits import _pooled_runner, train_exits

    _, _, bundle = with_exits
    k = bundle.exits[0]["cut"]
    at = feature_cut(bundle, k)
    assert at is not None
    training, held = _rows(96, 1), _rows(32, 2)
    batch = torch.cat([r[0] for r in held])
    with torch.no_grad():
        pooled, teacher, _ = _pooled_runner(bundle, [k], at)((batch,))

    def error(weight: float) -> float:
        options = Training(steps=150, views=1, seed=3)
        _, heads = train_exits(
            bundle, training, held, "calibration", [k], options, 0.6, 0.8, feature_weight=weight
        )
        with torch.no_grad():
            got = heads[k].classifier(heads[k].norm(pooled))
        return float(((got - teacher) ** 2).mean())

    assert error(1.0) < error(0.0)
