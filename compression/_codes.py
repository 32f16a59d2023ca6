"""The codes stage shared by the codecs whose payload is integer codes in groups: channel
projections (``pca<r>q<bits>``: a group a component) and trained bottlenecks
(``bn<latent>q<bits>``: a group a latent channel).

Codes ``N x G x R`` (samples, groups, positions) go on the wire bit-packed (``_pack.py``), or
with ``+ans`` rANS-coded under one table a group over all samples and positions
(``_ans.encode_ranged``), the entry then ending in ``[tables, words]``. Reading checks the
entry's fields and the wire size before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from splitinfer.compression import _ans
from splitinfer.compression._pack import pack_bits, packed_nbytes, unpack_bits
from splitinfer.errors import CodecError

__all__ = ["decode_codes", "encode_codes", "wire_of_codes"]


def encode_codes(
    codes: np.ndarray, bits: int, ans: bool, spec: str
) -> tuple[list[object], list[bytes | np.ndarray]]:
    """The entry's trailing fields (``[]``, or ``[tables, words]`` with ``ans``) and the chunks
    of ``codes`` (``N x G x R`` integers below ``2 ** bits``)."""
    if not ans:
        return [], [pack_bits(codes.reshape(-1), bits)]
    if codes.size == 0:
        return [b"", 0], []
    groups = codes.shape[1]
    tables, words = _ans.encode_ranged(codes.transpose(1, 0, 2).reshape(groups, -1), spec)
    return [tables, int(words.size)], [words]


def wire_of_codes(fields: list[object], shape: tuple[int, int, int], bits: int, ans: bool) -> tuple[int, Any]:
    """The wire bytes of codes of ``shape`` (``N x G x R``) and, with ``ans``, their checked
    tables (None for bit-packed or empty codes); ``fields`` are the entry's trailing fields.
    CodecError for fields that do not fit."""
    numel = math.prod(shape)
    if not ans:
        return packed_nbytes(numel, bits), None
    tables, words = fields
    if not isinstance(words, int) or isinstance(words, bool) or words < 0:
        raise CodecError("ans words must be a count >= 0")
    if numel == 0:
        if tables != b"" or words:
            raise CodecError("an empty tensor has no ans tables and no words")
        return 0, None
    return 4 * words, _ans.check_ranged(tables, shape[1], 1 << bits)


def decode_codes(data: Any, tables: Any, shape: tuple[int, int, int], bits: int, spec: str) -> np.ndarray:
    """Codes ``N x G x R`` from their wire ``data`` (``tables`` from :func:`wire_of_codes`)."""
    n, groups, rest = shape
    if tables is not None:
        codes = _ans.decode_ranged(tables, data, n * rest, spec)
        return codes.reshape(groups, n, rest).transpose(1, 0, 2)
    return unpack_bits(data, bits, n * groups * rest).reshape(n, groups, rest)
