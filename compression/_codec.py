"""Tensor codecs: a spec string names a pipeline (cast, then an optional entropy stage).

Blob layout (self-describing, little-endian)::

    msgpack array [BLOB_VERSION, spec, [[dtype, shape], ...], raw_nbytes]   the header
    data                                                                     raw_nbytes of tensor
                                                                             bytes, zstd-framed
                                                                             when the spec says so

``dtype``/``shape`` are the tensors as the caller gave them; the bytes stored per tensor are in
the spec's wire dtype (floats cast to f16/bf16; other dtypes travel unchanged). Decoding
validates every field and size before it allocates, and never decompresses past
``raw_nbytes``: a hostile blob costs at most ``max_nbytes``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgpack
import torch
import zstandard

from splitinfer.errors import CodecError, ConfigError
from splitinfer.tensors import MAX_NDIM, dtype_from_name, dtype_name

__all__ = ["DEFAULT_MAX_NBYTES", "Codec", "available_codecs", "get_codec"]

BLOB_VERSION = 1
#: Largest decoded frontier accepted by default (1 GiB); callers pass tighter limits.
DEFAULT_MAX_NBYTES = 1 << 30
_MAX_HEADER = 64 * 1024
_MAX_TENSORS = 1024

_CASTS: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}
_SPEC_RE = re.compile(r"^(?P<base>f32|f16|bf16)(?:\+zstd(?P<level>\d{1,2}))?$")
_VALID_FORMS = "f32 | f16 | bf16, optionally followed by +zstd<level 1..22> (e.g. 'f16+zstd1')"


@runtime_checkable
class Codec(Protocol):
    """Turns a frontier (a list of tensors) into bytes and back."""

    spec: str

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes: ...

    def decode(self, blob: bytes | memoryview, *, max_nbytes: int = ...) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class _TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    wire_dtype: torch.dtype

    @property
    def wire_nbytes(self) -> int:
        return math.prod(self.shape) * self.wire_dtype.itemsize


@dataclass(frozen=True)
class CastCodec:
    """Cast floating tensors to ``cast`` and optionally zstd-compress the bytes."""

    spec: str
    cast: torch.dtype
    zstd_level: int | None

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.cast if dtype.is_floating_point else dtype

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        metas, chunks = [], []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise CodecError(f"codec {self.spec} encodes tensors, got {type(t).__name__}")
            wire = t.detach().to("cpu", self._wire_dtype(t.dtype)).contiguous()
            metas.append([dtype_name(t.dtype), list(t.shape)])
            chunks.append(_as_bytes_view(wire))
        raw_nbytes = sum(c.nbytes for c in chunks)
        header = msgpack.packb([BLOB_VERSION, self.spec, metas, raw_nbytes])
        if self.zstd_level is None:
            return b"".join([header, *chunks])
        out = io.BytesIO()
        out.write(header)
        cctx = zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True, write_checksum=True)
        with cctx.stream_writer(out, size=raw_nbytes, closefd=False) as writer:
            for chunk in chunks:
                writer.write(chunk)
        return out.getvalue()

    def decode(self, blob: bytes | memoryview, *, max_nbytes: int = DEFAULT_MAX_NBYTES) -> list[torch.Tensor]:
        view = memoryview(blob).cast("B")
        spec, raw_metas, raw_nbytes, offset = _read_header(view)
        if spec != self.spec:
            raise CodecError(f"blob was encoded with codec {spec!r}, expected {self.spec!r}")
        metas = [self._check_meta(m) for m in raw_metas]
        expected = sum(m.wire_nbytes for m in metas)
        if raw_nbytes != expected:
            raise CodecError(f"blob header says {raw_nbytes} bytes, its tensors need {expected}")
        if expected > max_nbytes:
            raise CodecError(f"blob would decode to {expected} bytes, above the limit {max_nbytes}")
        data = view[offset:]
        raw = bytearray(expected)
        if self.zstd_level is None:
            if len(data) != expected:
                raise CodecError(f"blob carries {len(data)} data bytes, its header says {expected}")
            raw[:] = data
        else:
            _zstd_into(data, raw)
        tensors, pos = [], 0
        for m in metas:
            n = m.wire_nbytes
            t = _from_bytes(raw, pos, m.wire_dtype, m.shape)
            tensors.append(t if m.wire_dtype == m.dtype else t.to(m.dtype))
            pos += n
        return tensors

    def _check_meta(self, meta: object) -> _TensorMeta:
        if not isinstance(meta, list) or len(meta) != 2:
            raise CodecError(f"tensor entry must be [dtype, shape], got {meta!r:.80}")
        name, shape = meta
        try:
            dtype = dtype_from_name(name)
        except ConfigError as exc:
            raise CodecError(str(exc)) from None
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CodecError(f"tensor shape must be a list of at most {MAX_NDIM} dims >= 0")
        if math.prod(shape) > DEFAULT_MAX_NBYTES * 8:
            raise CodecError(f"tensor shape {shape} is implausibly large")
        return _TensorMeta(dtype, tuple(shape), self._wire_dtype(dtype))


def _read_header(view: memoryview) -> tuple[str, list[object], int, int]:
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=_MAX_HEADER,
        max_str_len=256,
        max_bin_len=0,
        max_array_len=max(_MAX_TENSORS, MAX_NDIM + 4),
        max_map_len=0,
        max_ext_len=0,
    )
    unpacker.feed(view[:_MAX_HEADER])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise CodecError("blob is truncated: its header is incomplete") from None
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise CodecError(f"blob header is not valid msgpack: {exc}") from None
    if not isinstance(header, list) or len(header) != 4:
        raise CodecError("blob header must be [version, spec, tensors, raw_nbytes]")
    version, spec, metas, raw_nbytes = header
    if version != BLOB_VERSION:
        raise CodecError(f"blob version {version!r} is not supported (this side speaks {BLOB_VERSION})")
    if not isinstance(spec, str) or not isinstance(metas, list) or not isinstance(raw_nbytes, int):
        raise CodecError("blob header fields have the wrong types")
    if raw_nbytes < 0 or len(metas) > _MAX_TENSORS:
        raise CodecError("blob header is out of range")
    return spec, metas, raw_nbytes, unpacker.tell()


def _zstd_into(data: memoryview, raw: bytearray) -> None:
    """Decompress ``data`` into ``raw`` exactly; never produce more than ``len(raw)`` bytes.

    The frame must declare its content size (our encoder always writes it) and carry a
    checksum; a frame that declares another size is refused before anything is allocated.
    """
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not a zstd frame: {exc}") from None
    if size != len(raw):
        raise CodecError(f"zstd frame declares {size} bytes, the blob header says {len(raw)}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=len(raw))
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload is corrupt or truncated: {exc}") from None
    if len(out) != len(raw):
        raise CodecError(f"zstd payload decoded to {len(out)} bytes, expected {len(raw)}")
    raw[:] = out


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in (torch.bfloat16, torch.float16, torch.bool):
        t = t.view(torch.int16) if t.dtype != torch.bool else t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def _from_bytes(raw: bytearray, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize:  # a tensor after an odd-sized one: copy rather than misalign
        raw, offset = bytearray(raw[offset : offset + count * dtype.itemsize]), 0
    flat = torch.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape)


def get_codec(spec: str) -> Codec:
    """The codec named by ``spec``; an unknown or malformed spec lists the valid forms."""
    match = _SPEC_RE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise CodecError(f"unknown codec spec {spec!r}; valid forms: {_VALID_FORMS}")
    level = match.group("level")
    if level is not None and not 1 <= int(level) <= 22:
        raise CodecError(f"zstd level must be 1..22, got {level} in {spec!r}")
    return CastCodec(spec, _CASTS[match.group("base")], None if level is None else int(level))


def available_codecs() -> list[str]:
    """Representative specs of every codec family (levels other than these work too)."""
    return ["f32", "f16", "bf16", "f32+zstd1", "f16+zstd1", "bf16+zstd1", "f32+zstd3"]
