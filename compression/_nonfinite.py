"""Non-finite values through lossy codecs: NaN, +inf and -inf come back exactly where they were.

A quantizer cannot represent infinities, and NaN is no value to quantize; yet real frontiers
carry them (a transformer's float padding mask is ``-inf`` at every padded position: decoding
it to a finite value unmasks the padding). So every lossy codec's blob may carry a *patch*:
the positions of the non-finite values of each floating tensor and their float32 values, which
the decoder writes over what the codec decoded there. The codecs themselves never have to get
non-finite values right (ranges ignore them, ``_quant.sanitize``); they only must not let them
spoil the finite values.

Cost: nothing when no value is non-finite but one reduction per floating tensor at encode time
(its dot product with itself, finite only when every value is: 1-3 % of a ``q8+zstd1``
encode, measured on a 96x56x56 frontier) and one byte compared at decode time. A
patched blob's header has a sixth field (``_blob.py``)::

    msgpack array [1, spec, entries, raw_nbytes, dict_id or nil,
                   [patch_nbytes, frame_nbytes, [[index, count, form], ...]]]
    data                          exactly as without the patch
    patch frame                   frame_nbytes bytes: one zstd frame of patch_nbytes bytes

The patch frame holds, for each patched tensor in the order listed, its positions (flat C-order
indices, ascending) and then its ``count`` values (little-endian float32). ``form`` says how the
positions are written: ``0`` uint32 indices, ``1`` uint64 indices, ``2`` a bitmask of
``numel`` bits (LSB first, numpy's ``packbits(bitorder="little")``), whichever is smallest: a
tensor that is mostly non-finite costs one bit a value plus its (well-compressing) values.
A decoder that predates patches refuses a patched blob (its header has six fields), so a
non-finite value is never silently lost between versions.

Decoding validates the patch before writing anything: indices of floating tensors, ascending
and in range, counts that match the positions, values that are all non-finite, sizes that match
the shapes (the frame is decompressed only up to the size the header's shapes imply).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from splitinfer.compression._blob import _compressor, _is_int, check_entry, read_data, unpack_header
from splitinfer.compression._floats import FLOATS, from_f32, to_f32
from splitinfer.errors import CodecError

__all__ = ["Patch", "apply_patches", "attach_patches", "detach_patches", "find_patches"]

_U32, _U64, _MASK = 0, 1, 2
_PATCH_LEVEL = 1
_PATCHED = 0x96  # msgpack fixarray of 6: the first byte of a patched blob


@dataclass(frozen=True)
class Patch:
    """The non-finite values of tensor ``index``: flat ``positions`` (int64, ascending) and
    their float32 ``values``."""

    index: int
    positions: np.ndarray
    values: np.ndarray


def find_patches(arrays: list[tuple[str, np.ndarray]]) -> list[Patch]:
    """The patches of the floating wire arrays ``(name, array)`` holding non-finite values."""
    patches = []
    for i, (name, a) in enumerate(arrays):
        if name not in FLOATS or not a.size:
            continue
        values = to_f32(a, "bfloat16") if a.dtype == np.uint16 else a  # bfloat16 travels as bits
        flat = values.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            # x . x is finite only if every x is (NaN and ±inf propagate; a finite value above
            # 1e19 overflows it, and then the exact check below finds nothing): BLAS makes it
            # the cheapest full pass numpy has, 3x faster than a sum
            check = np.dot(flat, flat) if flat.dtype.kind == "f" and flat.itemsize >= 4 else flat.sum()
            if np.isfinite(check):
                continue
        bad = ~np.isfinite(flat)
        if bad.any():
            positions = np.flatnonzero(bad)
            patches.append(Patch(i, positions, flat[positions].astype(np.float32)))
    return patches


def _form(count: int, numel: int) -> int:
    mask = (numel + 7) // 8
    if numel <= 1 << 32 and 4 * count <= mask:
        return _U32
    return _U64 if 8 * count <= mask else _MASK


def _positions_nbytes(form: int, count: int, numel: int) -> int:
    return 4 * count if form == _U32 else 8 * count if form == _U64 else (numel + 7) // 8


def attach_patches(blob: bytes, patches: list[Patch], numels: list[int]) -> bytes:
    """``blob`` (unpatched) with ``patches`` of its tensors (``numels``: their sizes)."""
    if not patches:
        return blob
    view = memoryview(blob)
    header, offset = unpack_header(view)
    meta, parts = [], []
    for p in patches:
        numel = numels[p.index]
        form = _form(p.positions.size, numel)
        if form == _MASK:
            bits = np.zeros(numel, bool)
            bits[p.positions] = True
            parts.append(np.packbits(bits, bitorder="little").tobytes())
        else:
            parts.append(p.positions.astype("<u4" if form == _U32 else "<u8").tobytes())
        parts.append(p.values.astype("<f4").tobytes())
        meta.append([p.index, int(p.positions.size), form])
    raw = b"".join(parts)
    frame = _compressor(_PATCH_LEVEL).compress(raw)
    fields = [*header[:4], header[4] if len(header) == 5 else None, [len(raw), len(frame), meta]]
    return b"".join([msgpack.packb(fields, use_bin_type=True), view[offset:], frame])


@dataclass(frozen=True)
class _Pending:
    """A patched blob's patch, read from its header, its frame not yet decompressed."""

    meta: list[tuple[int, int, int, int]]  # (index, count, form, numel)
    raw_nbytes: int
    frame: memoryview


