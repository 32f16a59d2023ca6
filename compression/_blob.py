"""The blob frame every codec shares: a msgpack header, then the data (zstd-framed or raw).

Layout (self-describing, little-endian)::

    msgpack array [BLOB_VERSION, spec, entries, raw_nbytes       the header
                   (, dict_id)]                                   dict_id: only when compressed
                                                                  with a zstd dictionary
    data                                                          raw_nbytes bytes; one zstd frame
                                                                  (content size and checksum
                                                                  included) when the spec ends
                                                                  in +zstd<level>

A blob of a lossy codec whose tensors hold NaN or ±inf has a sixth header field and its patch
after the data (``_nonfinite.py``); ``read_header`` reads the blob without them.

``entries`` holds one msgpack array per tensor, ``[dtype, shape, *codec fields]``; the data is
the tensors' wire bytes, concatenated in order. What the codec fields and wire bytes are is
documented by each codec (``_codec.py``). ``dict_id`` (8 hex digits, ``_dictionary.py``) names
the zstd dictionary the data was compressed with; a decoder not bound to that dictionary refuses
the blob before decompressing.

Reading validates the header's types and sizes before anything is allocated: the header is
at most ``MAX_HEADER`` bytes, decompression never produces more than ``raw_nbytes`` bytes, and
every msgpack, zstd or numpy error becomes a :class:`~splitinfer.errors.CodecError`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import zstandard

from splitinfer.compression._dictionary import ZstdDictionary
from splitinfer.errors import CodecError, ConfigError
from splitinfer.tensors import MAX_NDIM, check_dtype_name, dtype_name, numpy_dtype

__all__ = [
    "BLOB_VERSION",
    "DEFAULT_MAX_NBYTES",
    "as_view",
    "check_entry",
    "check_size",
    "f32_field",
    "read_data",
    "read_header",
    "tensor_bytes",
    "tensor_from_bytes",
    "u32_field",
    "unpack_header",
    "wire_dtype_name",
    "write_blob",
]

BLOB_VERSION = 1
#: Largest decoded frontier accepted by default (1 GiB); callers pass tighter limits.
DEFAULT_MAX_NBYTES = 1 << 30
MAX_HEADER = 1 << 20
_FIRST_READ = 1 << 16
MAX_TENSORS = 1024
_MAX_NUMEL = DEFAULT_MAX_NBYTES * 8

_local = threading.local()


def _compressor(level: int, dictionary: ZstdDictionary | None = None) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (contexts are reused, never shared by threads)."""
    cache = _local.__dict__.setdefault("compressors", {})
    key = (level, None if dictionary is None else dictionary.id)
    cctx = cache.get(key)
    if cctx is None:
        if len(cache) > 64:  # dictionaries of many bundles: keep the cache bounded
            cache.clear()
        cctx = cache[key] = zstandard.ZstdCompressor(
            level=level,
            write_content_size=True,
            write_checksum=True,
            write_dict_id=False,  # the blob header names the dictionary
            dict_data=None if dictionary is None else dictionary.compiled(level),
        )
    return cctx


def _decompressor(dictionary: ZstdDictionary | None = None) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("decompressors", {})
    key = None if dictionary is None else dictionary.id
    dctx = cache.get(key)
    if dctx is None:
        if len(cache) > 64:
            cache.clear()
        dctx = cache[key] = zstandard.ZstdDecompressor(
            dict_data=None if dictionary is None else zstandard.ZstdCompressionDict(dictionary.data)
        )
    return dctx


def write_blob(
    spec: str,
    entries: list[list[object]],
    chunks: Sequence[memoryview | bytes | np.ndarray],
    zstd_level: int | None,
    dictionary: ZstdDictionary | None = None,
) -> bytes:
    """The blob for ``entries`` whose wire bytes are ``chunks`` (buffers), zstd-framed if asked
    (with ``dictionary`` when given: the header then names it)."""
    views = [(c.data if isinstance(c, np.ndarray) else memoryview(c)).cast("B") for c in chunks]
    raw_nbytes = sum(v.nbytes for v in views)
    fields: list[object] = [BLOB_VERSION, spec, entries, raw_nbytes]
    if zstd_level is not None and dictionary is not None:
        fields.append(dictionary.id)
    header = msgpack.packb(fields, use_bin_type=True)
    if zstd_level is None:
        return b"".join([header, *views])
    data = views[0] if len(views) == 1 else b"".join(views)
    return header + _compressor(zstd_level, dictionary if len(fields) == 5 else None).compress(data)


