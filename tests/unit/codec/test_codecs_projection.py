"""The calibrated channel projection codecs (``pca<r>q<bits>``, compression/_projection.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splitinfer.compression import get_codec
from splitinfer.compression._projection import ChannelProjection, fit
from splitinfer.errors import CodecError

ans = pytest.importorskip("constriction")


def _correlated(n: int, channels: int = 16, rank: int = 4, seed: int = 0, hw: int = 6) -> np.ndarray:
    """``n x channels x hw x hw`` float32 whose channel vectors lie near a ``rank``-dim subspace."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((channels, rank))
    latent = rng.standard_normal((n, rank, hw, hw)) * np.array([4.0, 2.0, 1.0, 0.5][:rank]).reshape(
        1, -1, 1, 1
    )
    x = np.einsum("cr,nrhw->nchw", basis, latent) + 0.01 * rng.standard_normal((n, channels, hw, hw))
    return (x + np.arange(channels).reshape(1, -1, 1, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def projection() -> ChannelProjection:
    return fit([_correlated(32)])


def test_fit_finds_the_subspace_and_its_energy(projection):
    assert projection.channels == 16 and projection.count == 16
    assert projection.energy(4) > 0.999 > projection.energy(3)
    w = projection.components.astype(np.float64)
    assert np.allclose(w @ w.T, np.eye(16), atol=1e-4)
    assert (np.diff(projection.variance) <= 1e-6).all()  # decreasing


@pytest.mark.parametrize("spec", ["pca4q8", "pca4q6+ans", "pca16q8+zstd1", "pca4q5+ans"])
def test_round_trip_within_the_step_of_the_kept_components(projection, spec):
    codec = get_codec(spec, projection=projection)
    x = _correlated(1, seed=5)
    (y,) = codec.decode_numpy(codec.encode([x]))
    assert y.shape == x.shape and y.dtype == np.float32
    r, bits = int(spec[3:].split("q")[0]), int(spec.split("q")[1][0])
    _, delta = projection.grid(r, 1 << bits)
    noise = 0.01 * math.sqrt(16) * 4  # what the first 4 components leave out, generously
    assert np.abs(y - x).max() <= 0.5 * float(delta) * math.sqrt(r) + noise


def test_more_components_and_more_bits_get_closer(projection):
    x = _correlated(2, seed=7)

    def error(spec: str) -> float:
        codec = get_codec(spec, projection=projection)
        return float(np.abs(codec.decode_numpy(codec.encode([x]))[0] - x).mean())

    assert error("pca2q8") > error("pca4q8") and error("pca4q4") > error("pca4q8")


def test_ans_codes_low_variance_components_in_almost_nothing(projection):
    x = _correlated(1, seed=3)
    packed = len(get_codec("pca16q6", projection=projection).encode([x]))
    coded = len(get_codec("pca16q6+ans", projection=projection).encode([x]))
    assert coded < 0.6 * packed  # 12 of the 16 components carry only noise: one code or two


def test_numpy_and_torch_give_the_same_blob_and_values(projection):
    x = _correlated(2, seed=4)
    codec = get_codec("pca8q6+ans", projection=projection)
    blob = codec.encode([x])
    assert codec.encode([torch.from_numpy(x)]) == blob
    (t,) = codec.decode(blob)
    (a,) = codec.decode_numpy(blob)
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)
    half = torch.from_numpy(x).half()
    (h,) = codec.decode(codec.encode([half]))
    assert h.dtype == torch.float16


def test_nan_and_inf_come_back_exactly_and_spoil_nothing_else(projection):
    x = _correlated(1, seed=8)
    codec = get_codec("pca8q8+ans", projection=projection)
    (clean,) = codec.decode_numpy(codec.encode([x]))
    bad = x.copy()
    bad[0, 3, 1, 1], bad[0, 5, 2, 2], bad[0, 0, 0, 0] = np.nan, np.inf, -np.inf
    (y,) = codec.decode_numpy(codec.encode([bad]))
    assert np.isnan(y[0, 3, 1, 1]) and y[0, 5, 2, 2] == np.inf and y[0, 0, 0, 0] == -np.inf
    finite = np.isfinite(bad)
    assert np.isfinite(y[finite]).all()
    assert np.abs(y - clean)[finite].max() < 0.5 * np.abs(x).max()  # a replaced position, no worse
    far = x.copy()
    far[0, 0, 0, 0] = 3e38  # finite but huge: clips, never overflows
    (z,) = codec.decode_numpy(codec.encode([far]))
    assert np.isfinite(z).all()


def test_empty_batches_and_2d_frontiers():
    codec = get_codec("pca3q6+ans", projection=fit([_correlated(4)]))
    (y,) = codec.decode_numpy(codec.encode([np.zeros((0, 16, 6, 6), np.float32)]))
    assert y.shape == (0, 16, 6, 6)
    rows = np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
    p2 = fit([rows])  # 40 vectors of 12 channels
    assert p2.count == 12
    (z,) = get_codec("pca12q8", projection=p2).decode_numpy(
        get_codec("pca12q8", projection=p2).encode([rows[:1]])
    )
    assert np.abs(z - rows[:1]).max() < 0.1
    few = fit([rows[:5]])  # 5 vectors span at most 4 centred directions
    assert few.count == 4


def test_unbound_mismatched_and_unfit_frontiers_are_refused(projection):
    x = _correlated(1)
    with pytest.raises(CodecError, match="needs the channel projection"):
        get_codec("pca4q6+ans").encode([x])
    blob = get_codec("pca4q6+ans", projection=projection).encode([x])
    with pytest.raises(CodecError, match="needs the channel projection"):
        get_codec("pca4q6+ans").decode(blob)
    other = fit([_correlated(8, seed=1)])
    with pytest.raises(CodecError, match=f"projection '{projection.id}'.*this decoder has {other.id}"):
        get_codec("pca4q6+ans", projection=other).decode(blob)
    codec = get_codec("pca4q6", projection=projection)
    with pytest.raises(CodecError, match="one floating tensor"):
        codec.encode([x, x])
    with pytest.raises(CodecError, match="one floating tensor"):
        codec.encode([np.arange(16).reshape(1, 16)])
    with pytest.raises(CodecError, match="one floating tensor"):
        codec.encode([np.ones(16, np.float32)])
    with pytest.raises(CodecError, match="16 channels"):
        codec.encode([np.ones((1, 8, 2, 2), np.float32)])
    with pytest.raises(CodecError, match="no clip ranges"):
        get_codec("pca4q6", clip=object())  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="only pca"):
        get_codec("q4c", projection=projection)


