"""Floating-point conversions in numpy that give torch's (CPU) bits, for the dtypes on the wire.

numpy has no bfloat16: a bfloat16 array is carried as its bits, a uint16 array (what
:func:`splitinfer.tensors.numpy_dtype` names it). Every conversion goes through float32, as
torch's do (torch casts float64 to float16 or bfloat16 via float32, and so do we):

- float32 -> bfloat16 rounds to nearest even on the upper 16 bits (torch's
  ``round_to_nearest_even``); NaN becomes ``0xFFFF``, the quiet NaN that torch's vectorized CPU
  kernels write for every NaN (its scalar path writes ``0x7FC0``: NaN bits are the one place
  where torch itself is not consistent);
- bfloat16 -> float32 is exact: the bits shifted up by 16;
- float32 -> float16 is numpy's cast (round to nearest even, overflow to ±inf, as torch), with
  NaN quieted as the F16C instruction does (sign and top payload bits kept, quiet bit set);
- float16 -> float32 is exact, a NaN quieted (as the F16C instruction and torch do);
- float64 -> float32 is numpy's cast (NaN and overflow without a warning).

The tests compare these with torch on every float16 and bfloat16 bit pattern and on random
float32 bits.

Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOATS", "bf16_bits", "bf16_values", "from_f32", "to_f32"]

#: The wire names of the floating dtypes.
FLOATS = frozenset({"float32", "float16", "bfloat16", "float64"})

_BF16_NAN = np.uint16(0xFFFF)


def bf16_bits(a32: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16, same shape) of the float32 array ``a32``, rounded as torch."""
    u = a32.reshape(-1).view(np.uint32)  # 1-d: numpy makes scalars of 0-d results
    w = u >> np.uint32(16)
    w &= np.uint32(1)
    w += np.uint32(0x7FFF)
    w += u  # no overflow: the largest non-NaN pattern is 0xFF800000 (-inf)
    w >>= np.uint32(16)
    out = w.astype(np.uint16)
    nan = u.view(np.float32) != u.view(np.float32)
    if nan.any():
        out[nan] = _BF16_NAN
    return out.reshape(a32.shape)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """The float32 values (exact) of the bfloat16 bits ``bits`` (uint16)."""
    return (bits.reshape(-1).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(bits.shape)


def to_f32(a: np.ndarray, name: str) -> np.ndarray:
    """The floating array ``a`` (of wire dtype ``name``; bfloat16 as bits) as float32, exactly
    as torch's ``.to(torch.float32)``; ``a`` itself when it is float32 already."""
    if name == "bfloat16":
        return bf16_values(a)
    if a.dtype == np.float32:
        return a
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float32)
    if a.dtype == np.float16:  # torch (F16C, or its float arithmetic) quiets a signalling NaN
        flat = out.reshape(-1)
        nan = flat != flat
        if nan.any():
            flat.view(np.uint32)[nan] |= np.uint32(0x00400000)
    return out


def from_f32(a32: np.ndarray, name: str) -> np.ndarray:
    """The float32 array ``a32`` cast to the floating wire dtype ``name`` (bfloat16 as bits),
    exactly as torch's ``.to(dtype)``; ``a32`` itself for float32."""
    if name == "float32":
        return a32
    if name == "bfloat16":
        return bf16_bits(a32)
    if name == "float64":
        return a32.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = a32.astype(np.float16)
    flat = out.reshape(-1)
    nan = flat != flat
    if nan.any():  # F16C's NaN: sign, quiet bit and the top 9 payload bits of the float32
        u = a32.reshape(-1).view(np.uint32)[nan]
        sign = (u >> np.uint32(16)) & np.uint32(0x8000)
        payload = (u >> np.uint32(13)) & np.uint32(0x03FF)
        flat.view(np.uint16)[nan] = (sign | np.uint32(0x7E00) | payload).astype(np.uint16)
    return out
