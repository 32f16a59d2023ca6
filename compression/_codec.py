"""The codecs: cast, quantize and JPEG, each optionally followed by zstd (``_spec.py``).

Every blob is framed by ``_blob.py``: ``msgpack [1, spec, entries, raw_nbytes]`` then the data
(one zstd frame when the spec ends in ``+zstd<level>``). Per codec, a tensor's header entry and
its wire bytes in the data are:

=========== ================================================ ==========================================
codec       entry                                            wire bytes
=========== ================================================ ==========================================
cast        ``[dtype, shape]``                               floats cast to f32/f16/bf16, other dtypes
                                                             as they are (little-endian)
q<b>[c]     ``[dtype, shape, lo, scale]`` for floats         ``ceil(numel * b / 8)`` bytes: the codes
            (``lo``/``scale``: bin, little-endian float32,   as one LSB-first bit stream (``_pack.py``)
            one per channel of dim 1 for ``c`` codecs on
            tensors of 3+ dims, else one); bound to
            calibrated ranges: ``[dtype, shape, ranges_id]``
            (below);
            ``[dtype, shape]`` for other dtypes              the tensor's bytes, unchanged
q<b>[c]+ans ``[dtype, shape, lo, scale, weights, words]``    ``4 * words`` bytes: the codes' rANS
            for floats (``weights``: bin, the symbol         stream (``_ans.py``); other dtypes as
            statistics; ``words``: int, the stream's         for ``q<b>[c]``
            uint32 count; both empty for an empty tensor)
pca<r>q<b>  ``[dtype, shape, proj_id, start, delta]``         the ``(N, r, R)`` coefficient codes,
            (``+ans``: ``tables, words`` too)                packed or rANS-coded (``_projection.py``)
bn<l>q<b>   ``[dtype, shape, bottleneck_id, code_shape,      the trained encoder's ``(N, l, h, w)``
            bits]`` (``+ans``: ``tables, words`` too)        codes, packed or rANS-coded
                                                             (``_bottleneck.py``)
jpeg<q>     ``[dtype, shape, lo, scale, sizes]``: shape      ``N`` JPEG files (``sizes`` bytes each)
            ``(N, 3, H, W)``, ``lo``/``scale`` 3 float32s,
            ``sizes`` bin of ``N`` uint32 (none if empty)
=========== ================================================ ==========================================

``dtype``/``shape`` are the tensor as the caller gave it, and decoding returns that dtype and
shape. A value decodes as ``lo + code * scale`` (``_quant.py``). A quantizing codec bound to
calibrated clip ranges (a bundle's, ``Manifest.codec_for``) writes ``ranges_id`` (a str of 8 hex
digits, :attr:`ClipRanges.id`) in place of ``lo, scale``: both ends have the ranges in the
bundle, and shipping them cost about 10 kB a request for a frontier of 1280 channels (issue 28).
Such a blob decodes only with a codec bound to the same ranges (``Manifest.decoder_for``);
uncalibrated blobs, and blobs from before, carry ``lo, scale`` and decode with any codec of the
spec. Decoding validates every field (types, lengths against the shape,
finiteness, sizes against ``max_nbytes``) before it allocates. The quantized and JPEG codecs'
blobs also carry the positions and values of non-finite inputs, which decoding writes back
(``_nonfinite.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from splitinfer.compression import _ans
from splitinfer.compression._blob import (
    DEFAULT_MAX_NBYTES,
    as_view,
    check_entry,
    check_size,
    f32_field,
    read_data,
    read_header,
    tensor_bytes,
    tensor_from_bytes,
    u32_field,
    write_blob,
)
from splitinfer.compression._bottleneck import BottleneckCore, TrainedBottleneck
from splitinfer.compression._calibrate import ClipRanges
from splitinfer.compression._dictionary import ZstdDictionary
from splitinfer.compression._floats import FLOATS
from splitinfer.compression._frontier import Decoded, arrays_of, f32_floats, numpy_arrays, torch_tensors
from splitinfer.compression._jpeg import MAX_SIDE, decode_images, encode_images
from splitinfer.compression._nonfinite import apply_patches, attach_patches, detach_patches, find_patches
from splitinfer.compression._pack import pack_bits, packed_nbytes, unpack_bits
from splitinfer.compression._projection import ChannelProjection, ProjectionCore
from splitinfer.compression._quant import affine, channel_view, dequantize, has_channels, quantize, sanitize
from splitinfer.compression._spec import parse_spec
from splitinfer.errors import CodecError
from splitinfer.tensors import DTYPES

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_NBYTES",
    "BottleneckCodec",
    "CastCodec",
    "Codec",
    "JpegCodec",
    "ProjectionCodec",
    "QuantCodec",
    "available_codecs",
    "get_codec",
    "payload_of",
]

_F32_MAX = float(np.finfo(np.float32).max)
_JPEG_SLACK = 4096  # JPEG headers: a tiny image's file can be larger than its pixels

#: What ``encode`` takes: torch tensors or numpy arrays (mixed, even).
Frontier = Sequence[Any]
Wire = list[tuple[str, np.ndarray]]


@runtime_checkable
class Codec(Protocol):
    """Turns a frontier (a list of tensors) into bytes and back.

    ``encode`` takes torch tensors or numpy arrays; the blob is the same either way (the core
    works on numpy). ``decode`` returns torch tensors (it imports torch); ``decode_numpy``
    returns numpy arrays and never imports torch: each has the dtype and shape that was
    encoded, except bfloat16 (numpy has none), which decodes to float32 arrays holding exactly
    the bfloat16 values ``decode`` gives.
    """

    @property
    def spec(self) -> str: ...

    def encode(self, tensors: Frontier) -> bytes: ...

    def decode(self, blob: bytes | memoryview, *, max_nbytes: int = ...) -> list[torch.Tensor]: ...

    def decode_numpy(self, blob: bytes | memoryview, *, max_nbytes: int = ...) -> list[np.ndarray]: ...


class _Adapters:
    """``encode``, ``decode`` and ``decode_numpy`` of a codec, on its numpy core ``_encode`` /
    ``_decode`` (``_frontier.py`` holds the adapters).

    The contract of a codec built on it: ``_encode`` takes wire arrays (``_wire_name``) and
    returns a blob written by ``_blob.write_blob``; ``_decode`` checks every field and size of
    such a blob before it allocates and returns :data:`Decoded` triples whose arrays own their
    memory. A lossy codec (``lossless_nonfinite = False``, the default) gets non-finite values
    right for free: the adapters record them before ``_encode`` and write them back after
    ``_decode`` (``_nonfinite.py``), so its ``_encode`` only must not let them spoil the finite
    values (measure ranges with ``_quant.sanitize``, which ignores them).
    """

    #: Whether the codec itself returns NaN and ±inf exactly (a cast does; a quantizer does not).
    lossless_nonfinite: ClassVar[bool] = False

    if TYPE_CHECKING:

        @property
        def spec(self) -> str: ...

    def _wire_name(self, name: str) -> str:
        """The wire dtype in which ``_encode`` wants a tensor of dtype ``name``."""
        return f32_floats(name)

    # The two hooks every concrete codec implements (CastCodec, QuantCodec, JpegCodec, ...).
    def _encode(self, arrays: Wire) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} must implement _encode")

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        raise NotImplementedError(f"{type(self).__name__} must implement _decode")

    def encode(self, tensors: Frontier) -> bytes:
        """The blob of ``tensors`` (torch tensors or numpy arrays)."""
        arrays = arrays_of(tensors, self.spec, self._wire_name)
        blob = self._encode(arrays)
        if self.lossless_nonfinite:
            return blob
        patches = find_patches(arrays)
        return attach_patches(blob, patches, [a.size for _, a in arrays]) if patches else blob

    def _decode_all(self, blob: bytes | memoryview, max_nbytes: int) -> list[Decoded]:
        view, pending = detach_patches(as_view(blob))
        decoded = self._decode(as_view(view), max_nbytes)
        apply_patches(decoded, pending)
        return decoded

    def decode(self, blob: bytes | memoryview, *, max_nbytes: int = DEFAULT_MAX_NBYTES) -> list[torch.Tensor]:
        """The torch tensors of ``blob`` (imports torch); CodecError for any bad blob."""
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise CodecError(
                f"{type(self).__name__}.decode returns torch tensors, and torch is not installed here: "
                "decode_numpy(blob) is the torch-free call (numpy arrays)"
            ) from exc
        return torch_tensors(self._decode_all(blob, max_nbytes))

    def decode_numpy(
        self, blob: bytes | memoryview, *, max_nbytes: int = DEFAULT_MAX_NBYTES
    ) -> list[np.ndarray]:
        """The numpy arrays of ``blob`` (bfloat16 tensors as float32); CodecError for any bad blob."""
        return numpy_arrays(self._decode_all(blob, max_nbytes))


def _out_nbytes(name: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[name]


@dataclass(frozen=True)
class CastCodec(_Adapters):
    """Cast floating tensors to ``cast`` (a wire dtype name) and optionally zstd the bytes."""

    spec: str
    cast: str
    zstd_level: int | None
    dictionary: ZstdDictionary | None = None

    lossless_nonfinite = True  # float16 and bfloat16 have NaN and ±inf too

    def _wire_name(self, name: str) -> str:
        return self.cast if name in FLOATS else name

    def _encode(self, arrays: Wire) -> bytes:
        entries: list[list[object]] = []
        chunks: list[memoryview | bytes | np.ndarray] = []
        for name, a in arrays:  # a: already in the wire dtype
            entries.append([name, list(a.shape)])
            chunks.append(tensor_bytes(a))
        return write_blob(self.spec, entries, chunks, self.zstd_level, self.dictionary)

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        entries, raw_nbytes, offset, dictionary = read_header(view, self.spec, self.dictionary)
        plan = []
        for entry in entries:
            name, shape, fields = check_entry(entry)
            if fields:
                raise CodecError(f"a {self.spec} tensor entry is [dtype, shape]")
            plan.append((name, shape, _out_nbytes(self._wire_name(name), shape)))
        wire = sum(p[2] for p in plan)
        check_size(wire, raw_nbytes, sum(_out_nbytes(d, s) for d, s, _ in plan), max_nbytes)
        data = read_data(view[offset:], wire, self.zstd_level is not None, dictionary)
        decoded, pos = [], 0
        for name, shape, n in plan:
            carrier = self._wire_name(name)
            decoded.append((name, carrier, tensor_from_bytes(data[pos : pos + n], carrier, shape)))
            pos += n
        return decoded


@dataclass(frozen=True)
class QuantCodec(_Adapters):
    """Quantize floating tensors to ``bits`` bits (per tensor or per channel), pack, maybe zstd.

    Ranges are each tensor's (or channel's) finite min/max, or ``clip`` when given. With
    ``ans`` the codes are rANS-coded (``_ans.py``) instead of packed.
    """

    spec: str
    bits: int
    per_channel: bool
    zstd_level: int | None
    clip: ClipRanges | None = None
    dictionary: ZstdDictionary | None = None
    ans: bool = False

    def _encode(self, arrays: Wire) -> bytes:
        _check_clip_count(self.clip, arrays)
        levels = 1 << self.bits
        entries: list[list[object]] = []
        chunks: list[memoryview | bytes | np.ndarray] = []
        for i, (name, a) in enumerate(arrays):
            if name not in FLOATS:
                entries.append([name, list(a.shape)])
                chunks.append(tensor_bytes(a))
                continue
            a3 = channel_view(a, self.per_channel)  # float32 (_wire_name)
            clean, lo, hi, finite = sanitize(a3)
            if self.clip is not None:
                lo, hi = self.clip.arrays(i, a3.shape[1], merge=not has_channels(a.ndim))
            lo32, scale, limited = affine(lo, hi, levels)
            codes = quantize(clean, lo32, scale, levels, inside=finite and self.clip is None and not limited)
            entry: list[object] = [name, list(a.shape)]
            if self.clip is not None:  # both ends hold the calibrated ranges: name them
                entry.append(self.clip.id)
            else:
                entry += [lo32.astype("<f4").tobytes(), scale.astype("<f4").tobytes()]
            if not self.ans:
                chunks.append(pack_bits(codes.reshape(-1), self.bits))
            elif a.size == 0:
                entry += [b"", 0]
            else:
                weights, words = _ans.encode_codes(codes, levels, self.spec)
                entry += [weights, int(words.size)]
                chunks.append(words)
            entries.append(entry)
        return write_blob(self.spec, entries, chunks, self.zstd_level, self.dictionary)

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        entries, raw_nbytes, offset, dictionary = read_header(view, self.spec, self.dictionary)
        levels = 1 << self.bits
        plan: list[tuple[str, tuple[int, ...], np.ndarray | None, np.ndarray | None, int]] = []
        tables: list[np.ndarray | None] = []
        for index, entry in enumerate(entries):
            name, shape, fields = check_entry(entry)
            numel = math.prod(shape)
            if name not in FLOATS:
                if fields:
                    raise CodecError(f"a {name} tensor entry is [dtype, shape]")
                plan.append((name, shape, None, None, _out_nbytes(name, shape)))
                tables.append(None)
                continue
            if fields and isinstance(fields[0], str):  # names calibrated ranges
                channels, lo, scale = _quant_named_ranges(self, index, fields[0], shape)
                fields = [b"", b"", *fields[1:]]  # where lo and scale would be
            elif len(fields) == (4 if self.ans else 2):
                channels = _channels(fields[0], shape, self.per_channel)
                lo = f32_field(fields[0], channels, "lo")
                scale = f32_field(fields[1], channels, "scale")
            else:
                fields = []
            if len(fields) != (4 if self.ans else 2):
                raise CodecError(
                    "a floating tensor entry is [dtype, shape, lo, scale"
                    + (", weights, words]" if self.ans else "]")
                    + " or [dtype, shape, ranges_id"
                    + (", weights, words]" if self.ans else "]")
                )
            top = np.abs(lo.astype(np.float64)) + (levels - 1) * scale.astype(np.float64)
            if (scale < 0).any() or (top > _F32_MAX).any():
                raise CodecError("scale must be >= 0 and every decoded value a finite float32")
            if not self.ans:
                plan.append((name, shape, lo, scale, packed_nbytes(numel, self.bits)))
                tables.append(None)
                continue
            words = fields[3]
            if not isinstance(words, int) or isinstance(words, bool) or words < 0:
                raise CodecError("ans words must be a count >= 0")
            if numel == 0:
                if fields[2] != b"" or words:
                    raise CodecError("an empty tensor has no ans weights and no words")
                tables.append(None)
            else:
                tables.append(_ans.check_weights(fields[2], channels, levels))
            plan.append((name, shape, lo, scale, 4 * words))
        wire = sum(p[4] for p in plan)
        check_size(wire, raw_nbytes, sum(_out_nbytes(p[0], p[1]) for p in plan), max_nbytes)
        data = read_data(view[offset:], wire, self.zstd_level is not None, dictionary)
        decoded: list[Decoded] = []
        pos = 0
        for (name, shape, lows, scales, n), table in zip(plan, tables):
            chunk = data[pos : pos + n]
            pos += n
            if lows is None or scales is None:
                decoded.append((name, name, tensor_from_bytes(chunk, name, shape)))
            elif math.prod(shape) == 0:
                decoded.append((name, "float32", np.empty(shape, np.float32)))
            else:
                if table is not None:
                    codes3 = _codes3_shape(shape, lows.size)
                    codes = _ans.decode_codes(table, chunk, codes3, self.spec)
                else:
                    codes = unpack_bits(chunk, self.bits, math.prod(shape))
                values = dequantize(_codes3(codes, shape, lows.size), lows, scales)
                decoded.append((name, "float32", values.reshape(shape)))
        return decoded


def _quant_named_ranges(
    codec: QuantCodec, index: int, ranges_id: str, shape: tuple[int, ...]
) -> tuple[int, np.ndarray, np.ndarray]:
    """Channels, ``lo`` and ``scale`` (float32) of tensor ``index`` of a blob that names its
    calibrated ranges ``ranges_id``, from the ranges ``codec`` is bound to (as it encoded)."""
    if codec.clip is None:
        raise CodecError(
            f"the blob names calibrated clip ranges {ranges_id!r} that only its bundle holds: decode it "
            "with the bundle's codec (Manifest.decoder_for(cut, spec))"
        )
    if codec.clip.id != ranges_id:
        raise CodecError(
            f"the blob was quantized with clip ranges {ranges_id!r}, this codec is bound to "
            f"{codec.clip.id!r} (another cut or bundle version)"
        )
    if index >= len(codec.clip.tensors) or codec.clip.tensors[index] is None:
        raise CodecError(f"the clip ranges {ranges_id!r} hold no range for tensor {index}")
    channels = shape[1] if codec.per_channel and has_channels(len(shape)) else 1
    lo, hi = codec.clip.arrays(index, channels, merge=not has_channels(len(shape)))
    lo32, scale, _ = affine(lo, hi, 1 << codec.bits)
    return channels, lo32.astype(np.float32), scale.astype(np.float32)


def _channels(lo: object, shape: tuple[int, ...], per_channel: bool) -> int:
    """The number of ranges a tensor entry of ``shape`` carries: ``shape[1]`` for a per-channel
    codec on 3+ dims (``_quant.has_channels``), else 1; a 2-D tensor may carry ``shape[1]``
    too (older encoders gave pooled features one range a channel)."""
    if not per_channel or len(shape) < 2:
        return 1
    if has_channels(len(shape)):
        return shape[1]
    return shape[1] if isinstance(lo, bytes) and len(lo) == 4 * shape[1] else 1


def _codes3_shape(shape: tuple[int, ...], channels: int) -> tuple[int, int, int]:
    """The ``(N, C, R)`` view of a tensor of ``shape`` for ``channels`` ranges."""
    if channels == 1:
        return (1, 1, math.prod(shape))
    return (shape[0], shape[1], math.prod(shape[2:]))


def _codes3(codes: np.ndarray, shape: tuple[int, ...], channels: int) -> np.ndarray:
    """The codes of a tensor of ``shape`` as ``(N, C, R)`` for ``channels`` ranges."""
    return codes.reshape(_codes3_shape(shape, channels))


def _check_clip_count(clip: ClipRanges | None, arrays: Wire) -> None:
    if clip is not None and len(clip.tensors) != len(arrays):
        raise CodecError(
            f"the clip ranges are for {len(clip.tensors)} tensors, the frontier has {len(arrays)}"
        )


@dataclass(frozen=True)
class JpegCodec(_Adapters):
    """JPEG-compress float image batches ``N x 3 x H x W``: each colour channel's range is
    ``clip``'s, or else its min/max over the batch (normalised images are not in ``[0, 1]``)."""

    spec: str
    quality: int
    zstd_level: int | None
    clip: ClipRanges | None = None
    dictionary: ZstdDictionary | None = None

    def _encode(self, arrays: Wire) -> bytes:
        _check_clip_count(self.clip, arrays)
        entries: list[list[object]] = []
        chunks: list[memoryview | bytes | np.ndarray] = []
        for i, (name, a) in enumerate(arrays):
            if name not in FLOATS or a.ndim != 4 or a.shape[1] != 3:
                raise CodecError(
                    f"codec {self.spec} encodes float image batches N x 3 x H x W; tensor {i} is "
                    f"{name} {tuple(a.shape)}"
                )
            height, width = a.shape[2], a.shape[3]
            if height > MAX_SIDE or width > MAX_SIDE:
                raise CodecError(
                    f"JPEG images are at most {MAX_SIDE} pixels a side, tensor {i} is {height}x{width}"
                )
            clean, lo, hi, _ = sanitize(channel_view(a, True))  # float32 (_wire_name)
            if self.clip is not None:
                lo, hi = self.clip.arrays(i, 3)
            lo32, scale, _ = affine(lo, hi, 256)
            files = []
            if a.size:
                files = encode_images(quantize(clean, lo32, scale, 256).reshape(a.shape), self.quality)
            entries.append(
                [
                    name,
                    list(a.shape),
                    lo32.astype("<f4").tobytes(),
                    scale.astype("<f4").tobytes(),
                    np.array([len(f) for f in files], "<u4").tobytes(),
                ]
            )
            chunks.extend(files)
        return write_blob(self.spec, entries, chunks, self.zstd_level, self.dictionary)

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        entries, raw_nbytes, offset, dictionary = read_header(view, self.spec, self.dictionary)
        plan = []
        for entry in entries:
            name, shape, fields = check_entry(entry)
            if name not in FLOATS or len(shape) != 4 or shape[1] != 3 or len(fields) != 3:
                raise CodecError("a jpeg tensor entry is [float dtype, [N, 3, H, W], lo, scale, sizes]")
            if shape[2] > MAX_SIDE or shape[3] > MAX_SIDE:
                raise CodecError(f"JPEG images are at most {MAX_SIDE} pixels a side")
            lo, scale = f32_field(fields[0], 3, "lo"), f32_field(fields[1], 3, "scale")
            if (scale < 0).any() or (
                np.abs(lo.astype(np.float64)) + 255 * scale.astype(np.float64) > _F32_MAX
            ).any():
                raise CodecError("scale must be >= 0 and every decoded value a finite float32")
            sizes = u32_field(fields[2], shape[0] if math.prod(shape) else 0, "sizes")
            plan.append((name, shape, lo, scale, sizes))
        wire = sum(int(p[4].sum()) for p in plan)
        out_nbytes = sum(_out_nbytes(p[0], p[1]) for p in plan)
        n_files = sum(p[4].size for p in plan)
        check_size(wire, raw_nbytes, out_nbytes, max_nbytes, slack=_JPEG_SLACK * n_files)
        data = read_data(view[offset:], wire, self.zstd_level is not None, dictionary)
        decoded: list[Decoded] = []
        pos = 0
        for name, shape, lo, scale, sizes in plan:
            if not sizes.size:
                decoded.append((name, "float32", np.empty(shape, np.float32)))
                continue
            ends = pos + np.cumsum(sizes)
            files = [
                memoryview(data)[start:end] for start, end in zip([pos, *ends[:-1].tolist()], ends.tolist())
            ]
            pos = int(ends[-1])
            codes = decode_images(files, shape[2], shape[3])
            values = dequantize(codes.reshape(shape[0], 3, -1), lo, scale)
            decoded.append((name, "float32", values.reshape(shape)))
        return decoded


