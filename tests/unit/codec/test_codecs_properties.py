"""Properties of every codec, checked with hypothesis on generated frontiers and blobs.

Tensors are drawn as a shape (empty, 0-d, small, or one large enough to cross zstd's block
size), a layout (contiguous, transposed, strided) and a seed; their values come from numpy, so
large tensors stay cheap. The example budget is small: the whole file runs in a few seconds.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.compression import ClipRanges, get_codec
from splitinfer.compression._projection import fit
from splitinfer.errors import CodecError
from tests.unit.codec.test_codecs_bottleneck import linear_bottleneck

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LARGE = (2, 64, 48, 48)  # 295k values, 1.2 MB as float32

shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple),
    st.sampled_from([(0,), (3, 0, 2), (1, 1), (4, 7, 5, 3), (1, 33), LARGE]),
)


def _values(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    n = math.prod(shape)
    if kind == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)
    elif kind == "relu":
        v = np.maximum(rng.standard_normal(n), 0)
    elif kind == "wide":  # any finite float32, including subnormals and huge values
        v = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        v = np.where(np.isfinite(v), v, 1.0)
    else:  # "offset": a narrow range far from zero
        v = 1000.0 + rng.random(n) * 1e-2
    return v.astype(np.float32).reshape(shape)


@st.composite
def float_tensors(draw, kinds=("normal", "relu", "wide", "offset"), nonfinite=False):
    shape = draw(shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = _values(rng, shape, draw(st.sampled_from(kinds)))
    if nonfinite and values.size:
        special = rng.choice(np.array([np.nan, np.inf, -np.inf, -0.0], np.float32), size=values.size)
        values = np.where(rng.random(values.size).reshape(shape) < 0.1, special.reshape(shape), values)
    t = torch.from_numpy(np.ascontiguousarray(values))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1).contiguous().transpose(0, -1)  # same values, non-contiguous memory
    elif layout == "strided" and t.dim() >= 1:
        t = torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@SETTINGS
@given(t=float_tensors(nonfinite=True), spec=st.sampled_from(["f32", "f32+zstd1", "f32+zstd3"]))
def test_f32_round_trips_bit_exactly(t, spec):
    codec = get_codec(spec)
    (y,) = codec.decode(codec.encode([t]))
    assert y.shape == t.shape and y.dtype == t.dtype
    assert torch.equal(_bits(y), _bits(t))  # NaN payloads and the sign of zero included


@SETTINGS
@given(
    t=float_tensors(nonfinite=True), cast=st.sampled_from([torch.float16, torch.bfloat16]), zstd=st.booleans()
)
def test_half_precision_round_trips_its_own_dtype_exactly(t, cast, zstd):
    spec = ("f16" if cast == torch.float16 else "bf16") + ("+zstd1" if zstd else "")
    x = t.to(cast)
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    assert y.dtype == cast
    assert torch.equal(y.view(torch.int16), x.contiguous().view(torch.int16))


@SETTINGS
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]),
    spec=st.sampled_from(["f32", "f16+zstd1", "q8", "q2c+zstd1", "q5c"]),
)
def test_integer_and_bool_tensors_round_trip_exactly_in_every_codec(shape, seed, dtype, spec):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 2, math.prod(shape)).astype(np.int64).reshape(shape)).to(dtype)
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    assert y.dtype == dtype and torch.equal(y, x)


def _expected_range(x: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-element [lo, hi] of the encode-time ranges, as the codec documents them."""
    a = x.reshape(x.shape[0], x.shape[1], -1) if per_channel and x.ndim >= 3 else x.reshape(1, 1, -1)
    finite = np.isfinite(a)
    lo = np.where(finite, a, np.inf).min(axis=(0, 2), keepdims=True).astype(np.float64)
    hi = np.where(finite, a, -np.inf).max(axis=(0, 2), keepdims=True).astype(np.float64)
    empty = lo > hi
    lo, hi = np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    lo, hi = np.clip(lo, -1e38, 1e38), np.clip(hi, -1e38, 1e38)
    return np.broadcast_to(lo, a.shape).reshape(x.shape), np.broadcast_to(hi, a.shape).reshape(x.shape)


