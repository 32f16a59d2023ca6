"""The trained bottleneck (issue 32, item 3): a few-channel low-bit latent at a cut, trained with
the model frozen, smaller than the float frontier; the ``bn<latent>q<bits>`` codec compile
trains at ``bottleneck_cuts``, stores in the bundle, measures in the fidelity table and profiles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import splitinfer as si
from splitinfer.compression import TrainedBottleneck, get_codec
from splitinfer.errors import BundleError, CodecError, ConfigError
from splitinfer.partitioner._bottleneck import (
    Bottleneck,
    _frozen_tail,
    latent_bytes,
    soft_entropy,
    train_bottleneck,
)
from splitinfer.partitioner._learn import Training
from tests.support.zoo import TinyClassifier
from tests.support.zoo import seeded_rows as _rows


def test_a_bottleneck_trains_with_the_model_frozen_and_sends_few_bytes():
    model = TinyClassifier().eval()
    bundle = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = next(c.index for c in bundle.cuts if len(c.tensors) == 1 and c.tensors[0].shape[1] == 16)
    x = torch.cat([r[0] for r in _rows(8, 5)])
    before = bundle.run_segments(0, bundle.n_segments, (x,))[0]
    module, record = train_bottleneck(
        bundle, k, _rows(48, 1), Training(steps=40, views=2), latent=2, bits=2, start="random"
    )
    after = bundle.run_segments(0, bundle.n_segments, (x,))[0]
    assert torch.equal(before, after)  # the model is frozen
    assert record["loss"][-1][1] < record["loss"][0][1]
    module.eval()
    with torch.no_grad():
        frontier = bundle.head(k, x)[0]
        codes = module.encode(frontier)
        out = bundle.tail(k, [module.decode(codes)])
    assert codes.min() >= 0 and codes.max() <= 3 and torch.equal(codes, codes.round())
    assert out.shape == before.shape
    sizes = latent_bytes(codes)
    assert len(sizes) == 8 and max(sizes) < bundle.cut(k).nbytes / 4
    with pytest.raises(ConfigError, match="bits"):
        Bottleneck(16, 2, 9)


# ---------------------------------------------------------------- the bn codec in a bundle

CODECS = ["f32", "q4c+zstd1", "bn4q2", "bn4q2+zstd3", "bn2q1+zstd1"]


def _cut16(bundle) -> int:
    """The first cut whose frontier is N x 16 x 4 x 4 (TinyClassifier's second conv)."""
    return next(c.index for c in bundle.cuts if len(c.tensors) == 1 and c.tensors[0].shape[1:] == (16, 4, 4))


@pytest.fixture(scope="module")
def compiled():
    model = TinyClassifier().eval()
    probe = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = _cut16(probe)
    bundle = si.compile(
        model,
        (torch.randn(1, 3, 8, 8),),
        name="tiny",
        training=_rows(48, 1),
        bottleneck_cuts=[k],
        exits=[],
        calibration=_rows(16, 2),
        evaluation=_rows(24, 3),
        labels=[i % 6 for i in range(24)],
        codecs=CODECS,
        train_steps=30,
    )
    return bundle, k, probe


def test_compile_trains_a_bottleneck_per_codec_base_and_leaves_the_model_alone(compiled):
    bundle, k, probe = compiled
    assert bundle.graph_hash == probe.graph_hash and not bundle.exits  # exits=[] trains none
    entries = bundle.bottlenecks[str(k)]
    assert sorted(entries) == ["bn2q1", "bn4q2"]
    e = entries["bn4q2"]
    assert (e["latent"], e["bits"], e["frontier"], e["code"]) == (4, 2, [16, 4, 4], [4, 4, 4])
    assert e["encoder"] == f"bn_{k:03d}_bn4q2_encoder.pt2" and e["training"]["steps"] == 30
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(
        bundle.run_segments(0, bundle.n_segments, (x,))[0], probe.run_segments(0, probe.n_segments, (x,))[0]
    )


def test_the_fidelity_table_has_bottleneck_rows_at_its_cut_only(compiled):
    bundle, k, _ = compiled
    rows = {(r["cut"], r["codec"]): r for r in bundle.fidelity["table"]}
    for spec in ("bn4q2", "bn4q2+zstd3", "bn2q1+zstd1"):
        row = rows[(k, spec)]
        assert row["n"] == 24 and row["interval"][0] <= row["fidelity"] <= row["interval"][1]
        assert "accuracy" in row and "drop_interval" in row
        assert 0 < row["bytes"] < bundle.cut(k).nbytes / 8  # 64 codes of 2 bits against 256 floats
        assert [c for c, s in rows if s == spec] == [k, bundle.last_cut]
    assert (
        rows[(k, "bn4q2")]["fidelity"] == rows[(k, "bn4q2+zstd3")]["fidelity"]
    )  # one bottleneck, two stages


def test_edge_encodes_and_cloud_decodes_from_the_saved_bundle(compiled, tmp_path):
    bundle, k, _ = compiled
    bundle.save(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "manifest.json").read_text())
    entry = doc["bottlenecks"][str(k)]["bn4q2"]
    for part in ("encoder", "decoder"):
        assert entry[part] in doc["files"]
    edge = si.Bundle.load(tmp_path / "b", upto_cut=k)
    cloud = si.Bundle.load(tmp_path / "b", from_cut=k)
    x = torch.randn(2, 3, 8, 8)
    frontier = edge.head(k, x)
    blob = edge.codec_for(k, "bn4q2+zstd3").encode(list(frontier))
    got = cloud.tail(k, cloud.decoder_for(k, "bn4q2+zstd3").decode(blob))
    codec = bundle.codec_for(k, "bn4q2+zstd3")  # the compiled bundle's own networks: the same answer
    assert torch.allclose(got, bundle.tail(k, codec.decode(codec.encode(list(frontier)))), atol=1e-5)
    with pytest.raises(CodecError, match="no encoder"):
        cloud.codec_for(k, "bn4q2").encode(list(frontier))
    with pytest.raises(CodecError, match="no decoder"):
        edge.decoder_for(k, "bn4q2").decode(blob)
    with pytest.raises(CodecError, match="blob was encoded with codec 'bn4q2\\+zstd3'"):
        cloud.decoder_for(k, "bn2q1+zstd1").decode(blob)
    mine = edge.bottleneck_at(k, "bn2q1")
    assert mine is not None and mine.decoder is None
    other = TrainedBottleneck(
        "ffffffff", mine.frontier, mine.code, mine.bits, mine.encoder
    )  # another compile's
    hostile = get_codec("bn2q1+zstd1", bottleneck=other)
    with pytest.raises(CodecError, match="bottleneck 'ffffffff'"):
        cloud.decoder_for(k, "bn2q1+zstd1").decode(hostile.encode(list(frontier)))


