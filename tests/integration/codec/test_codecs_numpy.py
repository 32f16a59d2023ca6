"""The codecs on numpy arrays: the same bytes as from torch tensors of the same values, numpy
arrays back from ``decode_numpy`` with the values ``decode`` gives, and no torch at all when
the caller never hands one in."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.compression import available_codecs, calibrate, get_codec
from splitinfer.compression._calibrate import calibrate_all
from splitinfer.compression._codec import payload_of
from splitinfer.compression._dictionary import train
from splitinfer.compression._floats import bf16_bits, bf16_values, from_f32, to_f32
from splitinfer.errors import CodecError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# every family, bit width and zstd level that the wire has, beyond available_codecs()'s samples
SPECS = sorted(
    {
        *available_codecs(),
        *(f"q{b}{c}" for b in range(2, 9) for c in ("", "c")),
        "q5c+zstd9",
        "q3+zstd22",
        "f16+zstd5",
        "bf16+zstd3",
        "jpeg50+zstd1",
        "jpeg100",
    }
)
NON_IMAGE = [s for s in SPECS if not s.startswith("jpeg")]
_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e-45, -1e-45, 1.17e-38, 5.9e-39, 3.4028235e38]
_HALF_EDGES = [65504.0, 65520.0, 65519.99, 6.1e-5, 6e-8, 2.98e-8, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11]
EDGES = np.array([*_SPECIAL, *_HALF_EDGES], np.float32)


def _torch_bits(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(a).to(dtype).view(torch.int16).numpy().view(np.uint16)


def _random_bits(n: int, seed: int = 0) -> np.ndarray:
    """``n`` float32s of uniformly random bits: every exponent, subnormals, NaN payloads, ±inf."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("values", ["edges", "random bits", "ties"])
def test_bfloat16_rounding_matches_torch_bit_for_bit(values):
    if values == "edges":
        finite = EDGES[np.isfinite(EDGES) & (np.abs(EDGES) < 3e38)]
        a = np.concatenate([EDGES, -EDGES, np.nextafter(finite, np.float32(np.inf)), [np.nan, -np.nan]])
        a = a.astype(np.float32)
    elif values == "random bits":
        a = _random_bits(1 << 20)
    else:  # exactly halfway between two bfloat16s, and one ulp either side
        base = _random_bits(1 << 16, seed=1).view(np.uint32) & np.uint32(0xFFFF0000)
        a = np.concatenate([base | np.uint32(0x8000), base | np.uint32(0x7FFF), base | np.uint32(0x8001)])
        a = a.view(np.float32)
    ours, theirs = bf16_bits(a), _torch_bits(a, torch.bfloat16)
    nan = np.isnan(a)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_values(ours[nan])).all()
    assert (ours[nan] & 0x0040).all()  # quiet
    assert np.array_equal(bf16_values(ours).view(np.uint32)[~nan], (ours[~nan].astype(np.uint32) << 16))


def test_float16_cast_matches_torch_bit_for_bit_nan_included():
    a = np.concatenate([EDGES, -EDGES, _random_bits(1 << 20, seed=2)])
    ours = from_f32(a, "float16").view(np.uint16)
    assert np.array_equal(ours, _torch_bits(a, torch.float16))


def test_every_half_precision_pattern_converts_as_torch_does():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    half, brain = bits.view(np.float16), torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    assert np.array_equal(
        to_f32(half, "float16").view(np.uint32), torch.from_numpy(half.copy()).float().numpy().view(np.uint32)
    )
    assert np.array_equal(to_f32(bits, "bfloat16").view(np.uint32), brain.float().numpy().view(np.uint32))
    nan = np.isnan(half)  # across the two half formats, any NaN goes (see _floats.py)
    assert np.array_equal(
        from_f32(to_f32(half, "float16"), "bfloat16")[~nan], _torch_bits(half, torch.bfloat16)[~nan]
    )
    nan = np.isnan(bf16_values(bits))
    theirs = brain.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(from_f32(to_f32(bits, "bfloat16"), "float16").view(np.uint16)[~nan], theirs[~nan])


def test_float64_sources_round_through_float32_as_torch_does():
    rng = np.random.default_rng(3)
    d = rng.standard_normal(1 << 16) * np.exp(rng.uniform(-110, 110, 1 << 16))
    d[:6] = [np.inf, -np.inf, 1e300, -1e300, 5e-324, 65519.999999]
    for spec, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        codec = get_codec(spec)
        assert codec.encode([d]) == codec.encode([torch.from_numpy(d)])
        (back,) = codec.decode(codec.encode([d]))
        assert torch.equal(back, torch.from_numpy(d).to(dtype).double())