@dataclass(frozen=True)
class ProjectionCodec(ProjectionCore, _Adapters):
    """A calibrated channel projection, its coefficients quantized on one step, packed, zstd-ed
    or rANS-coded (``_projection.py``); encoding and decoding need its cut's ``projection``."""


@dataclass(frozen=True)
class BottleneckCodec(BottleneckCore, _Adapters):
    """A trained bottleneck: its encoder's integer codes packed, zstd-ed or rANS-coded, and its
    decoder on the other side (``_bottleneck.py``); both need its cut's ``bottleneck``."""


def get_codec(
    spec: str,
    *,
    clip: ClipRanges | None = None,
    dictionary: ZstdDictionary | None = None,
    projection: ChannelProjection | None = None,
    bottleneck: TrainedBottleneck | None = None,
) -> Codec:
    """The codec named by ``spec``; an unknown or malformed spec lists the valid forms.

    ``clip`` binds a quantized or JPEG codec to calibrated ranges (see :func:`calibrate`); a
    quantized codec's blobs then name the ranges instead of carrying them, and decode only with
    a codec bound to the same ranges (JPEG blobs carry theirs: ``get_codec(spec)`` decodes them).
    ``dictionary`` binds a ``+zstd`` codec to a zstd dictionary (``_dictionary.py``): its blobs
    name the dictionary, and only a codec bound to the same one decodes them.
    ``projection`` binds a ``pca<r>q<bits>`` codec to its cut's calibrated channel projection
    (``_projection.fit``); both encoding and decoding need it, and a decoder bound to another
    projection refuses the blob.
    ``bottleneck`` binds a ``bn<latent>q<bits>`` codec to the encoder and decoder trained for its
    cut (a bundle's: ``Bundle.codec_for``); a decoder bound to another bottleneck refuses the blob.
    """
    parsed = parse_spec(spec)
    if bottleneck is not None and not isinstance(bottleneck, TrainedBottleneck):
        raise CodecError(f"bottleneck must be a TrainedBottleneck, got {type(bottleneck).__name__}")
    if parsed.kind == "bn":
        if clip is not None or dictionary is not None or projection is not None:
            raise CodecError(
                f"codec {spec!r} is bound to its trained bottleneck only: no clip ranges, dictionary "
                "or projection"
            )
        if parsed.ans:
            _ans.require(parsed.text)
        return BottleneckCodec(
            parsed.text, parsed.latent, parsed.bits, parsed.zstd_level, parsed.ans, bottleneck
        )
    if bottleneck is not None:
        raise CodecError(
            f"codec {spec!r} is not a trained bottleneck: only bn<latent>q<bits> codecs take one"
        )
    if projection is not None and not isinstance(projection, ChannelProjection):
        raise CodecError(f"projection must be a ChannelProjection, got {type(projection).__name__}")
    if parsed.kind == "pca":
        if clip is not None or dictionary is not None:
            raise CodecError(
                f"codec {spec!r} takes its ranges from its channel projection: no clip ranges or dictionary"
            )
        if parsed.ans:
            _ans.require(parsed.text)
        return ProjectionCodec(
            parsed.text, parsed.rank, parsed.bits, parsed.zstd_level, parsed.ans, projection
        )
    if projection is not None:
        raise CodecError(f"codec {spec!r} does not project: only pca<r>q<bits> codecs take a projection")
    if clip is not None and not isinstance(clip, ClipRanges):
        raise CodecError(f"clip must be ClipRanges, got {type(clip).__name__}")
    if dictionary is not None:
        if not isinstance(dictionary, ZstdDictionary):
            raise CodecError(f"dictionary must be a ZstdDictionary, got {type(dictionary).__name__}")
        if parsed.zstd_level is None:
            raise CodecError(f"codec {spec!r} has no zstd stage: only +zstd<level> codecs take a dictionary")
    if parsed.kind == "cast":
        if clip is not None:
            raise CodecError(
                f"codec {spec!r} does not quantize: only q<bits>[c] and jpeg codecs take clip ranges"
            )
        return CastCodec(parsed.text, parsed.cast or "float32", parsed.zstd_level, dictionary)
    if clip is not None and clip.per_channel and not parsed.per_channel:
        raise CodecError(
            f"per-channel clip ranges need a per-channel codec ({parsed.text.split('+')[0]}c), not {spec!r}"
        )
    if parsed.kind == "quant":
        if parsed.ans:
            _ans.require(parsed.text)
        return QuantCodec(
            parsed.text, parsed.bits, parsed.per_channel, parsed.zstd_level, clip, dictionary, parsed.ans
        )
    return JpegCodec(parsed.text, parsed.quality, parsed.zstd_level, clip, dictionary)