def as_view(blob: object) -> memoryview:
    """``blob`` (bytes, bytearray, memoryview, ...) as a flat byte view; CodecError otherwise."""
    try:
        return memoryview(blob).cast("B")  # type: ignore[arg-type]
    except TypeError as exc:
        raise CodecError(f"a blob must be a contiguous bytes-like object: {exc}") from None


def unpack_header(view: memoryview) -> tuple[list[Any], int]:
    """``(header fields, data offset)`` of a blob: its msgpack header array, read with limits
    (at most ``MAX_HEADER`` bytes, short strings, no maps); CodecError for anything else."""
    for limit in (_FIRST_READ, MAX_HEADER):  # most headers are small: copy little first
        unpacker = msgpack.Unpacker(
            raw=False,
            max_buffer_size=limit,
            max_str_len=256,
            max_bin_len=MAX_HEADER,
            max_array_len=max(MAX_TENSORS, MAX_NDIM + 4),
            max_map_len=0,
            max_ext_len=0,
        )
        unpacker.feed(view[:limit])
        try:
            header = unpacker.unpack()
            break
        except msgpack.OutOfData:
            if view.nbytes <= limit or limit == MAX_HEADER:
                raise CodecError("blob is truncated: its header is incomplete") from None
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise CodecError(f"blob header is not valid msgpack: {exc}") from None
    if not isinstance(header, list) or len(header) < 4:
        raise CodecError("blob header must be [version, spec, tensors, raw_nbytes(, dictionary id)]")
    return header, unpacker.tell()


def read_header(
    view: memoryview, spec: str, dictionary: ZstdDictionary | None = None
) -> tuple[list[object], int, int, ZstdDictionary | None]:
    """``(entries, raw_nbytes, data_offset, dictionary)`` of a blob that must have been encoded
    with ``spec``; ``dictionary`` is the one its data needs (the decoder's, or None). A blob
    naming a dictionary other than the decoder's is refused. A blob with a non-finite patch
    (``_nonfinite.py``) must have been detached from it first."""
    header, offset = unpack_header(view)
    if not isinstance(header, list) or len(header) not in (4, 5):
        raise CodecError("blob header must be [version, spec, tensors, raw_nbytes(, dictionary id)]")
    version, blob_spec, entries, raw_nbytes = header[:4]
    if version != BLOB_VERSION:
        raise CodecError(f"blob version {version!r:.20} is not supported (this side speaks {BLOB_VERSION})")
    if not isinstance(blob_spec, str) or not isinstance(entries, list) or not _is_int(raw_nbytes):
        raise CodecError("blob header fields have the wrong types")
    if raw_nbytes < 0 or len(entries) > MAX_TENSORS:
        raise CodecError("blob header is out of range")
    if blob_spec != spec:
        raise CodecError(f"blob was encoded with codec {blob_spec!r}, expected {spec!r}")
    if len(header) == 4:
        return entries, raw_nbytes, offset, None
    dict_id = header[4]
    if not isinstance(dict_id, str) or len(dict_id) > 64:
        raise CodecError("blob header names its zstd dictionary with a short string")
    if dictionary is None or dictionary.id != dict_id:
        have = "none" if dictionary is None else f"dictionary {dictionary.id}"
        raise CodecError(
            f"blob was compressed with zstd dictionary {dict_id!r}, this decoder has {have}: "
            "edge and cloud must load the same bundle (its dictionaries are part of it)"
        )
    return entries, raw_nbytes, offset, dictionary