def detach_patches(view: memoryview) -> tuple[memoryview | bytes, _Pending | None]:
    """``(the blob without its patch, the patch)``; an unpatched blob as it is, with None."""
    if not view.nbytes or view[0] != _PATCHED:
        return view, None
    header, offset = unpack_header(view)
    if len(header) != 6:
        raise CodecError("a patched blob header has six fields")
    entries, dict_id, patch = header[2], header[4], header[5]
    if not isinstance(entries, list) or not isinstance(patch, list) or len(patch) != 3:
        raise CodecError("the non-finite patch must be [patch_nbytes, frame_nbytes, tensors]")
    raw_nbytes, frame_nbytes, listed = patch
    if not (_is_int(raw_nbytes) and _is_int(frame_nbytes) and isinstance(listed, list)):
        raise CodecError("the non-finite patch fields have the wrong types")
    if not 0 < frame_nbytes <= view.nbytes - offset:
        raise CodecError("the non-finite patch frame is truncated")
    meta, expected, last = [], 0, -1
    for item in listed:
        if not (isinstance(item, list) and len(item) == 3 and all(_is_int(x) for x in item)):
            raise CodecError("a non-finite patch entry is [tensor index, count, form]")
        index, count, form = item
        if not last < index < len(entries):
            raise CodecError("non-finite patch indices must be ascending tensor indices")
        name, shape, _ = check_entry(entries[index])
        numel = int(np.prod(shape, dtype=np.int64))
        if name not in FLOATS or not 0 < count <= numel or form not in (_U32, _U64, _MASK):
            raise CodecError(f"non-finite patch of tensor {index} is out of range")
        meta.append((index, count, form, numel))
        expected += _positions_nbytes(form, count, numel) + 4 * count
        last = index
    if raw_nbytes != expected:
        raise CodecError(f"non-finite patch says {raw_nbytes} bytes, its tensors need {expected}")
    fields = header[:4] if dict_id is None else [*header[:4], dict_id]
    end = view.nbytes - frame_nbytes
    inner = b"".join([msgpack.packb(fields, use_bin_type=True), view[offset:end]])
    return inner, _Pending(meta, raw_nbytes, view[end:])


def apply_patches(decoded: list[tuple[str, str, np.ndarray]], pending: _Pending | None) -> None:
    """Write the non-finite values of ``pending`` into the ``decoded`` arrays, in place (each
    array owns its memory; called after the codec checked the blob's sizes)."""
    if pending is None:
        return
    data = np.frombuffer(read_data(pending.frame, pending.raw_nbytes, True), np.uint8)
    pos = 0
    for index, count, form, numel in pending.meta:
        n = _positions_nbytes(form, count, numel)
        chunk, pos = data[pos : pos + n], pos + n
        if form == _MASK:
            bits = np.unpackbits(chunk, bitorder="little")
            if bits[numel:].any() or int(bits.sum()) != count:
                raise CodecError(f"non-finite patch mask of tensor {index} does not hold {count} values")
            positions = np.flatnonzero(bits[:numel])
        else:
            positions = chunk.view("<u4" if form == _U32 else "<u8").astype(np.int64)
            if (positions.size and (positions[-1] >= numel or positions[0] < 0)) or (
                np.diff(positions) <= 0
            ).any():
                raise CodecError(f"non-finite patch positions of tensor {index} must ascend below {numel}")
        values = data[pos : pos + 4 * count].view("<f4")
        pos += 4 * count
        if np.isfinite(values).any():
            raise CodecError(f"non-finite patch of tensor {index} holds finite values")
        if index >= len(decoded) or decoded[index][2].size != numel:
            raise CodecError(f"non-finite patch of tensor {index} does not match the decoded tensors")
        _, carrier, array = decoded[index]
        np.put(array, positions, values if carrier == "float32" else from_f32(values.copy(), carrier))
