"""Calibrated channel projection: the ``pca<r>q<bits>`` codecs.

At compile time, :func:`fit` takes a cut's calibration frontier (one floating tensor
``N x C x ...``, seen as ``N * R`` vectors of ``C`` channel values, one per position) and computes
their principal components (the eigenvectors of the centred covariance, by decreasing
variance): a :class:`ChannelProjection`, which the bundle stores as a file
(docs/bundle-format.md) and binds to the codec (``get_codec(spec, projection=p)``; what
``Bundle.codec_for`` and ``decoder_for`` do). The edge sends the first ``r`` coefficients
``y = W_r (x - mean)`` quantized; the cloud decodes ``x_hat = mean + W_r^T y_hat`` before the
tail. Each side costs one matrix multiply (``r x C`` by ``C x R`` a sample).

Quantization: one step ``delta`` for every kept component. The projection is orthonormal, so the
squared error of the frontier is the sum of the coefficients' errors, and one step for all is
what minimises it for a given entropy (transform coding's classical result; per-component bit
widths would spend the same bits on a component carrying 1 % of the energy as on one carrying
30 %). ``delta = max_j (hi_j - lo_j) / (levels - 2)`` over the kept components' calibrated
coefficient ranges ``[lo_j, hi_j]``, and component ``j``'s codes start at
``start_j = delta * round(centre_j / delta - (levels - 1) / 2)``, a multiple of ``delta`` (so 0
is a code when it lies in range): every calibrated range fits in the ``levels`` codes, and
values beyond clip. A low-variance component uses a few codes around its centre, which the
``+ans`` stage codes in a fraction of a bit (tables over the codes used only,
``_ans.encode_ranged``); packed codes (no ``+ans``) cost ``bits`` each whatever their spread.

Blob entry of the (single) tensor, ``_blob.py`` framing::

    [dtype, shape, projection_id, start, delta]                   codes packed (``_pack.py``)
    [dtype, shape, projection_id, start, delta, tables, words]    +ans: ``4 * words`` bytes

``projection_id``: the projection's id (8 hex digits of its file's sha256; a decoder bound to
another projection refuses the blob, naming both); ``start``: ``r`` float32, ``delta`` one
float32 (the decoder recomputes nothing from the projection but the matrix); the codes are
``(N, r, R)`` in C order (component-major within a sample for packing; for ``+ans`` one
group a component, each over all samples and positions). ``r`` is ``min(spec's r, the
projection's components)``.

Limits: a frontier of exactly one floating tensor of 2+ dims whose dim 1 has the projection's
channels (a multi-tensor frontier, or integer tensors, are refused with a CodecError saying
so; the fidelity table skips such cuts). NaN and ±inf come back exactly (the adapters' patch);
the encoder replaces them by the channel's mean so that they do not spoil the other channels
of their position.

Projection file (``proj_KKK.bin``, no pickle), little-endian::

    b"SIPROJ1\\0"            magic
    uint32 C, uint32 K       channels, components kept (1 <= K <= C <= MAX_CHANNELS)
    float32 mean[C]          the calibration mean of each channel
    float32 variance[K]      each component's variance (decreasing)
    float32 lo[K], hi[K]     each component's calibrated coefficient range
    float32 W[K][C]          the components, orthonormal rows

Reading checks the magic, the sizes against the length, finiteness, ``lo <= hi`` and row norms
near 1 before anything is used.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitinfer.compression._blob import (
    check_entry,
    check_size,
    f32_field,
    read_data,
    read_header,
    write_blob,
)
from splitinfer.compression._codes import decode_codes, encode_codes, wire_of_codes
from splitinfer.compression._floats import FLOATS
from splitinfer.compression._frontier import Decoded, array_of, f32_floats
from splitinfer.compression._quant import quantize
from splitinfer.errors import CodecError

__all__ = ["MAX_CHANNELS", "ChannelProjection", "ProjectionCore", "fit"]

#: Most channels a projection covers (its matrix: at most 64 MiB).
MAX_CHANNELS = 4096
#: Most channel vectors :func:`fit` reads (evenly spaced positions beyond that).
MAX_VECTORS = 1 << 18
_MAGIC = b"SIPROJ1\0"
_HEAD = len(_MAGIC) + 8
_F32_MAX = float(np.finfo(np.float32).max)
_DECODE_LIMIT = 1e37  # every decoded value stays well inside float32


@dataclass(frozen=True, eq=False)
class ChannelProjection:
    """The principal components of a cut's channel vectors (module docstring): ``mean``
    ``(C,)``, ``variance``, ``lo``, ``hi`` ``(K,)`` and ``components`` ``(K, C)``, all float32."""

    mean: np.ndarray
    variance: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    components: np.ndarray

    def __post_init__(self) -> None:
        c = self.mean.shape[0] if self.mean.ndim == 1 else -1
        k = self.components.shape[0] if self.components.ndim == 2 else -1
        if not (1 <= k <= c <= MAX_CHANNELS) or self.components.shape != (k, c):
            raise CodecError(f"a channel projection is K x C components with 1 <= K <= C <= {MAX_CHANNELS}")
        for name in ("variance", "lo", "hi"):
            if getattr(self, name).shape != (k,):
                raise CodecError(f"a channel projection's {name} has one value a component")
        for name in ("mean", "variance", "lo", "hi", "components"):
            a = getattr(self, name)
            if a.dtype != np.float32 or not np.isfinite(a).all() or np.abs(a).max() > _DECODE_LIMIT:
                raise CodecError(f"a channel projection's {name} must be finite float32")
        if (self.lo > self.hi).any() or (self.variance < 0).any():
            raise CodecError("a channel projection needs lo <= hi and variances >= 0")
        norms = np.linalg.norm(self.components.astype(np.float64), axis=1)
        if (np.abs(norms - 1) > 1e-3).any():
            raise CodecError("a channel projection's components must be unit vectors")

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def count(self) -> int:
        """Components kept (``K``)."""
        return int(self.components.shape[0])

    def energy(self, r: int) -> float:
        """The share of the calibration frontier's variance that the first ``r`` components carry."""
        total = float(self.variance.astype(np.float64).sum())
        return 1.0 if total <= 0 else float(self.variance[:r].astype(np.float64).sum()) / total

    @functools.cached_property
    def data(self) -> bytes:
        """The projection file's bytes (module docstring)."""
        parts = [self.mean, self.variance, self.lo, self.hi, self.components]
        head = _MAGIC + np.array([self.channels, self.count], "<u4").tobytes()
        return head + b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in parts)

    @functools.cached_property
    def id(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:8]

    @classmethod
    def from_bytes(cls, data: bytes) -> ChannelProjection:
        """The projection a file holds; CodecError for anything malformed."""
        if not isinstance(data, bytes) or len(data) < _HEAD or not data.startswith(_MAGIC):
            raise CodecError("not a splitinfer channel projection file")
        c, k = (int(v) for v in np.frombuffer(data, "<u4", 2, len(_MAGIC)))
        if not 1 <= k <= c <= MAX_CHANNELS or len(data) != _HEAD + 4 * (c + 3 * k + k * c):
            raise CodecError("a channel projection file's sizes do not match its length")
        values = np.frombuffer(data, "<f4", offset=_HEAD).astype(np.float32)
        cuts = np.cumsum([c, k, k, k])
        mean, variance, lo, hi, w = np.split(values, cuts)
        return cls(mean, variance, lo, hi, w.reshape(k, c))

    def grid(self, r: int, levels: int) -> tuple[np.ndarray, np.float32]:
        """float32 ``(start (r,), delta)`` of the first ``r`` components at ``levels`` codes."""
        return _grid(self, r, levels)


