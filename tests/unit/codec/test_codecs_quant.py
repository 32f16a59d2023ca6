"""Quantized and JPEG codecs, clip ranges and calibration, on concrete examples.

The properties that must hold for every input (round trips, error bounds, fuzzed blobs) live in
test_codecs_properties.py.
"""

import json
import math
import threading

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from splitinfer.compression import ClipRanges, Codec, available_codecs, calibrate, get_codec
from splitinfer.compression._pack import pack_bits, packed_nbytes, unpack_bits
from splitinfer.errors import CodecError

QUANT_SPECS = [f"q{b}{c}" for b in range(2, 9) for c in ("", "c")]


def _step(lo: float, hi: float, bits: int) -> float:
    return (hi - lo) / ((1 << bits) - 1)


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec", ["q2", "q8", "q4c", "q3c+zstd1", "q8+zstd22", "jpeg1", "jpeg90", "jpeg100", "jpeg75+zstd3"]
)
def test_valid_specs_give_codecs_named_by_them(spec):
    codec = get_codec(spec)
    assert isinstance(codec, Codec)
    assert codec.spec == spec


@pytest.mark.parametrize(
    "spec",
    ["q1", "q9", "q16", "q8d", "q8cc", "Q8", "jpeg0", "jpeg101", "jpeg090", "q8+zstd01", "q8+", "jpeg"],
)
def test_bad_quantized_specs_list_the_valid_forms(spec):
    with pytest.raises(CodecError, match=r"valid forms: .*q<bits 2\.\.8>c .*jpeg<quality 1\.\.100>"):
        get_codec(spec)


def test_available_codecs_cover_every_family_and_all_work():
    specs = available_codecs()
    assert {"f32", "q8+zstd1", "q4c+zstd3", "jpeg90"} <= set(specs)
    for spec in specs:
        get_codec(spec)


def test_codecs_are_frozen():
    codec = get_codec("q8")
    with pytest.raises(AttributeError):
        codec.spec = "q4"  # type: ignore[misc]


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 63, 1001])
def test_pack_bits_is_an_lsb_first_bit_stream(bits, n):
    codes = np.random.default_rng(bits * 1000 + n).integers(0, 1 << bits, n, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    reference = np.packbits(
        np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1), bitorder="little"
    )
    assert packed.size == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert np.array_equal(packed, reference)
    assert np.array_equal(unpack_bits(packed.tobytes(), bits, n), codes)


def test_two_4bit_values_share_a_byte_and_3bit_packs_8_in_3():
    assert pack_bits(np.array([0x1, 0xF], np.uint8), 4).tolist() == [0xF1]
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(4, 6) == 3


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantized_payload_is_densely_packed(bits):
    x = torch.randn(1, 8, 25, 25)  # 5000 values
    codec = get_codec(f"q{bits}")
    blob = codec.encode([x])
    header_len = len(
        msgpack.packb([1, f"q{bits}", [["float32", [1, 8, 25, 25], b"\0" * 4, b"\0" * 4]], 5000])
    )
    assert len(blob) == header_len + math.ceil(5000 * bits / 8)


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("spec", QUANT_SPECS)
def test_quantized_values_are_within_half_a_step(spec):
    bits = int(spec[1])
    x = torch.randn(3, 5, 7, 2) * torch.arange(1, 6).view(1, 5, 1, 1)  # channels of different scales
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    if spec.endswith("c"):
        lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
        step = ((hi - lo) / ((1 << bits) - 1)).view(1, 5, 1, 1)
    else:
        step = _step(x.min().item(), x.max().item(), bits)
    assert ((y - x).abs() <= step * 0.5001 + 1e-6).all()


def test_per_channel_beats_per_tensor_on_small_channels_next_to_large_ones():
    x = torch.randn(2, 4, 16, 16) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(1, 4, 1, 1)
    err = {
        s: (get_codec(s).decode(get_codec(s).encode([x]))[0] - x)[:, :3].pow(2).mean().item()
        for s in ("q4", "q4c")
    }
    assert err["q4c"] < err["q4"] / 10