def read_data(
    view: memoryview, raw_nbytes: int, zstd: bool, dictionary: ZstdDictionary | None = None
) -> memoryview | bytes:
    """Exactly ``raw_nbytes`` data bytes from ``view`` (the blob after its header).

    A zstd frame must declare its content size (our encoder always writes it) and carry a
    checksum; a frame that declares another size is refused before anything is allocated.
    """
    if not zstd:
        if view.nbytes != raw_nbytes:
            raise CodecError(f"blob carries {view.nbytes} data bytes, its header says {raw_nbytes}")
        return view
    try:
        size = zstandard.frame_content_size(view)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not a zstd frame: {exc}") from None
    if size != raw_nbytes:
        raise CodecError(f"zstd frame declares {size} bytes, the blob header says {raw_nbytes}")
    if raw_nbytes == 0:
        return b""
    try:
        out = _decompressor(dictionary).decompress(view, max_output_size=raw_nbytes)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload is corrupt or truncated: {exc}") from None
    if len(out) != raw_nbytes:
        raise CodecError(f"zstd payload decoded to {len(out)} bytes, expected {raw_nbytes}")
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_entry(entry: object) -> tuple[str, tuple[int, ...], list[object]]:
    """``(dtype name, shape, codec fields)`` of one header entry ``[dtype, shape, *fields]``."""
    if not isinstance(entry, list) or not 2 <= len(entry) <= 8:
        raise CodecError(f"tensor entry must be [dtype, shape, ...], got {entry!r:.80}")
    shape = entry[1]
    try:
        name = check_dtype_name(entry[0])
    except ConfigError as exc:
        raise CodecError(str(exc)) from None
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise CodecError(f"tensor shape must be a list of at most {MAX_NDIM} dims >= 0")
    if math.prod(shape) > _MAX_NUMEL:
        raise CodecError(f"tensor shape {shape} is implausibly large")
    return name, tuple(shape), entry[2:]


def check_size(wire_nbytes: int, raw_nbytes: int, out_nbytes: int, max_nbytes: int, slack: int = 0) -> None:
    """Refuse a blob whose data or decoded tensors exceed ``max_nbytes`` (plus ``slack`` data)."""
    if raw_nbytes != wire_nbytes:
        raise CodecError(f"blob header says {raw_nbytes} bytes, its tensors need {wire_nbytes}")
    if out_nbytes > max_nbytes or wire_nbytes > max_nbytes + slack:
        raise CodecError(
            f"blob would decode to {max(out_nbytes, wire_nbytes)} bytes, above the limit {max_nbytes}"
        )


def f32_field(value: object, length: int, what: str) -> np.ndarray:
    """A header field holding ``length`` little-endian float32s (msgpack bin), all finite."""
    if not isinstance(value, bytes) or len(value) != 4 * length:
        raise CodecError(f"{what} must be {length} float32 values")
    array = np.frombuffer(value, "<f4").astype(np.float32)
    if not np.isfinite(array).all():
        raise CodecError(f"{what} must be finite")
    return array


def u32_field(value: object, length: int, what: str) -> np.ndarray:
    """A header field holding ``length`` little-endian uint32s (msgpack bin)."""
    if not isinstance(value, bytes) or len(value) != 4 * length:
        raise CodecError(f"{what} must be {length} uint32 values")
    return np.frombuffer(value, "<u4").astype(np.int64)


def wire_dtype_name(dtype: Any) -> str:
    """The wire name of a torch or numpy ``dtype``, as a CodecError for one that cannot travel."""
    try:
        return dtype_name(dtype)
    except ConfigError as exc:
        raise CodecError(str(exc)) from None


def tensor_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous little-endian array, without a copy."""
    if a.size == 0:
        return memoryview(b"")
    return a.data.cast("B")


def tensor_from_bytes(data: memoryview | bytes, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A new array (it owns writable memory) of wire dtype ``name`` (bfloat16 as its uint16 bits)
    and ``shape`` holding ``data``, exactly the bytes of that many values."""
    dtype = numpy_dtype(name)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(bytearray(data), dtype).reshape(shape)