def _check_within_half_step(x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> None:
    """Finite values within half a step of the clipped input; NaN and ±inf exactly where they
    were (compression/_nonfinite.py)."""
    finite = np.isfinite(x)
    assert np.array_equal(np.isnan(y), np.isnan(x)) and np.array_equal(y[np.isinf(x)], x[np.isinf(x)])
    x, y, lo, hi = x[finite], y[finite], lo[finite], hi[finite]
    target = np.clip(x.astype(np.float64), lo, hi)
    step = (hi - lo) / ((1 << bits) - 1)
    tolerance = 0.5 * step * 1.001 + 2.0**-21 * (np.abs(lo) + np.abs(hi)) + 1e-35
    error = np.abs(y.astype(np.float64) - target)
    assert np.isfinite(y).all()
    assert (error <= tolerance).all(), float(np.max(error / np.maximum(step, 1e-300)))


@SETTINGS
@given(t=float_tensors(nonfinite=True), bits=st.integers(2, 8), per_channel=st.booleans(), zstd=st.booleans())
def test_quantized_values_stay_within_half_a_step_of_the_clipped_input(t, bits, per_channel, zstd):
    spec = f"q{bits}{'c' if per_channel else ''}{'+zstd1' if zstd else ''}"
    (y,) = get_codec(spec).decode(get_codec(spec).encode([t]))
    assert y.shape == t.shape and y.dtype == t.dtype
    if t.numel() == 0:
        return
    x = t.contiguous().numpy()
    lo, hi = _expected_range(x, per_channel)
    _check_within_half_step(x, y.numpy(), lo, hi, bits)


@SETTINGS
@given(
    t=float_tensors(kinds=("normal", "relu")),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**32 - 1),
    per_channel=st.booleans(),
)
def test_calibrated_ranges_clip_outside_and_keep_half_a_step_inside(t, bits, seed, per_channel):
    rng = np.random.default_rng(seed)
    channels = t.shape[1] if per_channel and t.dim() >= 3 else 1
    a = rng.standard_normal(channels)
    b = a + rng.random(channels) * rng.choice([0.0, 0.1, 1.0, 10.0])
    ranges = ClipRanges.from_arrays([(a, b)], per_channel=per_channel)
    spec = f"q{bits}{'c' if per_channel else ''}"
    (y,) = get_codec(spec, clip=ranges).decode(get_codec(spec, clip=ranges).encode([t]))
    assert y.shape == t.shape
    if t.numel() == 0:
        return
    x = t.contiguous().numpy()
    shape3 = (x.shape[0], channels, -1) if channels > 1 else (1, 1, -1)
    lo = np.broadcast_to(a.astype(np.float32).astype(np.float64).reshape(1, -1, 1), x.reshape(shape3).shape)
    hi = np.broadcast_to(b.reshape(1, -1, 1), x.reshape(shape3).shape)
    _check_within_half_step(x, y.numpy(), lo.reshape(x.shape), hi.reshape(x.shape), bits)


@SETTINGS
@given(
    tensors=st.lists(float_tensors(kinds=("normal", "relu")), max_size=3),
    spec=st.sampled_from(["q4c", "f16"]),
)
def test_frontiers_of_several_tensors_keep_order_shapes_and_dtypes(tensors, spec):
    out = get_codec(spec).decode(get_codec(spec).encode(tensors))
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in tensors]


PROJECTION = fit([torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(3))])


BOTTLENECK = linear_bottleneck()  # frontiers N x 5 x 6, codes N x 2 x 6 of 3 bits


def _codec(spec: str):
    if spec.startswith("bn"):
        return get_codec(spec, bottleneck=BOTTLENECK)
    return get_codec(spec, projection=PROJECTION) if spec.startswith("pca") else get_codec(spec)


def _some_blob(spec: str) -> bytes:
    g = torch.Generator().manual_seed(0)
    if spec.startswith(("pca", "bn")):
        return _codec(spec).encode([torch.randn(2, 5, 6, generator=g)])
    if spec.startswith("jpeg"):
        return get_codec(spec).encode([torch.rand(1, 3, 16, 16, generator=g)])
    return get_codec(spec).encode([torch.randn(2, 5, 6, generator=g), torch.arange(4), torch.tensor(1.0)])


FUZZ_SPECS = [
    "f32",
    "f16+zstd1",
    "q8",
    "q4c+zstd1",
    "q3+zstd3",
    "q7c",
    "jpeg80",
    "jpeg80+zstd1",
    "pca3q5",
    "bn2q3",
    "bn2q3+zstd1",
]
if importlib.util.find_spec("constriction") is not None:
    FUZZ_SPECS += ["pca4q6+ans", "q5c+ans", "bn2q3+ans"]
BLOBS = {spec: _some_blob(spec) for spec in FUZZ_SPECS}


@settings(max_examples=250, deadline=None)
@given(
    spec=st.sampled_from(FUZZ_SPECS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_or_truncated_blobs_raise_only_codec_errors(spec, edits, cut):
    blob = bytearray(BLOBS[spec])
    for pos, byte in edits:
        blob[pos % len(blob)] = byte
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    try:
        out = _codec(spec).decode(bytes(blob), max_nbytes=1 << 16)
    except CodecError:
        return
    assert all(isinstance(t, torch.Tensor) for t in out)


@pytest.mark.parametrize("spec", ["q8+zstd1", "q4c+zstd3", "f32+zstd1"])
def test_large_tensor_round_trip(spec):
    x = torch.randn(1, 96, 112, 112)  # 4.8 MB: several zstd blocks and a long header-free payload
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    if spec == "f32+zstd1":
        assert torch.equal(x, y)
    else:
        bits = int(spec[1])
        assert (y - x).abs().max() <= (x.max() - x.min()) / ((1 << bits) - 1) * 0.5001


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 3),
    rest=st.sampled_from([(), (1,), (6,), (3, 4)]),
    spec=st.sampled_from(["pca5q8", "pca2q3+zstd1", "pca5q6"]),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    nonfinite=st.booleans(),
)
def test_pca_codecs_return_the_shape_finite_values_and_exact_nonfinite_ones(
    seed, n, rest, spec, scale, nonfinite
):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 5, *rest)) * scale).astype(np.float32)
    if nonfinite and x.size:
        flat = x.reshape(-1)
        flat[rng.integers(0, x.size, 3)] = rng.choice([np.nan, np.inf, -np.inf], 3)
    codec = _codec(spec)
    (y,) = codec.decode_numpy(codec.encode([x]))
    assert y.shape == x.shape and y.dtype == np.float32
    bad = ~np.isfinite(x)
    assert np.array_equal(y[bad], x[bad], equal_nan=True) and np.isfinite(y[~bad]).all()
    (t,) = codec.decode(codec.encode([torch.from_numpy(x)]))
    assert np.array_equal(t.numpy(), y, equal_nan=True)