def test_per_channel_uses_dim_1_and_falls_back_to_one_range_below_3_dims():
    codec = get_codec("q8c")
    maps = torch.randn(2, 6, 3) * torch.arange(1, 7).reshape(1, 6, 1)  # (batch, channels, positions)
    features = torch.randn(4, 6) * torch.arange(1, 7)  # (batch, features): one range
    blob = codec.encode([maps, features, torch.randn(10), torch.tensor(1.5)])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    _, _, entries, _ = unpacker.unpack()
    assert [len(e[2]) // 4 for e in entries] == [6, 1, 1, 1]
    out = codec.decode(blob)
    assert out[3].item() == 1.5


def test_relu_zeros_decode_exactly_to_zero():
    x = torch.relu(torch.randn(1, 32, 14, 14))
    for spec in ("q8", "q4c+zstd1", "q2c"):
        (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
        assert (y[x == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantized_keeps_floating_dtypes(dtype):
    x = torch.randn(2, 3, 4).to(dtype)
    (y,) = get_codec("q8c+zstd1").decode(get_codec("q8c+zstd1").encode([x]))
    assert y.dtype == dtype
    assert torch.allclose(y.double(), x.double(), atol=0.05)


@pytest.mark.parametrize("spec", ["q8", "q3c+zstd1"])
def test_integers_and_bools_travel_unchanged(spec):
    tensors = [
        torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        torch.tensor([True, False, True]),
        torch.tensor([1, 255, 0], dtype=torch.uint8),
        torch.tensor([7], dtype=torch.int16),
    ]
    out = get_codec(spec).decode(get_codec(spec).encode(tensors))
    for a, b in zip(out, tensors):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_constant_and_empty_tensors():
    codec = get_codec("q4c+zstd1")
    tensors = [torch.full((2, 3, 4), -7.25), torch.empty(0, 3, 4), torch.empty(2, 0, 4), torch.zeros(0)]
    out = codec.decode(codec.encode(tensors))
    assert torch.equal(out[0], tensors[0])
    assert [t.shape for t in out] == [t.shape for t in tensors]


def test_decoded_tensors_are_writable_and_independent():
    codec = get_codec("q8+zstd1")
    (y,) = codec.decode(codec.encode([torch.randn(8)]))
    y += 1  # would fail or warn on a read-only buffer


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("spec", ["f32", "f32+zstd1", "f16", "bf16+zstd1"])
def test_lossless_and_cast_specs_keep_nan_and_inf(spec):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -0.0])
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    assert y[0].isnan()
    assert y[1] == float("inf")
    assert y[2] == -float("inf")
    assert y[4].item() == 0.0 and math.copysign(1, y[4].item()) == -1


@pytest.mark.parametrize("spec", ["q8", "q8c", "q4+zstd1", "q2c+zstd1", "jpeg90"])
def test_lossy_specs_return_nan_and_inf_exactly_and_keep_the_finite_range(spec):
    x = torch.tensor([-2.0, float("nan"), 3.0, float("inf"), -float("inf"), 0.0, 1.0])  # 1-d: one range
    if spec.startswith("jpeg"):
        x = x.repeat(3, 1).reshape(1, 3, 1, 7)
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    x, y = x.reshape(-1, 7)[0], y.reshape(-1, 7)[0]
    assert y[1].isnan() and y[3] == float("inf") and y[4] == -float("inf")  # where they were
    if not spec.startswith("jpeg"):
        step = _step(-2.0, 3.0, int(spec[1]))  # the range is the finite values'
        finite = x.isfinite()
        assert (y[finite] - x[finite]).abs().max() <= step / 2 + 1e-6


def test_channel_without_finite_values_comes_back_as_it_was():
    x = torch.tensor([[float("nan"), float("inf")], [1.0, 2.0]]).t()  # channel 0: nan, inf
    (y,) = get_codec("q8c").decode(get_codec("q8c").encode([x]))
    assert y[0, 0].isnan() and y[1, 0] == float("inf")
    assert y[:, 1].tolist() == pytest.approx([1.0, 2.0])


def test_huge_finite_values_are_limited_to_1e38():
    x = torch.tensor([-3e38, 0.0, 3e38])
    (y,) = get_codec("q8").decode(get_codec("q8").encode([x]))
    assert y.isfinite().all()
    assert y[0].item() == pytest.approx(-1e38, rel=1e-6) and y[2].item() == pytest.approx(1e38, rel=1e-6)


# ---------------------------------------------------------------- clip ranges and calibration


def test_bound_codec_clips_to_its_ranges_and_a_codec_bound_to_them_decodes_the_blob():
    ranges = ClipRanges.from_arrays([(-1.0, 1.0), None], per_channel=False)
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 5.0])
    blob = get_codec("q8+zstd1", clip=ranges).encode([x, torch.arange(3)])
    y, ints = get_codec("q8+zstd1", clip=ranges).decode(blob)
    assert y.tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.7, 1.0], abs=_step(-1, 1, 8) / 2 + 1e-6)
    assert torch.equal(ints, torch.arange(3))