@functools.lru_cache(maxsize=64)
def _grid_cached(key: tuple[str, int, int], lo: bytes, hi: bytes) -> tuple[np.ndarray, np.float32]:
    _, _, levels = key
    low, high = (
        np.frombuffer(lo, np.float32).astype(np.float64),
        np.frombuffer(hi, np.float32).astype(np.float64),
    )
    span = float((high - low).max())
    delta = np.float32(span / (levels - 2)) if span > 0 else np.float32(1.0)
    d = float(delta)
    start = (d * np.round((low + high) / 2 / d - (levels - 1) / 2)).astype(np.float32)
    start.setflags(write=False)
    return start, delta


def _grid(p: ChannelProjection, r: int, levels: int) -> tuple[np.ndarray, np.float32]:
    return _grid_cached((p.id, r, levels), p.lo[:r].tobytes(), p.hi[:r].tobytes())


#: Most multiply-adds of one matrix product: OpenBLAS runs larger ones on several threads, and on
#: a loaded 2-core machine a threaded 80 x 80 by 80 x 196 product took some 15 ms instead of 0.03
#: (waking the other thread), so :func:`_matmul` splits the positions into products below it.
_SERIAL_MACS = 1 << 19


def _matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w @ x`` (float32 ``(M, K)`` by ``(N, K, R)``) as products of at most _SERIAL_MACS."""
    m, k = w.shape
    n, _, rest = x.shape
    step = max(1, _SERIAL_MACS // max(1, m * k))
    if step >= rest:
        return np.matmul(w, x)
    out = np.empty((n, m, rest), np.result_type(w, x))
    for i in range(n):
        for s in range(0, rest, step):
            np.matmul(w, x[i, :, s : s + step], out=out[i, :, s : s + step])
    return out


def _vectors(t: Any, index: int) -> np.ndarray:
    wire = array_of(t, f32_floats)
    if wire is None or wire[0] not in FLOATS or wire[1].ndim < 2:
        raise CodecError(
            f"a channel projection is fitted on floating tensors N x C x ...; sample {index} is not one"
        )
    a = wire[1]
    return (
        a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:])).transpose(0, 2, 1).reshape(-1, a.shape[1])
    )


def fit(samples: Sequence[Any], max_vectors: int = MAX_VECTORS) -> ChannelProjection:
    """The projection of calibration tensors ``samples`` (torch tensors or numpy arrays
    ``N x C x ...``, the same ``C``; batches of one cut's single-tensor frontier): the
    principal components of their channel vectors, positions with a non-finite value left
    out, at most ``max_vectors`` of them (evenly spaced). ``K`` is ``C``, or fewer when there
    are fewer vectors than channels (a 2-D ``N x C`` tensor gives ``N`` vectors)."""
    blocks = [_vectors(t, i) for i, t in enumerate(samples)]
    if not blocks or len({b.shape[1] for b in blocks}) != 1:
        raise CodecError("a channel projection needs samples with the same number of channels")
    x = np.concatenate(blocks)
    channels = x.shape[1]
    if channels > MAX_CHANNELS:
        raise CodecError(f"a channel projection covers at most {MAX_CHANNELS} channels, got {channels}")
    x = x[np.isfinite(x).all(axis=1)]
    if x.shape[0] > max_vectors:
        x = x[np.linspace(0, x.shape[0] - 1, max_vectors).astype(np.int64)]
    if x.shape[0] < 2:
        raise CodecError("a channel projection needs at least two finite channel vectors to fit")
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    centred = x64 - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    variance, vectors = np.linalg.eigh(cov)
    order = np.argsort(variance)[::-1][: min(channels, x.shape[0] - 1)]
    components = vectors[:, order].T.astype(np.float32)
    components /= np.linalg.norm(components, axis=1, keepdims=True)
    coeffs = (x.astype(np.float32) - mean.astype(np.float32)) @ components.T
    return ChannelProjection(
        mean.astype(np.float32),
        np.maximum(variance[order], 0.0).astype(np.float32),
        coeffs.min(axis=0).astype(np.float32),
        coeffs.max(axis=0).astype(np.float32),
        components,
    )


@dataclass(frozen=True)
class ProjectionCore:
    """The numpy core of ``pca<rank>q<bits>[+zstd<level>|+ans]`` bound to ``projection``
    (module docstring); ``_codec.ProjectionCodec`` adds the adapters."""

    spec: str
    rank: int
    bits: int
    zstd_level: int | None
    ans: bool
    projection: ChannelProjection | None = None

    def _bound(self) -> ChannelProjection:
        if self.projection is None:
            raise CodecError(
                f"codec {self.spec} needs the channel projection calibrated for its cut: take it "
                "from the bundle (Bundle.codec_for / decoder_for), or get_codec(spec, projection=...)"
            )
        return self.projection

    def _r(self, p: ChannelProjection) -> int:
        return min(self.rank, p.count)

    def _encode(self, arrays: list[tuple[str, np.ndarray]]) -> bytes:
        p = self._bound()
        if len(arrays) != 1 or arrays[0][0] not in FLOATS or arrays[0][1].ndim < 2:
            kinds = ", ".join(f"{n} {tuple(a.shape)}" for n, a in arrays)
            raise CodecError(
                f"codec {self.spec} encodes a frontier of one floating tensor N x C x ...; this one "
                f"has {kinds or 'none'} (use a q<bits>[c] codec at this cut)"
            )
        name, a = arrays[0]
        if a.shape[1] != p.channels:
            raise CodecError(
                f"codec {self.spec}'s projection has {p.channels} channels, the tensor {tuple(a.shape)}"
            )
        r, levels = self._r(p), 1 << self.bits
        start, delta = p.grid(r, levels)
        a3 = a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))
        mean = p.mean.reshape(1, -1, 1)
        with np.errstate(over="ignore", invalid="ignore"):  # checked right here
            if a.size and not math.isfinite(float(a3.sum(dtype=np.float64))):
                a3 = np.where(np.isfinite(a3), a3, mean)  # the adapters' patch restores them
            coeffs = _matmul(p.components[:r], a3 - mean)  # (N, r, R)
            if coeffs.size and not math.isfinite(float(coeffs.sum(dtype=np.float64))):
                coeffs = np.nan_to_num(coeffs, nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
        codes = quantize(coeffs, start, np.full(r, delta, np.float32), levels)
        fields, chunks = encode_codes(codes, self.bits, self.ans, self.spec)
        entry = [name, list(a.shape), p.id, start.astype("<f4").tobytes(), delta.tobytes(), *fields]
        return write_blob(self.spec, [entry], chunks, self.zstd_level)

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        p = self._bound()
        entries, raw_nbytes, offset, _ = read_header(view, self.spec)
        if len(entries) != 1:
            raise CodecError(f"a {self.spec} blob holds one tensor")
        name, shape, fields = check_entry(entries[0])
        if name not in FLOATS or len(shape) < 2 or len(fields) != (5 if self.ans else 3):
            raise CodecError(
                "a pca tensor entry is [float dtype, [N, C, ...], projection id, start, delta"
                + (", tables, words]" if self.ans else "]")
            )
        if fields[0] != p.id:
            raise CodecError(
                f"blob was encoded with channel projection {fields[0]!r:.20}, this decoder has {p.id}: "
                "edge and cloud must load the same bundle (its projections are part of it)"
            )
        if shape[1] != p.channels:
            raise CodecError(f"the projection has {p.channels} channels, the blob's tensor {shape}")
        r, levels = self._r(p), 1 << self.bits
        start = f32_field(fields[1], r, "start")
        (delta,) = f32_field(fields[2], 1, "delta")
        top = float(np.abs(start.astype(np.float64)).max()) + (levels - 1) * float(delta)
        if not delta >= 0 or r * top + float(np.abs(p.mean).max()) > _DECODE_LIMIT:
            raise CodecError("delta must be >= 0 and every decoded value a finite float32")
        n, rest = shape[0], math.prod(shape[2:])
        wire, tables = wire_of_codes(fields[3:], (n, r, rest), self.bits, self.ans)
        # the limit is the decoded frontier's (what a server allows a request, its frontier's
        # bytes): the coefficients' float32 copy must fit it too, on its own
        check_size(wire, raw_nbytes, max(4 * math.prod(shape), 4 * n * r * rest), max_nbytes)
        data = read_data(view[offset:], wire, self.zstd_level is not None)
        if math.prod(shape) == 0:
            return [(name, "float32", np.empty(shape, np.float32))]
        codes3 = decode_codes(data, tables, (n, r, rest), self.bits, self.spec)
        coeffs = np.multiply(codes3, delta, dtype=np.float32)
        coeffs += start.reshape(1, -1, 1)
        out = _matmul(p.components[:r].T, coeffs)  # (N, C, R)
        out += p.mean.reshape(1, -1, 1)
        return [(name, "float32", np.ascontiguousarray(out).reshape(shape))]
