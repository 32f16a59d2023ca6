"""Capture: every offered cut of every architecture in the zoo is exact, at batch 1 and 8."""

from __future__ import annotations

import io

import pytest
import torch

import splitinfer as si
from splitinfer.errors import CaptureError, ConfigError
from tests.conftest import TORCH_ONLY
from tests.support.zoo import ZOO, assert_same_outputs, batched


@pytest.fixture(scope="module", params=sorted(ZOO))
def compiled(request):
    model, inputs = ZOO[request.param]()
    return request.param, model, si.compile(model, inputs, name=request.param, runtimes=TORCH_ONLY), inputs


@pytest.mark.parametrize("batch", [1, 8])
def test_every_cut_is_exact(compiled, batch):
    name, model, bundle, inputs = compiled
    x = batched(inputs, batch)
    with torch.no_grad():
        want = model(*x)
    assert len(bundle.cuts) >= 3, f"{name} offers only {len(bundle.cuts)} cuts"
    for cut in bundle.cuts:
        frontier = bundle.head(cut.index, *x)
        assert len(frontier) == len(cut.tensors)
        for t, spec in zip(frontier, cut.tensors):
            assert spec.matches(si.TensorSpec.of(t)), (cut.name, spec)
            assert t.shape[0] == batch
        assert_same_outputs(bundle.tail(cut.index, frontier), want)


def test_cut_table_is_consistent(compiled):
    _, _, bundle, inputs = compiled
    cuts = bundle.cuts
    assert [c.index for c in cuts] == list(range(len(cuts)))
    assert cuts[0].name == "input" and cuts[-1].name == "output"
    assert len(cuts[0].tensors) == len(inputs)
    for c in cuts:
        assert c.nbytes == sum(4 * torch.Size([1, *t.shape[1:]]).numel() for t in c.tensors)


def test_multi_tensor_frontiers_inside_blocks():
    model, inputs = ZOO["resnet"]()
    bundle = si.compile(model, inputs, name="resnet", runtimes=TORCH_ONLY)
    inside = [c for c in bundle.cuts if len(c.tensors) > 1]
    assert inside, "a residual net must offer cuts inside its blocks (skip tensor + branch)"
    assert any(c.name.startswith("in layer") for c in inside)


def test_transformer_takes_a_mask_and_offers_cuts_in_the_residual_stream():
    model, inputs = ZOO["transformer"]()
    bundle = si.compile(model, inputs, name="tx", runtimes=TORCH_ONLY)
    assert [t.dtype for t in bundle.cuts[0].tensors] == ["int64", "bool"]
    assert any("layers.1" in c.name for c in bundle.cuts)


def test_batch_sizes_one_to_sixty_four():
    model, inputs = ZOO["mobilenet"]()
    bundle = si.compile(model, inputs, name="m", runtimes=TORCH_ONLY)
    mid = len(bundle.cuts) // 2
    for batch in (1, 2, 3, 17, 64):
        x = batched(inputs, batch)
        with torch.no_grad():
            assert_same_outputs(bundle.tail(mid, bundle.head(mid, *x)), model(*x))


def test_weights_are_stored_once(tmp_path):
    model, inputs = ZOO["resnet"]()
    bundle = si.compile(model, inputs, name="resnet")
    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    path = bundle.save(tmp_path / "b")
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    # Per runtime, weights appear once: the torch segments together (a few KiB of graph each),
    # and the ONNX graph file (docs/runtimes.md) holds its own single copy.
    torch_files = sum(f.stat().st_size for f in path.glob("segment_*.pt2"))
    assert torch_files < weights + 12_000 * bundle.n_segments
    for other in [f for f in path.iterdir() if f.name.startswith("graph.onnx")]:
        assert other.stat().st_size < 1.5 * weights + 12_000 * bundle.n_segments
    assert len(bundle.cuts) > 20


def test_max_frontier_bytes_prunes_large_cuts():
    model, inputs = ZOO["vgg"]()
    full = si.compile(model, inputs, name="vgg", runtimes=TORCH_ONLY)
    small = si.compile(model, inputs, name="vgg", max_frontier_bytes=8 * 1024, runtimes=TORCH_ONLY)
    assert len(small.cuts) < len(full.cuts)
    assert all(c.nbytes <= 8 * 1024 for c in small.cuts[1:-1])


def test_uncapturable_model_names_the_construct_and_a_fix():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor's value
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        si.compile(DataDependent(), (torch.randn(1, 4),), name="dd", runtimes=TORCH_ONLY)
    message = str(info.value)
    assert "torch.export cannot capture model DataDependent" in message
    assert "torch.cond" in message


def test_batch_specialised_model_is_refused():
    class NeedsBatchTwo(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)

    with pytest.raises(CaptureError):
        si.compile(NeedsBatchTwo(), (torch.randn(1, 4),), name="b2", runtimes=TORCH_ONLY)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [((), "non-empty"), ((3,), "every input must be a tensor"), ((torch.tensor(1.0),), "batch")],
)
def test_bad_example_inputs(inputs, match):
    with pytest.raises(ConfigError, match=match):
        si.compile(torch.nn.Linear(2, 2), inputs, name="x", runtimes=TORCH_ONLY)


# The one user of the shared EfficientNet-Lite0 fixture here: run alone, it builds it (with its
# ONNX export: minutes on a busy 2-core machine), so it gets the fixture users' timeout.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_efficientnet_lite0_sparse_head_cut_is_ten_times_smaller_on_real_photos(efficientnet):
    """The head conv's ReLU6 output is mostly zeros: q8+zstd1 sends it >= 10x smaller than f32
    and the tail still gives the model's top-1 class (benchmarks/results/codecs.md measures it
    on 512 crops)."""
    from splitinfer.compression import get_codec
    from splitinfer.lab._images import photo_batch

    model, bundle = efficientnet
    cut = next(c for c in bundle.cuts if c.name == "after _swish (call 2)")
    photos = photo_batch(8, seed=3)
    with torch.no_grad():
        want = model(photos).argmax(1)
    for i in range(len(photos)):
        frontier = list(bundle.head(cut.index, photos[i : i + 1]))
        assert (frontier[0] == 0).float().mean() > 0.5  # post-ReLU: sparse
        f32, q8 = get_codec("f32").encode(frontier), get_codec("q8+zstd1").encode(frontier)
        assert len(f32) >= 10 * len(q8)
        decoded = get_codec("q8+zstd1").decode(q8)
        assert int(bundle.tail(cut.index, decoded).argmax(1)) == int(want[i])