def test_per_channel_ranges():
    ranges = ClipRanges.from_arrays([([0.0, -1.0], [1.0, 10.0])], per_channel=True)
    x = torch.tensor([[2.0, 20.0], [-1.0, -5.0]]).reshape(2, 2, 1)  # N x C x positions
    (y,) = get_codec("q8c", clip=ranges).decode(get_codec("q8c", clip=ranges).encode([x]))
    assert y.flatten().tolist() == pytest.approx([1.0, 10.0, 0.0, -1.0], abs=1e-6)


def test_clip_ranges_misuse_is_a_codec_error():
    per_tensor = ClipRanges.from_arrays([(0.0, 1.0)], per_channel=False)
    per_channel = ClipRanges.from_arrays([([0.0, 0.0], [1.0, 1.0])], per_channel=True)
    with pytest.raises(CodecError, match="does not quantize"):
        get_codec("f16", clip=per_tensor)
    with pytest.raises(CodecError, match="per-channel codec"):
        get_codec("q8", clip=per_channel)
    with pytest.raises(CodecError, match="ClipRanges"):
        get_codec("q8", clip={"lo": 0})  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="frontier has 2"):
        get_codec("q8", clip=per_tensor).encode([torch.ones(2), torch.ones(2)])
    with pytest.raises(CodecError, match="3 channels"):
        get_codec("q8c", clip=per_channel).encode([torch.ones(2, 3, 1)])
    with pytest.raises(CodecError, match="lo <= hi"):
        ClipRanges.from_arrays([(1.0, 0.0)], per_channel=False)
    with pytest.raises(CodecError, match="finite"):
        ClipRanges.from_arrays([(0.0, float("inf"))], per_channel=False)


def test_per_tensor_ranges_work_with_a_per_channel_codec():
    ranges = ClipRanges.from_arrays([(-1.0, 1.0)], per_channel=False)
    (y,) = get_codec("q8c", clip=ranges).decode(
        get_codec("q8c", clip=ranges).encode([torch.full((2, 3), 4.0)])
    )
    assert torch.allclose(y, torch.ones(2, 3))


def _samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(2, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1),
            torch.arange(3),
        ]
        for _ in range(n)
    ]


def test_calibrate_minmax_is_the_min_and_max_over_all_samples():
    samples = _samples()
    every = torch.cat([s[0] for s in samples])
    r = calibrate(samples, "q8", "minmax")
    assert r.tensors[0] == ((every.min().item(),), (every.max().item(),))
    assert r.tensors[1] is None
    rc = calibrate(iter(samples), "q8c+zstd1", "minmax")
    assert rc.per_channel
    assert list(rc.tensors[0][0]) == every.amin(dim=(0, 2, 3)).tolist()