def test_a_torch_free_edge_encodes_on_onnx_runtime(compiled, tmp_path):
    pytest.importorskip("onnxruntime")
    bundle, k, _ = compiled
    if not bundle.onnx.get("file"):  # onnx/onnxscript missing: CI installs them, so it fails there
        message = "this install exports no ONNX (pip install 'splitinfer[onnx]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    bundle.save(tmp_path / "b")
    edge = si.Bundle.load(tmp_path / "b", upto_cut=k, runtime="onnxruntime")
    cloud = si.Bundle.load(tmp_path / "b", from_cut=k)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    frontier = edge.head(k, x)
    blob = edge.codec_for(k, "bn4q2").encode(list(frontier))
    torch_blob = (
        cloud.__class__.load(tmp_path / "b").codec_for(k, "bn4q2").encode([torch.from_numpy(frontier[0])])
    )
    assert blob == torch_blob  # the same codes from either runtime's encoder
    assert cloud.tail(k, cloud.decoder_for(k, "bn4q2").decode(blob)).shape == (2, 6)


def test_the_profile_times_its_encode_and_decode(compiled):
    from splitinfer.partitioner import profile_bundle

    bundle, k, _ = compiled
    rows = {
        (r["cut"], r["codec"]): r
        for r in profile_bundle(bundle, batch_sizes=(1,), repeats=2, warmup=0, progress=False)["codecs"]
    }
    assert (k, "bn4q2") in rows and (k - 1, "bn4q2") not in rows
    assert rows[(k, "bn4q2")]["encode_s"] > 0 and rows[(k, "bn4q2")]["decode_s"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codecs": ["f32", "bn4q2"]}, "trained bottlenecks: pass training inputs"),
        (
            {"codecs": ["f32", "bn4q2"], "training": True},
            "name the cuts to train them at with bottleneck_cuts",
        ),
        ({"codecs": ["f32", "q8"], "training": True, "bottleneck_cuts": [3]}, "name one, such as 'bn8q2"),
        ({"codecs": ["f32", "bn4q2"], "training": True, "bottleneck_cuts": [0]}, "cuts 1..8"),
        (
            {"codecs": ["f32", "bn4q2"], "training": True, "bottleneck_cuts": [7]},
            "one N x C x H x W frontier",
        ),
    ],
)
def test_a_bottleneck_without_what_it_needs_is_a_config_error_saying_what_to_pass(kwargs, message):
    if kwargs.pop("training", None):
        kwargs["training"] = _rows(8, 1)
    with pytest.raises(ConfigError, match=message):
        si.compile(
            TinyClassifier().eval(),
            (torch.randn(1, 3, 8, 8),),
            name="tiny",
            runtimes=("torch",),
            calibration=_rows(8, 2),
            exits=[] if "training" in kwargs else None,
            train_steps=2,
            **kwargs,
        )


