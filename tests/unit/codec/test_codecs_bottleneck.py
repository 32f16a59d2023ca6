"""The trained bottleneck codecs (``bn<latent>q<bits>``, compression/_bottleneck.py) on a
bottleneck whose encoder and decoder are numpy functions (a fixed linear map and its transpose:
what a bundle binds are its exported networks, tests/unit/partitioner/test_bottleneck.py)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from splitinfer.compression import TrainedBottleneck, get_codec, parse_spec
from splitinfer.errors import CodecError


def linear_bottleneck(
    channels: int = 5, rest: tuple[int, ...] = (6,), latent: int = 2, bits: int = 3, calls: list | None = None
) -> TrainedBottleneck:
    """A bottleneck of ``channels x *rest`` frontiers: codes are a fixed linear map of the
    channels, shifted to the middle level and clipped; the decoder maps them back. ``calls``
    (a list) records every decoder call's input shape."""
    w = np.random.default_rng(7).standard_normal((latent, channels)).astype(np.float32) / 2
    mid = ((1 << bits) - 1) / 2

    def encode(x: np.ndarray) -> np.ndarray:
        return np.einsum("lc,nc...->nl...", w, x) + mid

    def decode(codes: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(codes.shape)
        return np.einsum("lc,nl...->nc...", w, codes - mid).astype(np.float32)

    return TrainedBottleneck("0a1b2c3d", (channels, *rest), (latent, *rest), bits, encode, decode)


@pytest.mark.parametrize(
    ("text", "latent", "bits", "zstd", "ans"),
    [("bn8q2", 8, 2, None, False), ("bn1q1+zstd3", 1, 1, 3, False), ("bn256q8+ans", 256, 8, None, True)],
)
def test_bottleneck_specs_parse(text, latent, bits, zstd, ans):
    spec = parse_spec(text)
    assert (spec.kind, spec.latent, spec.bits, spec.zstd_level, spec.ans) == ("bn", latent, bits, zstd, ans)
    assert spec.base == text.split("+")[0]


@pytest.mark.parametrize(
    "text", ["bn0q2", "bn257q2", "bn8q0", "bn8q9", "bn08q2", "bn8", "bn8q2+zstd0", "bnq2"]
)
def test_malformed_bottleneck_specs_list_the_valid_forms(text):
    with pytest.raises(CodecError, match=r"bn<latent 1\.\.256>q<bits 1\.\.8>"):
        parse_spec(text)


@pytest.mark.parametrize("spec", ["bn2q3", "bn2q3+zstd1", "bn2q3+ans"])
def test_codes_round_trip_through_the_decoder(spec):
    if spec.endswith("+ans"):
        pytest.importorskip("constriction")
    b = linear_bottleneck()
    codec = get_codec(spec, bottleneck=b)
    x = np.random.default_rng(1).standard_normal((3, 5, 6)).astype(np.float32)
    blob = codec.encode([x])
    (y,) = codec.decode_numpy(blob, max_nbytes=x.nbytes)  # a server's limit: the frontier's bytes
    codes = np.clip(np.rint(b.encoder(x)), 0, 7)  # type: ignore[misc]
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, b.decoder(codes), rtol=1e-6)  # type: ignore[misc]
    (t,) = codec.decode(codec.encode([torch.from_numpy(x)]))  # torch in, torch out: the same values
    assert torch.equal(t, torch.from_numpy(y))
    assert len(blob) < len(get_codec("f32").encode([x])) / 4  # 36 codes of 3 bits against 90 floats


def test_nonfinite_values_come_back_exactly_and_spoil_nothing_else():
    codec = get_codec("bn2q3", bottleneck=linear_bottleneck())
    x = np.random.default_rng(2).standard_normal((2, 5, 6)).astype(np.float32)
    x[0, 1, 2], x[1, 4, 0] = np.nan, -np.inf
    (y,) = codec.decode_numpy(codec.encode([x]))
    assert np.isnan(y[0, 1, 2]) and y[1, 4, 0] == -np.inf
    assert np.isfinite(y[~np.isnan(x) & ~np.isinf(x)]).all()