def test_calibrate_percentile():
    samples = _samples()
    assert (
        calibrate(samples, "q8c", "percentile", percentile=100).tensors == calibrate(samples, "q8c").tensors
    )
    every = torch.cat([s[0] for s in samples]).transpose(0, 1).reshape(4, -1).double()
    r = calibrate(samples, "q8c", "percentile", percentile=99.0)
    assert list(r.tensors[0][1]) == pytest.approx(torch.quantile(every, 0.99, dim=1).tolist())
    assert list(r.tensors[0][0]) == pytest.approx(torch.quantile(every, 0.01, dim=1).tolist())


def test_calibrate_mse_clips_outliers_and_lowers_the_error():
    g = torch.Generator().manual_seed(1)
    samples = [[torch.randn(1, 2, 64, 64, generator=g)] for _ in range(4)]
    samples[0][0][0, :, 0, 0] = 40.0  # one outlier per channel
    test = torch.randn(1, 2, 64, 64, generator=g)
    mse = calibrate(samples, "q4c", "mse")
    minmax = calibrate(samples, "q4c", "minmax")
    assert all(h < 10 for h in mse.tensors[0][1])

    def error(ranges):
        codec = get_codec("q4c", clip=ranges)
        return (codec.decode(codec.encode([test]))[0] - test).pow(2).mean().item()

    assert error(mse) < error(minmax) / 4


def test_calibrate_mse_keeps_relu_zeros_exact():
    g = torch.Generator().manual_seed(2)
    samples = [[torch.relu(torch.randn(1, 3, 32, 32, generator=g))] for _ in range(3)]
    r = calibrate(samples, "q2c", "mse")
    assert r.tensors[0][0] == (0.0, 0.0, 0.0)
    assert all(0 < h < 4 for h in r.tensors[0][1])


def test_calibrate_ignores_non_finite_values():
    x = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]])
    for method in ("minmax", "percentile", "mse"):
        r = calibrate([[x]], "q8", method)
        lo, hi = r.tensors[0]
        assert -2.0 <= lo[0] <= hi[0] <= 1.0


def test_calibrate_errors():
    with pytest.raises(CodecError, match="does not quantize"):
        calibrate(_samples(), "f16", "minmax")
    with pytest.raises(CodecError, match="minmax, percentile, mse"):
        calibrate(_samples(), "q8", "kl")
    with pytest.raises(CodecError, match="at least one"):
        calibrate([], "q8")
    with pytest.raises(CodecError, match="number of tensors"):
        calibrate([[torch.ones(2)], [torch.ones(2), torch.ones(2)]], "q8")
    with pytest.raises(CodecError, match="channel count"):
        calibrate([[torch.ones(2, 3, 1)], [torch.ones(2, 4, 1)]], "q8c")
    with pytest.raises(CodecError, match="percentile"):
        calibrate(_samples(), "q8", "percentile", percentile=120)


def test_clip_ranges_round_trip_through_json():
    r = calibrate(_samples(), "q4c+zstd1", "mse")
    text = json.dumps(r.to_json())
    back = ClipRanges.from_json(json.loads(text))
    assert back == r
    assert back.method == "mse"
    assert json.loads(text)["tensors"][1] is None


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"format": "splitinfer-clip-ranges", "version": 2, "per_channel": False, "tensors": []},
        {"format": "splitinfer-clip-ranges", "version": 1, "per_channel": False, "tensors": {}},
        {"format": "splitinfer-clip-ranges", "version": 1, "per_channel": "no", "tensors": []},
        {"format": "splitinfer-clip-ranges", "version": 1, "per_channel": False, "tensors": [{"lo": [0]}]},
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": False,
            "tensors": [{"lo": [0, 1], "hi": [1, 2]}],
        },
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": True,
            "tensors": [{"lo": [0, 1], "hi": [1]}],
        },
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": True,
            "tensors": [{"lo": ["0"], "hi": [1]}],
        },
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": True,
            "tensors": [{"lo": [2], "hi": [1]}],
        },
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": True,
            "tensors": [{"lo": [True], "hi": [1]}],
        },
        {"format": "splitinfer-clip-ranges", "version": 1, "per_channel": True, "tensors": [5]},
        {
            "format": "splitinfer-clip-ranges",
            "version": 1,
            "per_channel": True,
            "tensors": [{"lo": [0], "hi": [10**400]}],
        },
    ],
)
def test_malformed_clip_ranges_json_is_a_codec_error(obj):
    with pytest.raises(CodecError):
        ClipRanges.from_json(obj)