@st.composite
def frontiers(draw, image=False):
    """A frontier as numpy arrays: floats of several dtypes, integers and bools, any layout."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = 1 if image else draw(st.integers(1, 3))
    arrays = []
    for _ in range(count):
        if image:
            shape = (draw(st.integers(0, 2)), 3, draw(st.integers(1, 12)), draw(st.integers(1, 12)))
            dtype = draw(st.sampled_from(["float32", "float16", "float64"]))
        else:
            shape = draw(st.sampled_from([(), (0,), (5,), (2, 3), (2, 4, 3, 3), (1, 7, 9), (3, 0, 2)]))
            dtype = draw(
                st.sampled_from(["float32", "float32", "float16", "float64", "int64", "uint8", "bool"])
            )
        n = math.prod(shape)
        if dtype == "bool":
            a = rng.random(n) < 0.5
        elif dtype in ("int64", "uint8"):
            a = rng.integers(0, 200, n)
        else:
            a = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)
            if dtype == "float32" and n and draw(st.booleans()):  # non-finite values too
                a[rng.random(n) < 0.2] = rng.choice([np.nan, np.inf, -np.inf])
        a = a.astype(dtype).reshape(shape)
        layout = draw(st.sampled_from(["contiguous", "fortran", "big-endian"]))
        if layout == "fortran":
            a = np.asfortranarray(a)
        elif layout == "big-endian" and a.dtype.itemsize > 1:
            a = a.astype(a.dtype.newbyteorder(">"))
        arrays.append(a)
    return arrays


def _as_torch(arrays):
    return [torch.from_numpy(a.astype(a.dtype.newbyteorder("="), order="C")) for a in arrays]


def _torch_as_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and values bit for bit, NaN where NaN (torch's own conversions write
    different NaN bits for arrays of different sizes: any NaN is as good as another)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind != "f":
        return a.tobytes() == b.tobytes()
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes()


@SETTINGS
@given(arrays=frontiers(), spec=st.sampled_from(NON_IMAGE))
def test_numpy_and_torch_frontiers_give_the_same_bytes_and_values(arrays, spec):
    codec = get_codec(spec)
    blob = codec.encode(arrays)
    assert blob == codec.encode(_as_torch(arrays))
    out, ref = codec.decode_numpy(blob), codec.decode(blob)
    assert all(isinstance(a, np.ndarray) for a in out)
    assert all(_same(a, _torch_as_numpy(t)) for a, t in zip(out, ref))
    assert [a.shape for a in out] == [a.shape for a in arrays]
    assert [a.dtype.name for a in out] == [a.dtype.name for a in arrays]  # native byte order out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=frontiers(image=True), spec=st.sampled_from([s for s in SPECS if s.startswith("jpeg")]))
def test_jpeg_gives_the_same_bytes_from_numpy_and_torch(arrays, spec):
    codec = get_codec(spec)
    blob = codec.encode(arrays)
    assert blob == codec.encode(_as_torch(arrays))
    assert all(_same(a, t.numpy()) for a, t in zip(codec.decode_numpy(blob), codec.decode(blob)))


@pytest.mark.parametrize("spec", NON_IMAGE)
def test_every_spec_gives_the_same_bytes_on_edge_values_and_a_large_tensor(spec):
    rng = np.random.default_rng(4)
    large = rng.standard_normal((2, 32, 40, 40)).astype(np.float32)
    edges = np.concatenate([EDGES, -EDGES, [np.nan, -np.nan]]).astype(np.float32).reshape(2, 3, 7)
    with np.errstate(over="ignore"):
        halves = edges.astype(np.float16)
    frontier = [
        large,
        edges,
        halves,
        edges.astype(np.float64),
        np.arange(6, dtype=np.int32),
        np.array(np.nan),
    ]
    codec = get_codec(spec)
    blob = codec.encode(frontier)
    assert blob == codec.encode(_as_torch(frontier))
    assert all(_same(a, _torch_as_numpy(t)) for a, t in zip(codec.decode_numpy(blob), codec.decode(blob)))


@pytest.mark.parametrize("spec", ["q8+zstd1", "q4c+zstd3", "f16+zstd1", "bf16+zstd1"])
def test_dictionaries_and_calibrated_ranges_give_the_same_bytes(spec):
    rng = np.random.default_rng(5)
    samples = [[np.maximum(rng.standard_normal((1, 16, 6, 6)), 0).astype(np.float32)] for _ in range(24)]
    torch_samples = [_as_torch(s) for s in samples]
    payloads = [payload_of(get_codec(spec), s) for s in samples]
    assert payloads == [payload_of(get_codec(spec), s) for s in torch_samples]
    dictionary = train(payloads, spec, size=1024)
    assert dictionary is not None
    clip = None
    if spec.startswith("q"):
        base = spec.split("+")[0]
        clip = calibrate(samples, base, "mse")
        assert clip == calibrate(torch_samples, base, "mse")
    codec = get_codec(spec, clip=clip, dictionary=dictionary)
    blob = codec.encode(samples[0])
    assert blob == codec.encode(torch_samples[0])
    (out,) = codec.decode_numpy(blob)
    assert _same(out, codec.decode(blob)[0].numpy())


def test_calibrate_takes_numpy_arrays_and_mixed_frontiers():
    rng = np.random.default_rng(6)
    batch = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
    ids = np.arange(8)
    specs, methods = ["q4c+zstd1", "q8"], ["minmax", "percentile", "mse"]
    ours = calibrate_all([batch, ids], specs, methods)
    assert ours == calibrate_all([torch.from_numpy(batch), torch.from_numpy(ids)], specs, methods)
    assert ours[("q8", "minmax")].tensors[1] is None
    mixed = [[batch[i : i + 1], torch.from_numpy(ids[i : i + 1])] for i in range(8)]
    assert calibrate(mixed, "q4c", "minmax").tensors[0] == ours[("q4c+zstd1", "minmax")].tensors[0]
    with pytest.raises(CodecError, match="not a tensor or numpy array"):
        calibrate([[[1.0, 2.0]]], "q8")


def test_bfloat16_tensors_decode_to_float32_arrays_of_their_bfloat16_values():
    t = torch.randn(3, 4, 5).to(torch.bfloat16)
    for spec in ("f32", "f16+zstd1", "bf16", "q8c+zstd1", "q3"):
        codec = get_codec(spec)
        blob = codec.encode([t])
        (a,) = codec.decode_numpy(blob)
        (back,) = codec.decode(blob)
        assert a.dtype == np.float32 and a.shape == (3, 4, 5)
        assert np.array_equal(a, back.float().numpy())
        assert np.array_equal(bf16_values(bf16_bits(a)), a)  # exactly bfloat16 values
    assert np.array_equal(get_codec("bf16").decode_numpy(get_codec("bf16").encode([t]))[0], t.float().numpy())


def test_decoded_arrays_own_writable_memory():
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    for spec in ("f32", "f32+zstd1", "f16", "q8", "q4c+zstd1", "jpeg90"):
        codec = get_codec(spec)
        (a,) = codec.decode_numpy(codec.encode([x]))
        assert a.flags.writeable
        a += 1


class _MyTensor(torch.Tensor):  # a subclass from outside torch is a tensor too
    pass


def test_mixed_frontiers_and_refused_arrays():
    codec = get_codec("q8+zstd1")
    x = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    assert codec.encode([x, torch.ones(2)]) == codec.encode([torch.from_numpy(x), np.ones(2, np.float32)])
    assert codec.encode([torch.from_numpy(x).as_subclass(_MyTensor)]) == codec.encode([x])
    with pytest.raises(CodecError, match="list of tensors"):
        codec.encode(x)
    with pytest.raises(CodecError, match="cannot cross the wire"):
        codec.encode([np.ones(3, np.complex64)])
    with pytest.raises(CodecError, match="cannot cross the wire"):
        codec.encode([np.array(["a", "b"])])
    with pytest.raises(CodecError, match="cannot cross the wire"):
        codec.encode([np.ones(3, np.uint16)])  # bfloat16 bits would be ambiguous: refused
    with pytest.raises(CodecError):
        codec.decode_numpy(b"not a blob")


# torch made unimportable: any attempt to import it (or a submodule) raises ImportError
_NO_TORCH = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import splitinfer
    import splitinfer.compression as c
    from splitinfer.compression import _blob, _calibrate, _codec, _dictionary, _floats, _frontier
    from splitinfer.compression import _jpeg, _pack, _quant, _spec

    rng = np.random.default_rng(0)
    frontier = [rng.standard_normal((2, 8, 6, 6)).astype(np.float32), np.arange(3)]
    for spec in ("q8+zstd1", "q4c", "f16", "bf16", "q4c+zstd1", "f32+zstd3", "q5c+ans"):
        clip = c.calibrate([frontier], spec.split("+")[0], "mse") if spec[0] == "q" else None
        codec = c.get_codec(spec, clip=clip)
        y, ids = codec.decode_numpy(codec.encode(frontier))
        assert y.dtype == np.float32 and y.shape == frontier[0].shape, (spec, y.dtype, y.shape)
        assert float(np.abs(y - frontier[0]).max()) < 0.5, spec
        assert np.array_equal(ids, frontier[1]), spec
    assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    print("ok")
    """
)


def test_the_codecs_work_where_torch_cannot_be_imported():
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_importing_splitinfer_loads_no_torch():
    code = "import sys, splitinfer, splitinfer.compression; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
