"""zstd dictionaries trained per cut: :class:`ZstdDictionary` and :func:`train`.

A ``+zstd<level>`` codec may be bound to a dictionary (``get_codec(spec, dictionary=d)``). Its
blobs then say which one: the blob header gains a fifth field, the dictionary's id (the first
8 hex digits of the sha256 of its bytes, 9 bytes on the wire; ``_blob.py``). A decoder bound
to the same dictionary decodes them; any other decoder refuses them with a CodecError naming
both ids, before it decompresses anything. A bound decoder still decodes blobs made without a dictionary.

Dictionaries pay only for small payloads (a few KiB or less: the late cuts of a CNN); on
larger ones zstd learns as much from the payload itself. ``benchmarks/results/codecs.md``
has the measurements; the fidelity table keeps a dictionary only where it measurably wins.

Training samples are codec payloads: :func:`splitinfer.compression._codec.payload_of` gives the
bytes a codec hands to zstd. This module depends on no other codec module but ``_spec``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard

from splitinfer.compression._spec import parse_spec
from splitinfer.errors import CodecError

__all__ = ["DEFAULT_SIZE", "MAX_SIZE", "ZstdDictionary", "train"]

#: Default dictionary size; training never makes one larger than a tenth of its samples.
DEFAULT_SIZE = 16 * 1024
#: Largest dictionary accepted (from a file or a caller).
MAX_SIZE = 1 << 20
_MIN_SAMPLES = 8


@dataclass(frozen=True)
class ZstdDictionary:
    """The bytes of a zstd dictionary, and its id (sha256 prefix) that blobs carry."""

    data: bytes
    _compiled: dict[int, zstandard.ZstdCompressionDict] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes) or not 0 < len(self.data) <= MAX_SIZE:
            raise CodecError(f"a zstd dictionary is 1..{MAX_SIZE} bytes")

    @property
    def id(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:8]

    def compiled(self, level: int) -> zstandard.ZstdCompressionDict:
        """The dictionary digested for ``level`` (cached: digesting costs more than a small frame)."""
        found = self._compiled.get(level)
        if found is None:
            try:
                found = zstandard.ZstdCompressionDict(self.data)
                found.precompute_compress(level=level)
            except zstandard.ZstdError as exc:
                raise CodecError(f"not a usable zstd dictionary: {exc}") from None
            self._compiled[level] = found
        return found


def train(samples: Sequence[bytes], spec: str, size: int = DEFAULT_SIZE) -> ZstdDictionary | None:
    """A dictionary for ``spec`` trained on ``samples`` (payloads, see ``_codec.payload_of``), or
    None when there are too few or too little to train on (zstd needs some 10x its size)."""
    level = parse_spec(spec).zstd_level or 3
    total = sum(len(s) for s in samples)
    size = min(size, total // 10)
    if len(samples) < _MIN_SAMPLES or size < 256:
        return None
    try:
        trained = zstandard.train_dictionary(size, list(samples), level=level)
    except zstandard.ZstdError:
        return None  # zstd refuses samples it cannot learn from: no dictionary
    return ZstdDictionary(trained.as_bytes())
