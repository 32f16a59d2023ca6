"""Dense bit packing of quantization codes, vectorized with numpy.

Layout: ``n`` codes of ``bits`` bits each form one LSB-first bit stream; code ``i`` occupies
stream bits ``[bits * i, bits * i + bits)``, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``. The stream takes ``ceil(n * bits / 8)`` bytes; unused high bits of the last byte are
zero. So two 4-bit codes share a byte (the first in the low nibble), eight 3-bit codes fill three
bytes, four 6-bit codes three bytes, and 8-bit codes are stored as they are.

Packing works on groups of ``g = 8 / gcd(bits, 8)`` codes, which always fill whole bytes: the
group is assembled in one little-endian integer (at most 56 bits) by ``g`` vectorized shifts over
all groups at once; there is no Python loop over the codes.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed."""
    return (n * bits + 7) // 8


def _geometry(bits: int) -> tuple[int, int, np.dtype]:
    """Codes per group, bytes per group, and the integer type that holds one group."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    per_group = 8 // math.gcd(bits, 8)
    group_bytes = bits * per_group // 8
    word = np.dtype("<u1") if group_bytes == 1 else np.dtype("<u4") if group_bytes <= 4 else np.dtype("<u8")
    return per_group, group_bytes, word


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a flat uint8 array of codes (each below ``2**bits``) into ``packed_nbytes`` bytes."""
    n = codes.size
    if bits == 8:
        return codes.reshape(-1)
    per_group, group_bytes, word = _geometry(bits)
    groups = -(-n // per_group)
    flat = codes.reshape(-1)
    if groups * per_group != n:
        padded = np.zeros(groups * per_group, np.uint8)
        padded[:n] = flat
        flat = padded
    grouped = flat.reshape(groups, per_group)
    acc = grouped[:, 0].astype(word)
    for k in range(1, per_group):  # over the positions in a group (at most 8), not the codes
        acc |= grouped[:, k].astype(word) << word.type(bits * k)
    out = acc.view(np.uint8).reshape(groups, word.itemsize)[:, :group_bytes]
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def unpack_bits(data: np.ndarray | bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """The ``n`` codes packed in ``data`` (exactly ``packed_nbytes(n, bits)`` bytes), as uint8."""
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if raw.size != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_nbytes(n, bits)} bytes, got {raw.size}")
    if bits == 8:
        return raw
    per_group, group_bytes, word = _geometry(bits)
    groups = -(-n // per_group)
    if raw.size != groups * group_bytes:  # the last group is partial: pad it with zero bits
        padded = np.zeros(groups * group_bytes, np.uint8)
        padded[: raw.size] = raw
        raw = padded
    if group_bytes == word.itemsize:
        wide = raw
    else:  # widen each group to its word (3 bytes to 4, 5 or 7 bytes to 8)
        wide = np.zeros((groups, word.itemsize), np.uint8)
        wide[:, :group_bytes] = raw.reshape(groups, group_bytes)
    acc = wide.view(word).reshape(groups)
    mask = word.type((1 << bits) - 1)
    out = np.empty((groups, per_group), np.uint8)
    for k in range(per_group):
        out[:, k] = (acc >> word.type(bits * k)) & mask
    return out.reshape(-1)[:n]