# ---------------------------------------------------------------- 2-D tensors (pooled features)


def _pooled(n: int, seed: int) -> np.ndarray:
    """Pooled-feature-like rows ``n x 256``: non-negative, each sample lighting up a few channels
    of its own (as class-specific features do), the rest small."""
    rng = np.random.default_rng(seed)
    x = rng.exponential(0.1, (n, 256)).astype(np.float32)
    for row in x:
        row[rng.choice(256, 8, replace=False)] += rng.uniform(2.0, 6.0, 8).astype(np.float32)
    return x


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("spec", ["q8c", "q4c+zstd1", "q6c+ans"])
def test_per_channel_codecs_give_2d_tensors_one_calibrated_range(spec, method):
    """An N x C tensor has one value a channel a sample: per-channel ranges calibrated on a few
    samples clipped held-out values in channels the calibration never saw lit (66 % top-1
    agreement on EfficientNet-Lite0's pooled features), and cost 8 bytes a value."""
    if spec.endswith("+ans"):
        pytest.importorskip("constriction")
    clip = calibrate([[_pooled(32, 1)]], spec.split("+")[0], method)
    assert [len(lo) for lo, _ in clip.tensors] == [1]  # one range, like q8
    per_tensor = get_codec(spec.replace("c", "", 1), clip=calibrate([[_pooled(32, 1)]], spec[:2], method))
    codec = get_codec(spec, clip=clip)
    held_out = _pooled(1, 2)
    (y,) = codec.decode_numpy(codec.encode([held_out]))
    (lo,), (hi,) = clip.tensors[0]
    step = _step(lo, hi, int(spec[1]))
    assert np.abs(y - np.clip(held_out, lo, hi)).max() <= step / 2 + 1e-5
    assert np.abs(y - held_out).max() < 0.25 * held_out.max()  # nothing lit is clipped away
    f32 = len(get_codec("f32").encode([held_out]))
    assert len(codec.encode([held_out])) < f32 / 3
    assert len(codec.encode([held_out])) == len(per_tensor.encode([held_out])) + 1  # the "c" of the spec


def test_per_channel_ranges_of_2d_tensors_from_older_bundles_and_blobs_still_work():
    x = _pooled(1, 3)
    old_clip = ClipRanges.from_arrays([(np.zeros(256), np.full(256, 8.0))], per_channel=True)
    (y,) = get_codec("q8c", clip=old_clip).decode_numpy(get_codec("q8c", clip=old_clip).encode([x]))
    assert np.abs(y - x).max() <= _step(0.0, 8.0, 8) / 2 + 1e-6  # the union of its ranges
    lo, scale = np.zeros(256, "<f4"), np.full(256, 8.0 / 255, "<f4")
    codes = np.clip(np.rint(x / scale), 0, 255).astype(np.uint8)
    old_blob = _blob("q8c", [["float32", [1, 256], lo.tobytes(), scale.tobytes()]], codes.tobytes())
    (y,) = get_codec("q8c").decode_numpy(old_blob)  # one range a channel, as encoded before
    assert np.abs(y - x).max() <= 8.0 / 255 / 2 + 1e-6


# ---------------------------------------------------------------- jpeg


def _smooth_images(n=2, h=48, w=64):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])
    return torch.stack([img * (0.5 + 0.5 * i / max(n - 1, 1)) for i in range(n)])


@pytest.mark.parametrize("spec", ["jpeg90", "jpeg75+zstd1"])
def test_jpeg_round_trip_is_close_on_smooth_images(spec):
    x = _smooth_images()
    codec = get_codec(spec)
    blob = codec.encode([x])
    (y,) = codec.decode(blob)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().mean() < 0.01
    assert len(blob) < x.numel() / 4  # well below one byte a sample


