"""Calibrated clipping ranges: :class:`ClipRanges` and :func:`calibrate`.

A quantized (or JPEG) codec measures each tensor's min/max at encode time unless it is bound to
:class:`ClipRanges` (``get_codec(spec, clip=ranges)``), calibrated once per cut from sample
frontiers. The ranges only steer the encoder: the scale and offset that a blob was encoded with
travel in its header, so decoding never needs them.

JSON form (what a bundle stores per cut in ``manifest.json``)::

    {"format": "splitinfer-clip-ranges", "version": 1, "method": "mse", "per_channel": true,
     "tensors": [{"lo": [-1.5, 0.0, ...], "hi": [2.25, 6.0, ...]},   one entry per frontier tensor;
                 null]                                                null: not quantized (int, bool)

``lo``/``hi`` hold one float per channel (dim 1) for per-channel ranges, or a single float; a
tensor with fewer than three dims always has a single range (``_quant.has_channels``; ranges
calibrated per channel for a 2-D tensor by older bundles are merged into one when encoding).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitinfer.compression._floats import FLOATS
from splitinfer.compression._frontier import array_of, f32_floats
from splitinfer.compression._quant import RANGE_LIMIT, channel_view, sanitize
from splitinfer.compression._spec import parse_spec
from splitinfer.errors import CodecError

__all__ = ["CALIBRATION_METHODS", "ClipRanges", "calibrate", "calibrate_all"]

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
_FORMAT = "splitinfer-clip-ranges"
_VERSION = 1
_MAX_CHANNELS = 1 << 20
_BINS = 2048
_CANDIDATES = 32

Range = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class ClipRanges:
    """Clipping ranges for the tensors of one frontier, by position.

    ``tensors[i]`` is ``(lo, hi)``, two equally long tuples of finite floats with ``lo <= hi``
    (one per channel, none for a tensor without channels, or a single pair), or ``None`` for a
    tensor that is not quantized.
    ``per_channel`` says whether ranges are per channel (for ``q<bits>c`` and ``jpeg`` codecs).
    """

    tensors: tuple[Range | None, ...]
    per_channel: bool
    method: str = "manual"

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, tuple) or not isinstance(self.per_channel, bool):
            raise CodecError("ClipRanges needs a tuple of (lo, hi) ranges and a bool per_channel")
        if not isinstance(self.method, str) or len(self.method) > 64:
            raise CodecError("ClipRanges.method must be a short string")
        for i, rng in enumerate(self.tensors):
            if rng is None:
                continue
            if not (isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(x, tuple) for x in rng)):
                raise CodecError(f"range {i} must be a (lo, hi) pair of float tuples")
            lo, hi = rng
            if (
                len(lo) != len(hi)
                or len(lo) > (_MAX_CHANNELS if self.per_channel else 1)
                or not (lo or self.per_channel)
            ):
                raise CodecError(f"range {i} has {len(lo)} lows and {len(hi)} highs")
            if not all(_finite_float(x) for x in lo + hi) or any(a > b for a, b in zip(lo, hi)):
                raise CodecError(f"range {i} must hold finite floats with lo <= hi")

    @classmethod
    def from_arrays(
        cls, ranges: Sequence[tuple[object, object] | None], *, per_channel: bool, method: str = "manual"
    ) -> ClipRanges:
        """Ranges from ``(lo, hi)`` pairs of floats, lists or arrays (``None`` to skip a tensor)."""
        tensors: list[Range | None] = []
        for rng in ranges:
            if rng is None:
                tensors.append(None)
                continue
            lo, hi = (tuple(float(x) for x in np.atleast_1d(np.asarray(v, np.float64))) for v in rng)
            tensors.append((lo, hi))
        return cls(tuple(tensors), per_channel, method)

    def to_json(self) -> dict[str, object]:
        """A JSON-serializable dict (``json.dumps`` works on it); see the module docstring."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "per_channel": self.per_channel,
            "tensors": [None if r is None else {"lo": list(r[0]), "hi": list(r[1])} for r in self.tensors],
        }

    @classmethod
    def from_json(cls, obj: object) -> ClipRanges:
        """The ranges ``to_json`` produced; CodecError for anything malformed."""
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or obj.get("version") != _VERSION:
            raise CodecError(f"clip ranges must be a {_FORMAT} version {_VERSION} map")
        tensors = obj.get("tensors")
        if not isinstance(tensors, list):
            raise CodecError("clip ranges need a 'tensors' list")
        out: list[Range | None] = []
        for entry in tensors:
            if entry is None:
                out.append(None)
                continue
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("lo", "hi")):
                raise CodecError("each clip range is null or a map with 'lo' and 'hi' lists")
            out.append((tuple(entry["lo"]), tuple(entry["hi"])))
        return cls(tuple(out), obj.get("per_channel"), obj.get("method", "manual"))  # type: ignore[arg-type]

    @property
    def id(self) -> str:
        """8 hex digits naming these ranges (a digest of their values and per-channel flag): a
        blob quantized with them names them instead of carrying them (``_codec.py``)."""
        cached = self.__dict__.get("_id")
        if cached is None:
            doc = json.dumps([self.per_channel, [None if r is None else list(r) for r in self.tensors]])
            cached = hashlib.sha256(doc.encode()).hexdigest()[:8]
            object.__setattr__(self, "_id", cached)
        return str(cached)

    def arrays(self, index: int, channels: int, *, merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(lo, hi)`` of tensor ``index``, broadcast to ``channels`` channels; with
        ``merge``, per-channel ranges of a tensor that gets one range (a 2-D tensor, calibrated
        per channel by an older bundle) become their union."""
        if index >= len(self.tensors) or self.tensors[index] is None:
            raise CodecError(f"the clip ranges hold no range for tensor {index}")
        lo, hi = (np.asarray(v, np.float64) for v in self.tensors[index])  # type: ignore[union-attr]
        if merge and channels == 1 and lo.size > 1:
            lo, hi = lo.min(keepdims=True), hi.max(keepdims=True)
        if lo.size not in (1, channels):
            raise CodecError(f"tensor {index} has {channels} channels, its clip range {lo.size}")
        return np.broadcast_to(lo, (channels,)), np.broadcast_to(hi, (channels,))


def _finite_float(x: object) -> bool:
    if not isinstance(x, float | int) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond the float range
        return False


def calibrate(
    samples: Iterable[Sequence[Any]],
    spec: str,
    method: str = "minmax",
    *,
    percentile: float = 99.99,
) -> ClipRanges:
    """Clip ranges for ``spec`` (a quantized or JPEG codec) from sample frontiers.

    ``samples`` is an iterable of frontiers (lists of torch tensors or numpy arrays, the same
    count and channels each; it is read once and kept in memory). Floating tensors get ranges,
    per channel (dim 1) when the spec is per channel; other tensors get ``None``. Non-finite
    values are ignored.

    - ``"minmax"``: the smallest and largest value seen;
    - ``"percentile"``: the ``100 - percentile`` and ``percentile`` percentiles (exact, over
      all sample values);
    - ``"mse"``: the range that minimises the expected squared quantization error for the
      spec's bit width, searched on a 2048-bin histogram over a 32 x 32 grid of candidate
      (lo, hi) pairs at once: values outside a candidate cost their exact clipping error (bin
      centres), values inside cost ``step**2 / 12`` (uniform rounding noise), except values
      exactly at ``lo`` when ``lo`` is kept, which cost nothing. Data whose minimum is 0 (ReLU
      outputs) keeps 0 as its low end, so that its zeros stay exact.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "cast":
        raise CodecError(
            f"codec {spec!r} does not quantize: only q<bits>[c] and jpeg codecs take clip ranges"
        )
    if method not in CALIBRATION_METHODS:
        raise CodecError(
            f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}"
        )
    if not (isinstance(percentile, float | int) and 50 < percentile <= 100):
        raise CodecError(f"percentile must be in (50, 100], got {percentile!r}")
    frontiers = [list(f) for f in samples]
    if not frontiers:
        raise CodecError("calibration needs at least one sample frontier")
    count = len(frontiers[0])
    if any(len(f) != count for f in frontiers):
        raise CodecError("sample frontiers differ in their number of tensors")
    ranges: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i in range(count):
        wires = [_wire(f[i], i) for f in frontiers]
        floating = {name in FLOATS for name, _ in wires}
        if floating == {False}:
            ranges.append(None)
            continue
        if len(floating) > 1:
            raise CodecError(f"sample tensor {i} is floating in some samples and not in others")
        views = [channel_view(a, parsed.per_channel) for _, a in wires]
        if len({v.shape[1] for v in views}) > 1:
            raise CodecError(f"sample tensor {i} differs in its channel count between samples")
        if method == "minmax":
            ranges.append(_minmax(views))
        elif method == "percentile":
            ranges.append(_percentile(views, float(percentile)))
        else:
            ranges.append(_mse(views, parsed.levels))
    return ClipRanges.from_arrays(ranges, per_channel=parsed.per_channel, method=method)