def test_the_principal_start_is_a_pca_codec_that_training_refines():
    model = TinyClassifier().eval()
    bundle = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = _cut16(bundle)
    frontier = bundle.head(k, torch.cat([r[0] for r in _rows(32, 5)]))[0]

    def error(start: str, steps: int) -> tuple[float, list]:
        module, record = train_bottleneck(
            bundle, k, _rows(48, 1), Training(steps=steps, views=2), latent=4, bits=3, start=start
        )
        with torch.no_grad():
            return float(((module(frontier) - frontier) ** 2).mean() / frontier.var()), record["loss"]

    principal, losses = error("principal", 20)
    assert error("principal", 1)[0] < 0.8 * error("random", 1)[0]  # the start itself is the gain
    random, random_losses = error("random", 20)
    assert principal < 0.8 * random  # 4 of 16 components, 8 levels: far nearer than random weights
    assert losses[0][1] < 0.6 * random_losses[0][1]  # from the first step on
    with pytest.raises(ConfigError, match="'principal' or 'random'"):
        train_bottleneck(bundle, k, _rows(8, 1), Training(steps=1), latent=4, bits=3, start="zeros")


def test_the_tail_teaches_through_its_gradients_and_a_rate_term_spends_fewer_bits():
    model = TinyClassifier().eval()
    bundle = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = _cut16(bundle)
    frontier = bundle.head(k, torch.cat([r[0] for r in _rows(32, 5)]))[0]

    def trained_codes(**kwargs) -> tuple[torch.Tensor, dict]:
        module, record = train_bottleneck(
            bundle, k, _rows(48, 1), Training(steps=30, views=2), latent=4, bits=3, **kwargs
        )
        with torch.no_grad():
            return module.encode(frontier), record

    plain, _ = trained_codes(start="random")
    priced, record = trained_codes(rate=0.5, start="random")
    assert record["rate"] == 0.5 and 0 < record["bits_per_code"] < 3
    assert soft_entropy(priced, 8) < 0.8 * soft_entropy(plain, 8)  # fewer levels in use per channel
    assert sum(latent_bytes(priced)) < sum(latent_bytes(plain))
    x = torch.randn(2, 16, 4, 4, requires_grad=True)  # the KL term reaches the decoder through the tail
    _frozen_tail(bundle, k)(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(ConfigError, match=">= 0"):
        train_bottleneck(bundle, k, _rows(8, 1), Training(steps=1), latent=4, bits=3, rate=-1.0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.update(id="not-hex"), "8 hex digits"),
        (lambda e: e.update(code=[5, 4, 4]), "not a bn<latent>q<bits> of its shapes"),
        (lambda e: e.update(encoder="../segment_000.pt2"), "invalid file"),
    ],
)
def test_a_tampered_bottleneck_entry_is_refused_when_the_bundle_loads(compiled, tmp_path, edit, message):
    bundle, k, _ = compiled
    bundle.save(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc["bottlenecks"][str(k)]["bn4q2"])
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=message):
        si.Bundle.load(tmp_path / "b")


def test_a_modified_bottleneck_file_is_refused_by_its_sha256(compiled, tmp_path):
    bundle, k, _ = compiled
    bundle.save(tmp_path / "b")
    (tmp_path / "b" / f"bn_{k:03d}_bn4q2_decoder.pt2").write_bytes(b"PK\0\0 not the trained decoder")
    si.Bundle.load(tmp_path / "b", upto_cut=k)  # an edge loads no decoder
    with pytest.raises(BundleError, match="sha256"):
        si.Bundle.load(tmp_path / "b", from_cut=k)
