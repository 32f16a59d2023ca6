"""Calibrated ranges live in the bundle: a blob quantized with them names them (issue 28 item 4)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from splitinfer.compression import ClipRanges, get_codec
from splitinfer.compression._blob import BLOB_VERSION, read_header
from splitinfer.compression._quant import affine
from splitinfer.errors import CodecError

CHANNELS = 64


def _frontier(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, CHANNELS, 4, 4, generator=g) * torch.linspace(0.5, 4.0, CHANNELS).view(1, -1, 1, 1)


def _ranges() -> ClipRanges:
    x = _frontier(1)
    return ClipRanges.from_arrays(
        [(x.amin((0, 2, 3)).numpy() * 0.9, x.amax((0, 2, 3)).numpy() * 0.9)],
        per_channel=True,
        method="minmax",
    )


def _entries(blob: bytes, spec: str) -> list:
    return read_header(memoryview(blob), spec)[0]


def _old_blob(blob: bytes, spec: str, ranges: ClipRanges, bits: int) -> bytes:
    """The blob as splitinfer wrote it before issue 28: the ranges' lo and scale in the entry."""
    view = memoryview(blob)
    entries, raw_nbytes, offset, _ = read_header(view, spec)
    lo, hi = ranges.arrays(0, CHANNELS)
    lo32, scale, _ = affine(lo, hi, 1 << bits)
    old = [[e[0], e[1], lo32.astype("<f4").tobytes(), scale.astype("<f4").tobytes(), *e[3:]] for e in entries]
    return msgpack.packb([BLOB_VERSION, spec, old, raw_nbytes]) + bytes(view[offset:])


@pytest.mark.parametrize("spec", ["q4c", "q4c+zstd1", "q8c"])
def test_a_calibrated_blob_names_its_ranges_instead_of_carrying_them(spec):
    ranges, x = _ranges(), _frontier()
    bound = get_codec(spec, clip=ranges)
    blob = bound.encode([x])
    (entry,) = _entries(blob, spec)
    assert entry[2] == ranges.id and isinstance(entry[2], str) and len(entry) == 3
    bits = int(spec[1])
    old = _old_blob(blob, spec, ranges, bits)
    assert len(old) - len(blob) >= 8 * CHANNELS - 16  # lo and scale, 4 bytes each a channel
    (got,) = bound.decode(blob)
    (want,) = get_codec(spec).decode(old)  # the same values, decoded from the carried ranges
    assert torch.equal(got, want)


def test_old_blobs_that_carry_ranges_still_decode_with_any_codec_of_the_spec():
    ranges, x = _ranges(), _frontier()
    old = _old_blob(get_codec("q4c", clip=ranges).encode([x]), "q4c", ranges, 4)
    (plain,) = get_codec("q4c").decode(old)
    (bound,) = get_codec("q4c", clip=ranges).decode(old)
    assert torch.equal(plain, bound)
    lo, hi = ranges.arrays(0, CHANNELS)
    step = (hi - lo) / 15
    inside = np.clip(x.numpy(), lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1))
    assert np.all(np.abs(plain.numpy() - inside) <= step.reshape(1, -1, 1, 1) / 2 + 1e-5)


def test_uncalibrated_blobs_carry_their_own_ranges():
    blob = get_codec("q4c").encode([_frontier()])
    (entry,) = _entries(blob, "q4c")
    assert isinstance(entry[2], bytes) and len(entry[2]) == 4 * CHANNELS


def test_a_named_blob_needs_the_same_ranges_to_decode():
    ranges = _ranges()
    blob = get_codec("q4c+ans" if _ans_available() else "q4c", clip=ranges).encode([_frontier()])
    spec = "q4c+ans" if _ans_available() else "q4c"
    with pytest.raises(CodecError, match=r"decoder_for"):
        get_codec(spec).decode(blob)
    other = ClipRanges.from_arrays([(np.zeros(CHANNELS), np.ones(CHANNELS))], per_channel=True)
    with pytest.raises(CodecError, match="another cut or bundle"):
        get_codec(spec, clip=other).decode(blob)
    (y,) = get_codec(spec, clip=ranges).decode(blob)
    assert y.shape == (1, CHANNELS, 4, 4)


def test_ranges_ids_are_stable_and_tell_ranges_apart():
    a, b = _ranges(), _ranges()
    assert a.id == b.id and len(a.id) == 8
    assert ClipRanges.from_json(a.to_json()).id == a.id
    other = ClipRanges.from_arrays([(np.zeros(CHANNELS), np.ones(CHANNELS))], per_channel=True)
    assert other.id != a.id


def _ans_available() -> bool:
    from splitinfer.compression import _ans

    return _ans.available()