def calibrate_all(
    frontier: Sequence[Any],
    specs: Sequence[str],
    methods: Sequence[str] = CALIBRATION_METHODS,
    *,
    percentile: float = 99.99,
    max_values: int = 1 << 22,
) -> dict[tuple[str, str], ClipRanges]:
    """``calibrate`` for several quantizing specs and methods at once, sharing the work.

    ``frontier`` holds batched torch tensors or numpy arrays (samples along dim 0, as a cut's
    frontier over many inputs); the result maps ``(spec, method)`` to what
    ``calibrate(samples, spec, method)`` gives for the samples of that batch. Min/max,
    percentiles and the MSE histogram depend only on the granularity (per tensor or per
    channel), not on the bit width, so they are computed once per granularity. Percentiles and
    histograms use at most ``max_values`` values per tensor (whole samples, evenly spaced
    through the batch); min/max always uses all.
    """
    parsed = {spec: parse_spec(spec) for spec in specs}
    for spec, p in parsed.items():
        if p.kind == "cast":
            raise CodecError(
                f"codec {spec!r} does not quantize: only q<bits>[c] and jpeg codecs take clip ranges"
            )
    for method in methods:
        if method not in CALIBRATION_METHODS:
            raise CodecError(
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}"
            )
    out: dict[tuple[str, str], ClipRanges] = {}
    for per_channel in sorted({p.per_channel for p in parsed.values()}):
        ranges: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray] | None]] = {}
        mine = [s for s, p in parsed.items() if p.per_channel == per_channel]
        for i, t in enumerate(frontier):
            name, a = _wire(t, i)
            if name not in FLOATS:
                for spec in mine:
                    for method in methods:
                        ranges.setdefault((spec, method), []).append(None)
                continue
            view = channel_view(a, per_channel)
            rows = view.shape[0]
            step = max(1, math.ceil(view.size / max_values)) if rows > 1 else 1
            sub = view[::step]
            cache: dict[object, tuple[np.ndarray, np.ndarray]] = {}
            hist: _Histogram | None = None
            for spec in mine:
                for method in methods:
                    if method == "minmax":
                        key: object = "minmax"
                        if key not in cache:
                            cache[key] = _minmax([view])
                    elif method == "percentile":
                        key = "percentile"
                        if key not in cache:
                            cache[key] = _percentile([sub], float(percentile))
                    else:
                        key = ("mse", parsed[spec].levels)
                        if key not in cache:
                            hist = hist or _Histogram.of([sub])
                            cache[key] = _mse_ranges(hist, parsed[spec].levels)
                    ranges.setdefault((spec, method), []).append(cache[key])
        for (spec, method), rs in ranges.items():
            out[(spec, method)] = ClipRanges.from_arrays(rs, per_channel=per_channel, method=method)
    return out


