"""The cast and zstd codecs on real tensors, and their refusal of hostile blobs."""

import msgpack
import pytest
import torch

from splitinfer.compression import available_codecs, get_codec
from splitinfer.errors import CodecError


@pytest.mark.parametrize(
    "spec", [s for s in available_codecs() if not s.startswith("jpeg")]
)  # jpeg: images only
def test_round_trip_keeps_shapes_and_dtypes(spec):
    tensors = [
        torch.randn(2, 16, 8, 8),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.tensor([True, False, True]),
        torch.randn(4, 6).t(),  # non-contiguous
        torch.empty(0, 5),
        torch.tensor(3.5),
    ]
    codec = get_codec(spec)
    out = codec.decode(codec.encode(tensors))
    assert [t.shape for t in out] == [t.shape for t in tensors]
    assert [t.dtype for t in out] == [t.dtype for t in tensors]
    for a, b in zip(out[1:3], tensors[1:3]):
        assert torch.equal(a, b)  # integers and booleans are never cast


@pytest.mark.parametrize("spec", ["f32", "f32+zstd1", "f32+zstd3"])
def test_f32_is_lossless(spec):
    x = torch.randn(3, 7, 5)
    x[0, 0, 0] = float("nan")
    (y,) = get_codec(spec).decode(get_codec(spec).encode([x]))
    assert torch.equal(x.isnan(), y.isnan())
    assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))


def test_f16_error_is_within_half_precision():
    x = torch.randn(1000)
    (y,) = get_codec("f16").decode(get_codec("f16").encode([x]))
    assert torch.allclose(x, y, rtol=1e-3, atol=1e-4)


def test_zstd_compresses_sparse_activations():
    x = torch.relu(torch.randn(1, 64, 28, 28))
    assert len(get_codec("f32+zstd1").encode([x])) < 0.75 * len(get_codec("f32").encode([x]))


@pytest.mark.parametrize("spec", ["f33", "q", "f32+zstd", "f32+zstd0", "f32+zstd23", "", "F32", None])
def test_bad_specs_list_the_valid_forms(spec):
    with pytest.raises(CodecError, match=r"valid forms|zstd level"):
        get_codec(spec)


@pytest.mark.parametrize("spec", ["f32", "f16+zstd1"])
def test_truncated_blob_is_a_codec_error(spec):
    codec = get_codec(spec)
    blob = codec.encode([torch.randn(4, 32)])
    for cut in (1, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])


def test_corrupted_zstd_is_a_codec_error():
    codec = get_codec("f32+zstd1")
    blob = bytearray(codec.encode([torch.randn(64, 64)]))
    blob[-20:] = b"\x00" * 20
    with pytest.raises(CodecError):
        codec.decode(bytes(blob))


def test_blob_claiming_a_huge_tensor_is_refused_before_allocating():
    header = msgpack.packb([1, "f32", [["float32", [50_000, 50_000]]], 10_000_000_000])
    with pytest.raises(CodecError, match="above the limit"):
        get_codec("f32").decode(header + b"\x00" * 16, max_nbytes=1 << 20)


def test_decompression_bomb_is_capped():
    import zstandard

    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (64 << 20))
    header = msgpack.packb([1, "f32+zstd1", [["float32", [16]]], 64])
    with pytest.raises(CodecError, match="declares -1 bytes"):
        get_codec("f32+zstd1").decode(header + bomb)


def test_blob_of_another_codec_is_refused():
    blob = get_codec("f16").encode([torch.randn(3)])
    with pytest.raises(CodecError, match="encoded with codec 'f16'"):
        get_codec("f32").decode(blob)