def test_binding_is_checked_and_named():
    x = np.zeros((1, 5, 6), np.float32)
    with pytest.raises(CodecError, match="bottleneck trained for its cut"):
        get_codec("bn2q3").encode([x])
    with pytest.raises(CodecError, match="2 latent channels and 4 bits"):
        get_codec("bn2q4", bottleneck=linear_bottleneck())
    with pytest.raises(CodecError, match="only bn<latent>q<bits> codecs"):
        get_codec("q4", bottleneck=linear_bottleneck())
    with pytest.raises(CodecError, match="TrainedBottleneck"):
        get_codec("bn2q3", bottleneck="weights.pt")  # type: ignore[arg-type]
    edge_only = TrainedBottleneck("0a1b2c3d", (5, 6), (2, 6), 3, linear_bottleneck().encoder, None)
    blob = get_codec("bn2q3", bottleneck=edge_only).encode([x])
    with pytest.raises(CodecError, match=r"no decoder .* load the bundle with its tail"):
        get_codec("bn2q3", bottleneck=edge_only).decode(blob)
    with pytest.raises(CodecError, match=r"one floating tensor N x 5 x 6"):
        get_codec("bn2q3", bottleneck=linear_bottleneck()).encode([np.zeros((1, 4, 6), np.float32)])
    with pytest.raises(CodecError, match="8 hex digits"):
        TrainedBottleneck("model", (5, 6), (2, 6), 3)
    with pytest.raises(CodecError, match=r"1\.\.8 bits"):
        TrainedBottleneck("0a1b2c3d", (5, 6), (2, 6), 9)


def _header(entry: list, raw_nbytes: int, spec: str = "bn2q3") -> bytes:
    return msgpack.packb([1, spec, [entry], raw_nbytes], use_bin_type=True)


def test_hostile_blobs_are_refused_before_the_decoder_runs_or_anything_is_allocated():
    calls: list = []
    codec = get_codec("bn2q3", bottleneck=linear_bottleneck(calls=calls))
    good = ["float32", [1, 5, 6], "0a1b2c3d", [1, 2, 6], 3]
    assert codec.decode_numpy(_header(good, 5) + b"\0" * 5)[0].shape == (1, 5, 6)
    cases = {
        "bottleneck 'ffffffff'": (["float32", [1, 5, 6], "ffffffff", [1, 2, 6], 3], 5),
        r"frontiers N x 5 x 6, the blob declares \[1, 5, 7\]": (
            ["float32", [1, 5, 7], "0a1b2c3d", [1, 2, 7], 3],
            5,
        ),
        r"has codes \[1, 2, 6\], the blob declares \[1, 3, 6\]": (
            ["float32", [1, 5, 6], "0a1b2c3d", [1, 3, 6], 3],
            5,
        ),
        "8 levels": (["float32", [1, 5, 6], "0a1b2c3d", [1, 2, 6], 8], 12),
        "header says 4 bytes": (good, 4),
        "entry is": (["int64", [1, 5, 6], "0a1b2c3d", [1, 2, 6], 3], 5),
        "above the limit": (["float32", [1 << 24, 5, 6], "0a1b2c3d", [1 << 24, 2, 6], 3], 5 << 24),
    }
    for message, (entry, raw) in cases.items():
        with pytest.raises(CodecError, match=message):
            codec.decode(_header(entry, raw) + b"\0" * min(raw, 64), max_nbytes=1 << 20)
    with pytest.raises(CodecError, match="carries 4 data bytes"):
        codec.decode(_header(good, 5) + b"\0" * 4)
    assert calls == [(1, 2, 6)]  # only the good blob reached the decoder
    blob = codec.encode([np.ones((2, 5, 6), np.float32)])
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])
    assert len(calls) == 1