def _wire(t: object, index: int) -> tuple[str, np.ndarray]:
    wire = array_of(t, f32_floats)  # floating tensors as float32
    if wire is None:
        raise CodecError(f"sample tensor {index} is not a tensor or numpy array")
    return wire


def _minmax(views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lows, highs, has_values = [], [], []
    for v in views:
        _, lo, hi, _ = sanitize(v)
        lows.append(lo)
        highs.append(hi)
        has_values.append(np.isfinite(v).any(axis=(0, 2)) if v.size else np.zeros(v.shape[1], bool))
    lo_all, hi_all, seen = np.array(lows), np.array(highs), np.array(has_values)
    lo = np.where(seen, lo_all, np.inf).min(axis=0)
    hi = np.where(seen, hi_all, -np.inf).max(axis=0)
    return _finish(lo, hi)


def _finish(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Channels without finite values get ``[0, 0]``; ends are limited to ``±RANGE_LIMIT``."""
    empty = ~(lo <= hi)
    lo, hi = np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    return np.clip(lo, -RANGE_LIMIT, RANGE_LIMIT), np.clip(hi, -RANGE_LIMIT, RANGE_LIMIT)


def _by_channel(views: list[np.ndarray]) -> np.ndarray:
    """All sample values as ``(C, M)`` float32, non-finite values as NaN."""
    channels = views[0].shape[1]
    values = np.concatenate([v.transpose(1, 0, 2).reshape(channels, -1) for v in views], axis=1)
    values[~np.isfinite(values)] = np.nan
    return values


def _percentile(views: list[np.ndarray], pct: float) -> tuple[np.ndarray, np.ndarray]:
    values = _by_channel(views)
    if values.shape[1] == 0:
        return _finish(np.zeros(values.shape[0]), np.zeros(values.shape[0]))
    lo, hi = np.full(values.shape[0], np.nan), np.full(values.shape[0], np.nan)
    seen = ~np.isnan(values).all(axis=1)
    if seen.any():
        q = np.nanpercentile(values[seen].astype(np.float64), [100.0 - pct, pct], axis=1)
        lo[seen], hi[seen] = q[0], q[1]
    return _finish(lo, hi)


def _mse(views: list[np.ndarray], levels: int) -> tuple[np.ndarray, np.ndarray]:
    return _mse_ranges(_Histogram.of(views), levels)


@dataclass(frozen=True)
class _Histogram:
    """Per-channel histograms of sample values on ``_BINS`` bins spanning each channel's min/max,
    as prefix sums; independent of the bit width, so one serves every ``levels``."""

    lo: np.ndarray
    hi: np.ndarray
    width: np.ndarray
    at_lo: np.ndarray
    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray

    @classmethod
    def of(cls, views: list[np.ndarray]) -> _Histogram:
        lo, hi = _minmax(views)
        channels = lo.size
        width = (hi - lo) / _BINS
        inv_width = np.divide(1.0, width, out=np.zeros_like(width), where=width > 0)
        flat_counts = np.zeros(channels * _BINS, np.float64)
        at_lo = np.zeros(channels)
        offsets = (np.arange(channels) * _BINS).reshape(1, -1, 1)
        lo3, inv3 = lo.reshape(1, -1, 1), inv_width.reshape(1, -1, 1)
        for v in views:  # one histogram per channel, all channels in one bincount
            finite = np.isfinite(v)
            everywhere = bool(finite.all())
            x = v.astype(np.float64) if everywhere else np.where(finite, v, lo3)
            x -= lo3
            x *= inv3
            idx = x.astype(np.int64)
            np.clip(idx, 0, _BINS - 1, out=idx)
            idx += offsets
            flat_counts += np.bincount(
                idx.reshape(-1) if everywhere else idx[finite], minlength=channels * _BINS
            )
            at_lo += ((v == lo3.astype(np.float32)) & finite).sum(axis=(0, 2))
        counts = flat_counts.reshape(channels, _BINS)
        centres = lo[:, None] + (np.arange(_BINS) + 0.5) * width[:, None]
        # prefix sums of n, n*v, n*v^2 over the bins: entry k sums bins 0..k-1
        zeros = np.zeros((channels, 1))
        n = np.concatenate([zeros, np.cumsum(counts, axis=1)], axis=1)
        s1 = np.concatenate([zeros, np.cumsum(counts * centres, axis=1)], axis=1)
        s2 = np.concatenate([zeros, np.cumsum(counts * centres**2, axis=1)], axis=1)
        return cls(lo, hi, width, at_lo, n, s1, s2)


def _mse_ranges(h: _Histogram, levels: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi, width, n, s1, s2 = h.lo, h.hi, h.width, h.n, h.s1, h.s2
    channels = lo.size
    # candidate ends on bin edges: a = edge ka (clips bins < ka), b = edge kb (clips bins >= kb)
    steps = np.unique(np.concatenate([[0], np.round(np.geomspace(1, 0.95 * _BINS, _CANDIDATES - 1))])).astype(
        int
    )
    ka, kb = steps[:, None], _BINS - steps[None, :]
    ka, kb = np.broadcast_arrays(ka, kb)
    valid = ka < kb
    ka, kb = ka[valid], kb[valid]  # (K,)
    a = lo[:, None] + ka[None, :] * width[:, None]  # (C, K)
    b = lo[:, None] + kb[None, :] * width[:, None]
    total = n[:, -1:]
    n_lo, s1_lo, s2_lo = n[:, ka], s1[:, ka], s2[:, ka]
    n_hi, s1_hi, s2_hi = total - n[:, kb], s1[:, -1:] - s1[:, kb], s2[:, -1:] - s2[:, kb]
    clip_err = (a**2 * n_lo - 2 * a * s1_lo + s2_lo) + (s2_hi - 2 * b * s1_hi + b**2 * n_hi)
    inside = total - n_lo - n_hi - np.where(ka[None, :] == 0, h.at_lo[:, None], 0.0)
    step = (b - a) / (levels - 1)
    err = np.maximum(clip_err, 0.0) + np.maximum(inside, 0.0) * step**2 / 12
    err[(lo == 0)[:, None] & (ka[None, :] > 0)] = np.inf  # non-negative data keeps 0 exact
    best = np.argmin(err, axis=1)
    rows = np.arange(channels)
    new_lo, new_hi = a[rows, best], b[rows, best]
    constant = ~(width > 0)
    return _finish(np.where(constant, lo, new_lo), np.where(constant, hi, new_hi))
