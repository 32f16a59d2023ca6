"""The ``+ans`` entropy stage (compression/_ans.py): same values as the packed codec, sizes near
the codes' entropy, hostile blobs refused, a clear error without constriction."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgpack
import numpy as np
import pytest

from splitinfer.compression import get_codec
from splitinfer.compression._quant import affine, channel_view, quantize, sanitize
from splitinfer.errors import CodecError


def _laplace(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.05, 3.0, shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    return (rng.laplace(size=shape) * scales).astype(np.float32)


@pytest.mark.parametrize("spec", ["q2+ans", "q3c+ans", "q4c+ans", "q5+ans", "q6c+ans", "q8c+ans"])
@pytest.mark.parametrize("shape", [(1, 40, 28, 28), (2, 3, 5), (7,), (1, 1280), (3, 2, 1, 1)])
def test_ans_decodes_to_exactly_what_the_packed_codec_decodes(spec, shape):
    x = _laplace(shape) if len(shape) > 1 else np.linspace(-3, 5, shape[0], dtype=np.float32)
    x.reshape(-1)[::11] = np.nan  # non-finite values take the quantizer's path, both ways
    x.reshape(-1)[::13] = np.inf
    packed = get_codec(spec.removesuffix("+ans"))
    codec = get_codec(spec)
    blob = codec.encode([x, np.arange(5)])
    got, ints = codec.decode_numpy(blob)
    assert np.array_equal(got, packed.decode_numpy(packed.encode([x]))[0], equal_nan=True)
    bad = ~np.isfinite(x)
    assert np.array_equal(got[bad], x[bad], equal_nan=True)  # NaN and inf come back where they were
    assert np.isfinite(got[~bad]).all()
    assert np.array_equal(ints, np.arange(5))
    assert codec.decode(blob)[0].numpy().tobytes() == got.tobytes()


def _entropy_bytes(x: np.ndarray, bits: int) -> float:
    """Zeroth-order entropy (bytes) of the per-channel codes of ``x``, one distribution a channel."""
    a3 = channel_view(x, True)
    clean, lo, hi, _ = sanitize(a3)
    lo32, scale, _ = affine(lo, hi, 1 << bits)
    codes = quantize(clean, lo32, scale, 1 << bits)
    total = 0.0
    for c in range(codes.shape[1]):
        counts = np.bincount(codes[:, c].reshape(-1), minlength=1 << bits)
        p = counts[counts > 0] / counts.sum()
        total -= float((counts[counts > 0] * np.log2(p)).sum())
    return total / 8


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_ans_comes_within_a_few_percent_of_the_entropy_and_beats_packed_zstd(bits):
    x = _laplace((1, 40, 28, 28))
    blob = get_codec(f"q{bits}c+ans").encode([x])
    entropy = _entropy_bytes(x, bits)
    tables = 40 * (1 << bits)  # at most one weight byte per channel and level
    assert entropy < len(blob) < 1.04 * entropy + tables + 200  # 200: the blob's header
    assert len(blob) < len(get_codec(f"q{bits}c+zstd1").encode([x]))


def _weights(blob: bytes) -> bytes:
    header = msgpack.Unpacker(raw=False)
    header.feed(blob)
    return header.unpack()[2][0][4]


def test_statistics_are_per_channel_where_that_is_smaller_and_pooled_elsewhere():
    small = _laplace((1, 64, 4, 4))  # 1024 codes, 64 x 16 table bytes: one pooled table
    assert len(_weights(get_codec("q4c+ans").encode([small]))) == 16
    large = _laplace((1, 40, 28, 28))
    assert len(_weights(get_codec("q4+ans").encode([large]))) == 16  # one range: pooled
    large[:, ::2] = np.maximum(large[:, ::2], 0)  # half the channels ReLU'd: other distributions
    assert len(_weights(get_codec("q4c+ans").encode([large]))) == 40 * 16


def _tamper(blob: bytes, index: int, value: object) -> bytes:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    header = unpacker.unpack()
    data = blob[unpacker.tell() :]
    header[2][0][index] = value
    return msgpack.packb(header, use_bin_type=True) + data


def test_hostile_ans_blobs_are_refused():
    codec = get_codec("q4c+ans")
    blob = codec.encode([_laplace((1, 40, 28, 28))])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    header = unpacker.unpack()
    words = header[2][0][5]
    cases = {
        "weights of the wrong length": _tamper(blob, 4, b"\x01" * 17),
        "weights for two channels": _tamper(blob, 4, b"\x01" * 32),
        "a distribution without symbols": _tamper(blob, 4, b"\x00" * 16 + header[2][0][4][16:]),
        "weights that are not bytes": _tamper(blob, 4, [1, 2]),
        "a negative word count": _tamper(blob, 5, -1),
        "a word count the data does not hold": _tamper(blob, 5, words + 1),
        "a huge word count": _tamper(blob, 5, 1 << 40),
        "a truncated stream": blob[:-4],
        "an entry without the ans fields": get_codec("q4c").encode([np.ones((1, 2, 2, 2), np.float32)]),
    }
    for what, bad in cases.items():
        try:
            codec.decode_numpy(bad)
        except CodecError:
            continue
        pytest.fail(f"{what} was decoded")
    zero_end = bytearray(blob)
    zero_end[-4:] = b"\x00\x00\x00\x00"  # an rANS stream never ends in a zero word
    with pytest.raises(CodecError, match="ans payload is corrupt"):
        codec.decode_numpy(bytes(zero_end))
    flipped = bytearray(blob)
    flipped[-40] ^= 0xFF  # a corrupt stream decodes to codes of the alphabet, nothing worse
    values = codec.decode_numpy(bytes(flipped))[0]
    assert values.shape == (1, 40, 28, 28) and np.isfinite(values).all()


def test_ans_is_refused_on_codecs_that_do_not_quantize():
    for spec in ("f16+ans", "jpeg90+ans", "f32+ans"):
        only = r"only q<bits>\[c\], pca<r>q<bits> and bn<latent>q<bits> codecs take it"
        with pytest.raises(CodecError, match=only):
            get_codec(spec)
    with pytest.raises(CodecError, match="valid forms"):
        get_codec("q4c+ans+zstd1")


_NO_CONSTRICTION = textwrap.dedent(
    """
    import sys
    sys.modules["constriction"] = None  # as if it were not installed
    from splitinfer.compression import available_codecs, get_codec
    from splitinfer.errors import CodecError
    assert not any(s.endswith("+ans") for s in available_codecs())
    try:
        get_codec("q4c+ans")
    except CodecError as exc:
        print(exc)
    """
)


def test_without_constriction_the_ans_codecs_say_what_to_install():
    done = subprocess.run(
        [sys.executable, "-c", _NO_CONSTRICTION], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'splitinfer[entropy]'" in done.stdout
