"""Uniform affine quantization kernels (numpy, vectorized, float32 arithmetic).

A tensor is viewed as ``(N, C, R)``: ``C`` channels along dim 1 for per-channel codecs on
tensors of 3+ dims (:func:`has_channels`), or one channel holding everything (``(1, 1, numel)``)
otherwise. Channel ``c`` has a range
``[lo_c, hi_c]`` and ``levels = 2**bits`` codes::

    scale_c = (hi_c - lo_c) / (levels - 1)          stored as float32, with lo_c as float32
    code    = floor((clip(x, lo_c, hi_c) - lo_c) / scale_c + 1/2)      in 0 .. levels - 1
    x_hat   = lo_c + code * scale_c

so every value inside its range decodes within half a step (``scale_c / 2``, plus float32
rounding) of itself, and values outside decode to the nearer end. A channel whose range is
empty (``lo == hi``) or narrower than float32 can step (scale below the smallest normal float32)
has ``scale = 0`` and decodes to ``lo``.

Non-finite values (which the codecs' patch restores exactly, ``_nonfinite.py``; these kernels
only keep them from spoiling the finite values): ``+inf`` and ``-inf`` clip to ``hi`` and
``lo``; NaN is treated as 0, so it decodes to the representable value nearest 0: exactly 0
when ``lo == 0`` (a ReLU's range), within half a step of 0 when ``lo < 0 < hi``, the nearer end
when 0 is outside. Ranges measured at encode time (min/max) ignore non-finite values; a channel
without finite values gets the range ``[0, 0]``. Range ends are limited to ``±RANGE_LIMIT``
(1e38) so that ``hi - lo`` and every decoded value stay finite float32; finite inputs beyond that
clip like infinities.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RANGE_LIMIT", "affine", "channel_view", "dequantize", "has_channels", "quantize", "sanitize"]

RANGE_LIMIT = 1e38
_TINY = float(np.finfo(np.float32).tiny)
# Below this |lo| / scale, x * inv + (1/2 - lo * inv) in float32 is exact to 2**-12 steps.
_FUSED_LIMIT = 4096.0


def has_channels(ndim: int) -> bool:
    """Whether a per-channel codec gives a tensor of ``ndim`` dims one range per channel (dim 1).

    Only tensors with positions after the channels (``N x C x ...``, 3+ dims) do. A 2-D
    ``N x C`` tensor (pooled features, logits, embeddings) has one value a channel a sample:
    ranges per channel would cost 8 header bytes a value at batch 1, twice its float32, and,
    calibrated on a few dozen samples, clip every held-out value beyond them (held-out photos got
    66 % top-1 agreement on EfficientNet-Lite0's pooled features with any bit width). It gets one
    range, as with a per-tensor codec.
    """
    return ndim >= 3


def channel_view(a: np.ndarray, per_channel: bool) -> np.ndarray:
    """``a`` (C-contiguous) as ``(N, C, R)``: channels along dim 1 when ``per_channel`` and
    :func:`has_channels`, else a single channel."""
    if per_channel and has_channels(a.ndim):
        return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))
    return a.reshape(1, 1, a.size)


def sanitize(a3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``a3`` made finite; the min and max of its finite values per channel (float64 ``(C,)``);
    and whether ``a3`` was finite already.

    NaN becomes 0 and infinities ``±RANGE_LIMIT``, in a copy made only when ``a3`` has
    non-finite values; a channel without finite values gets the range ``[0, 0]``. The check is
    the min/max reduction itself, the fastest pass numpy has.
    """
    channels = a3.shape[1]
    if a3.size == 0:
        return a3, np.zeros(channels), np.zeros(channels), True
    if channels == 1:  # whole-array reductions and Python floats are the cheapest
        mn, mx = float(a3.min()), float(a3.max())
        if math.isfinite(mn) and math.isfinite(mx):
            return a3, np.array([mn]), np.array([mx]), True
    else:
        lo, hi = a3.min(axis=(0, 2)).astype(np.float64), a3.max(axis=(0, 2)).astype(np.float64)
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            return a3, lo, hi, True
    bad = ~np.isfinite(a3)
    lo = np.where(bad, np.inf, a3).min(axis=(0, 2)).astype(np.float64)
    hi = np.where(bad, -np.inf, a3).max(axis=(0, 2)).astype(np.float64)
    empty = lo > hi
    lo[empty] = 0.0
    hi[empty] = 0.0
    return np.nan_to_num(a3, nan=0.0, posinf=RANGE_LIMIT, neginf=-RANGE_LIMIT), lo, hi, False


def affine(lo: np.ndarray, hi: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """float32 ``(lo, scale)`` per channel for the ranges ``[lo, hi]`` (float64, ``lo <= hi``),
    and whether a range end had to be limited to ``±RANGE_LIMIT``."""
    if lo.size == 1:  # one range: Python floats are cheaper than tiny arrays
        lo_f, hi_f = float(lo[0]), float(hi[0])
        limited = not (-RANGE_LIMIT <= lo_f <= RANGE_LIMIT and -RANGE_LIMIT <= hi_f <= RANGE_LIMIT)
        lo_f = min(max(lo_f, -RANGE_LIMIT), RANGE_LIMIT)
        lo32 = np.array([lo_f], np.float32)
        hi_f = min(max(hi_f, float(lo32[0])), RANGE_LIMIT)
        scale = np.array([(hi_f - float(lo32[0])) / (levels - 1)], np.float32)
        if not scale[0] >= _TINY:
            scale[0] = 0.0
        return lo32, scale, limited
    limited = bool((np.abs(lo) > RANGE_LIMIT).any() or (np.abs(hi) > RANGE_LIMIT).any())
    lo = np.clip(np.asarray(lo, np.float64), -RANGE_LIMIT, RANGE_LIMIT)
    lo32 = lo.astype(np.float32)
    hi = np.clip(np.asarray(hi, np.float64), lo32.astype(np.float64), RANGE_LIMIT)
    scale = ((hi - lo32.astype(np.float64)) / (levels - 1)).astype(np.float32)
    scale[~(scale >= _TINY)] = 0.0
    return lo32, scale, limited


def quantize(
    a3: np.ndarray, lo: np.ndarray, scale: np.ndarray, levels: int, *, inside: bool = False
) -> np.ndarray:
    """uint8 codes ``(N, C, R)`` of the finite float32 ``a3`` for the float32 ``(lo, scale)``.

    ``inside`` promises that every value lies in its channel's range (ranges measured on
    ``a3`` itself), which saves the clipping pass.
    """
    inv: float | np.ndarray
    if a3.shape[1] == 1:  # one range: numpy scalars are cheaper than broadcasting
        lo, scale = lo[0], scale[0]
        inv = 1.0 / float(scale) if scale > 0 else 0.0
        fused = abs(float(lo)) * inv <= _FUSED_LIMIT
    else:
        inv_c = np.zeros(scale.shape, np.float64)
        np.divide(1.0, scale, out=inv_c, where=scale > 0)
        lo, scale, inv = lo.reshape(1, -1, 1), scale.reshape(1, -1, 1), inv_c.reshape(1, -1, 1)
        fused = bool((np.abs(lo) * inv <= _FUSED_LIMIT).all())
    if fused:
        with np.errstate(over="ignore"):  # values far outside the range overflow to ±inf, then clip
            w = np.multiply(a3, np.asarray(inv, np.float32))
            w += np.asarray(0.5 - lo * inv, np.float32)
        if not inside:
            np.clip(w, np.float32(0.0), np.float32(levels - 0.5), out=w)
    else:  # a range far from 0: clip, then subtract first (exact near lo)
        hi = (lo + scale.astype(np.float64) * (levels - 1)).astype(np.float32)
        w = np.clip(a3, lo, hi)
        w -= lo
        w *= np.asarray(inv, np.float32)
        w += np.float32(0.5)
    return w.astype(np.uint8)


def dequantize(codes3: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values ``lo + code * scale`` of the codes ``(N, C, R)``."""
    if codes3.shape[1] == 1:
        lo, scale = lo[0], scale[0]
    else:
        lo, scale = lo.reshape(1, -1, 1), scale.reshape(1, -1, 1)
    out = np.multiply(codes3, scale, dtype=np.float32)
    out += lo
    return out