@pytest.mark.parametrize("spec", ["pca0q4", "pca4097q4", "pca4q1", "pca4q9", "pca04q4", "pca4", "pca4q4c"])
def test_bad_pca_specs_list_the_valid_forms(spec):
    with pytest.raises(CodecError, match="valid forms"):
        get_codec(spec)


def test_projection_files_round_trip_and_hostile_ones_are_refused(projection):
    data = projection.data
    back = ChannelProjection.from_bytes(data)
    assert back.id == projection.id and back.data == data
    for cut in (0, 8, 16, len(data) - 1):
        with pytest.raises(CodecError):
            ChannelProjection.from_bytes(data[:cut])
    with pytest.raises(CodecError, match="not a splitinfer"):
        ChannelProjection.from_bytes(b"X" + data[1:])
    huge = bytearray(data)
    huge[8:16] = np.array([1 << 20, 1 << 20], "<u4").tobytes()  # claims a 4 TiB matrix
    with pytest.raises(CodecError, match="sizes"):
        ChannelProjection.from_bytes(bytes(huge))
    nan = bytearray(data)
    nan[16:20] = np.float32(np.nan).tobytes()
    with pytest.raises(CodecError, match="finite"):
        ChannelProjection.from_bytes(bytes(nan))
    scaled = bytearray(data)
    offset = len(data) - 4 * 16 * 16
    scaled[offset : offset + 4] = np.float32(7.0).tobytes()  # a component that is not a unit vector
    with pytest.raises(CodecError, match="unit"):
        ChannelProjection.from_bytes(bytes(scaled))


def test_hostile_blobs_are_refused_before_allocating(projection):
    import msgpack

    codec = get_codec("pca4q6+ans", projection=projection)
    blob = codec.encode([_correlated(1)])
    for cut in range(0, len(blob), max(1, len(blob) // 200)):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])
    start = np.zeros(4, "<f4").tobytes()
    delta = np.float32(0.1).tobytes()
    huge = msgpack.packb([1, "pca4q6", [["float32", [1 << 12, 16, 64, 64], projection.id, start, delta]], 0])
    with pytest.raises(CodecError, match=r"header says 0 bytes|above the limit"):
        get_codec("pca4q6", projection=projection).decode(huge, max_nbytes=1 << 20)
    overflow = msgpack.packb(
        [1, "pca4q6", [["float32", [1, 16, 1, 1], projection.id, start, np.float32(1e37).tobytes()]], 3]
    )
    with pytest.raises(CodecError, match="finite float32"):
        get_codec("pca4q6", projection=projection).decode(overflow + b"\0" * 3)


def test_a_blob_decodes_within_the_limit_of_its_frontiers_bytes(projection):
    x = _correlated(2)  # what a server allows a request: its frontier's float32 bytes
    codec = get_codec("pca4q6", projection=projection)
    assert codec.decode_numpy(codec.encode([x]), max_nbytes=x.nbytes)[0].shape == x.shape