def test_jpeg_with_clip_ranges_encodes_normalized_images():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (_smooth_images() - mean) / std
    ranges = ClipRanges.from_arrays(
        [((-mean / std).flatten(), ((1 - mean) / std).flatten())], per_channel=True
    )
    (y,) = get_codec("jpeg90").decode(get_codec("jpeg90", clip=ranges).encode([x]))
    assert (y - x).abs().mean() < 0.05
    calibrated = calibrate([[x]], "jpeg90", "minmax")
    assert len(calibrated.tensors[0][0]) == 3


def test_jpeg_uses_each_channels_range_by_default():
    """Normalised images are not in [0, 1]: without clip ranges, the batch's per-channel min/max."""
    x = _smooth_images() * torch.tensor([3.0, 1.0, 0.5]).view(1, 3, 1, 1) - 1
    (y,) = get_codec("jpeg90").decode(get_codec("jpeg90").encode([x]))
    assert (y - x).abs().mean() < 0.03
    assert y.amin(dim=(0, 2, 3)).tolist() == pytest.approx(x.amin(dim=(0, 2, 3)).tolist(), abs=0.05)
    assert y.amax(dim=(0, 2, 3)).tolist() == pytest.approx(x.amax(dim=(0, 2, 3)).tolist(), abs=0.05)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        torch.rand(1, 4, 8, 8),
        torch.rand(3, 8, 8),
        torch.rand(1, 1, 8, 8),
    ],
)
def test_jpeg_refuses_anything_but_float_image_batches(tensor):
    with pytest.raises(CodecError, match="N x 3 x H x W"):
        get_codec("jpeg90").encode([tensor])


def test_jpeg_handles_empty_batches_and_tiny_images():
    codec = get_codec("jpeg90")
    out = codec.decode(codec.encode([torch.rand(0, 3, 8, 8), torch.rand(1, 3, 1, 1)]), max_nbytes=1 << 10)
    assert [t.shape for t in out] == [(0, 3, 8, 8), (1, 3, 1, 1)]


def test_jpeg_file_of_another_size_is_refused():
    codec = get_codec("jpeg90")
    blob = codec.encode([torch.rand(1, 3, 16, 16)])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    version, spec, entries, raw = unpacker.unpack()
    entries[0][1] = [1, 3, 16, 8]
    forged = msgpack.packb([version, spec, entries, raw]) + blob[unpacker.tell() :]
    with pytest.raises(CodecError, match="header says RGB 8x16"):
        codec.decode(forged)


def test_truncated_or_corrupt_jpeg_is_a_codec_error():
    codec = get_codec("jpeg90")
    blob = codec.encode([_smooth_images(1)])
    for cut in range(1, len(blob), 97):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    unpacker.unpack()
    corrupt = bytearray(blob)
    corrupt[unpacker.tell() : unpacker.tell() + 4] = b"\x00\x00\x00\x00"  # not a JPEG file any more
    with pytest.raises(CodecError, match="not a valid JPEG"):
        codec.decode(bytes(corrupt))


# ---------------------------------------------------------------- hostile blobs


def _blob(spec, entries, data, raw_nbytes=None):
    raw_nbytes = len(data) if raw_nbytes is None else raw_nbytes
    return msgpack.packb([1, spec, entries, raw_nbytes]) + data


F32 = np.float32(1).tobytes()
ZERO = np.float32(0).tobytes()


def test_quantized_blob_claiming_a_huge_tensor_is_refused_before_allocating():
    blob = _blob("q4", [["float32", [50_000, 50_000], ZERO, F32]], b"", raw_nbytes=1_250_000_000)
    with pytest.raises(CodecError, match="above the limit"):
        get_codec("q4").decode(blob, max_nbytes=1 << 20)