def available_codecs() -> list[str]:
    """Representative specs of every codec family (other bit widths and levels work too).

    The ``jpeg`` specs encode only float image batches ``N x 3 x H x W``; the ``+ans`` specs are
    listed when the constriction package (the ``entropy`` extra) is installed. The
    ``pca<r>q<bits>`` and ``bn<latent>q<bits>`` codecs are not listed: they work only bound to a
    cut's projection or trained bottleneck.
    """
    ans = ["q8c+ans", "q6c+ans", "q5c+ans", "q4c+ans", "q4+ans", "q3c+ans"] if _ans.available() else []
    return [
        "f32",
        "f16",
        "bf16",
        "f32+zstd1",
        "f16+zstd1",
        "bf16+zstd1",
        "f32+zstd3",
        "q8",
        "q8c",
        "q8+zstd1",
        "q8c+zstd1",
        "q6c+zstd1",
        "q4+zstd1",
        "q4c+zstd1",
        "q4c+zstd3",
        "q3c+zstd1",
        "q2c+zstd1",
        *ans,
        "jpeg90",
        "jpeg75",
    ]


def payload_of(codec: Codec, tensors: Frontier) -> bytes:
    """The bytes ``codec`` hands to zstd for ``tensors`` (its blob data before compression):
    what a zstd dictionary for it is trained on (``_dictionary.train``)."""
    spec = codec.spec.split("+", 1)[0]
    raw = get_codec(spec, clip=getattr(codec, "clip", None))
    view = as_view(detach_patches(as_view(raw.encode(tensors)))[0])
    _, _, offset, _ = read_header(view, spec)
    return bytes(view[offset:])