def test_decoded_size_counts_against_the_limit_not_only_the_packed_size():
    codec = get_codec("q2")
    blob = codec.encode([torch.randn(1000)])  # 250 packed bytes, 4000 decoded
    with pytest.raises(CodecError, match="above the limit"):
        codec.decode(blob, max_nbytes=1000)
    codec.decode(blob, max_nbytes=4000)


def test_bf16_cast_blob_counts_its_float32_output():
    blob = _blob("bf16", [["float32", [1000]]], b"\0" * 2000)
    with pytest.raises(CodecError, match="above the limit"):
        get_codec("bf16").decode(blob, max_nbytes=3000)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (["float32", [2, 3], ZERO * 3, F32 * 3], "lo must be 1"),  # per-tensor spec, 3 ranges
        (["float32", [2, 3], ZERO, F32, b""], "lo, scale"),
        (["float32", [2, 3], ZERO, np.float32(-1).tobytes()], "scale must be >= 0"),
        (["float32", [2, 3], np.float32(np.nan).tobytes(), F32], "finite"),
        (["float32", [2, 3], np.float32(3e38).tobytes(), np.float32(1e37).tobytes()], "finite float32"),
        (["float32", [2, 3], 0.0, 1.0], "lo must be"),
        (["float32", [2, 3]], "lo, scale"),
        (["int64", [2], ZERO, F32], r"\[dtype, shape\]"),
        (["complex64", [2], ZERO, F32], "unknown dtype"),
        (["float32", [-1], ZERO, F32], "dims >= 0"),
        (["float32", "2", ZERO, F32], "dims >= 0"),
        ("float32", "tensor entry"),
    ],
)
def test_malformed_quantized_entries_are_refused(entry, message):
    with pytest.raises(CodecError, match=message):
        get_codec("q8").decode(_blob("q8", [entry], b"\0" * 6))


def test_per_channel_ranges_are_length_checked_against_the_shape():
    entry = ["float32", [2, 3, 4], ZERO * 2, F32 * 2]
    with pytest.raises(CodecError, match="lo must be 3"):
        get_codec("q8c").decode(_blob("q8c", [entry], b"\0" * 24))


def test_quantized_zstd_bomb_is_capped():
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (64 << 20))
    blob = _blob("q8+zstd1", [["float32", [16], ZERO, F32]], bomb, raw_nbytes=16)
    with pytest.raises(CodecError, match="declares -1 bytes"):
        get_codec("q8+zstd1").decode(blob)


@pytest.mark.parametrize("spec", ["q8", "q3c+zstd1", "jpeg90+zstd1", "f16"])
def test_every_truncation_is_a_codec_error(spec):
    codec = get_codec(spec)
    blob = codec.encode([torch.rand(2, 3, 8, 8)])
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])


def test_wrong_types_are_codec_errors():
    with pytest.raises(CodecError, match="list of tensors"):
        get_codec("q8").encode(torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="encodes tensors or numpy arrays"):
        get_codec("q8").encode([[1.0, 2.0]])
    with pytest.raises(CodecError, match="cannot cross the wire"):
        get_codec("q8").encode([torch.ones(3, dtype=torch.complex64)])
    with pytest.raises(CodecError, match="cannot cross the wire"):
        get_codec("f32").encode([torch.ones(3, dtype=torch.uint16)])
    with pytest.raises(CodecError, match="dense tensors"):
        get_codec("q8").encode([torch.eye(3).to_sparse()])
    for blob in ("text", None, 5, memoryview(bytes(10))[::2]):
        with pytest.raises(CodecError, match="bytes-like"):
            get_codec("q8").decode(blob)  # type: ignore[arg-type]


def test_codecs_are_safe_to_share_between_threads():
    codec = get_codec("q4c+zstd3")
    inputs = [torch.randn(2, 8, 32, 32) for _ in range(4)]
    expected = [codec.encode([x]) for x in inputs]
    results: dict[int, list[bytes]] = {}

    def work(k):
        results[k] = [codec.encode([x]) for x in inputs for _ in range(5)][::5]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results.values())
