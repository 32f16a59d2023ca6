"""The ``+ans`` entropy stage: quantization codes coded with rANS (the ``constriction`` package)
under semi-static per-channel symbol statistics that travel in the blob.

Why: zstd on bit-packed codes sees bytes, not symbols (a 4-bit code straddles nothing but two
codes share a byte, and a 3-, 5- or 6-bit code straddles bytes), and its Huffman stage pools
every channel. An arithmetic coder over the symbols themselves, with one distribution per
channel, comes within a few percent of their zeroth-order entropy (benchmarks/results/codecs.md
measures both against it).

Layout, per floating tensor of ``levels = 2**bits`` codes viewed as ``(N, C, R)``
(``_quant.channel_view``):

- ``groups``: ``C`` (one distribution per channel) or 1 (one pooled distribution), whichever
  the encoder estimates smaller (the codes' entropy plus the tables' bytes); a tensor with one
  range always pools. The decoder reads it from the length of ``weights``;
- ``weights``: ``groups * levels`` bytes, group-major; the probability of code ``s`` in group
  ``g`` is ``weights[g, s] / sum(weights[g])``, a symbol that occurs has weight >= 1 (counts are
  scaled so that each group's most frequent code has 255);
- ``words``: the rANS stream (little-endian uint32 words), coding group 0's codes first, then
  group 1's, ...; within a group, channel ``g``'s codes of sample 0, then sample 1, ... (for one
  pooled group: the codes in memory order).

Both sides build the models from the same float32 probabilities, so decoding is deterministic.
A hostile stream decodes to codes inside the alphabet, never to anything else; decoding work is
bounded by the tensor's element count, which the blob's size limit bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitinfer.errors import CodecError

__all__ = [
    "available",
    "check_ranged",
    "check_weights",
    "decode_codes",
    "decode_ranged",
    "encode_codes",
    "encode_ranged",
    "require",
]


def available() -> bool:
    """Whether the ``constriction`` package (the ``entropy`` extra) can be imported."""
    try:
        import constriction  # noqa: F401
    except ImportError:
        return False
    return True


def require(spec: str) -> Any:
    """The ``constriction`` module; a CodecError saying how to install it otherwise."""
    try:
        import constriction
    except ImportError:
        raise CodecError(
            f"codec {spec} entropy-codes with rANS and needs the constriction package: "
            "pip install 'splitinfer[entropy]' (or pick a +zstd codec)"
        ) from None
    return constriction


def _bits(counts: np.ndarray) -> float:
    """Zeroth-order entropy in bits of codes with these counts (one distribution a row)."""
    total = counts.sum(axis=1, keepdims=True)
    p = counts / np.maximum(total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.where(counts > 0, counts * np.log2(p), 0.0).sum())


def _models(constriction: Any, weights: np.ndarray) -> list[Any]:
    probs = weights.astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    categorical = constriction.stream.model.Categorical
    return [categorical(p, perfect=False) for p in probs]


def encode_codes(codes3: np.ndarray, levels: int, spec: str) -> tuple[bytes, np.ndarray]:
    """``(weights, words)`` of the uint8 codes ``(N, C, R)`` of a tensor with ``C`` ranges."""
    constriction = require(spec)
    channels = codes3.shape[1]
    streams = codes3.transpose(1, 0, 2).reshape(channels, -1).astype(np.int32)
    offsets = (np.arange(channels, dtype=np.int32) * levels)[:, None]
    counts = np.bincount((streams + offsets).reshape(-1), minlength=channels * levels)
    counts = counts.reshape(channels, levels)
    pooled = counts.sum(axis=0, keepdims=True)
    if channels == 1 or _bits(counts) + 8 * channels * levels >= _bits(pooled) + 8 * levels:
        streams, counts = codes3.reshape(1, -1).astype(np.int32), pooled
    groups = counts.shape[0]
    top = counts.max(axis=1, keepdims=True)
    weights = np.where(counts > 0, np.maximum(1, np.rint(counts * 255 / np.maximum(top, 1))), 0).astype(
        np.uint8
    )
    coder = constriction.stream.stack.AnsCoder()
    models = _models(constriction, weights)
    for g in range(groups - 1, -1, -1):  # a stack: encode the last group first
        coder.encode_reverse(streams[g], models[g])
    return weights.tobytes(), np.asarray(coder.get_compressed(), "<u4")


def check_weights(weights: object, channels: int, levels: int) -> np.ndarray:
    """The ``(groups, levels)`` uint8 weights of a header field for a tensor with ``channels``
    ranges (``groups`` is 1 or ``channels``); CodecError if malformed."""
    if not isinstance(weights, bytes) or len(weights) not in (levels, channels * levels):
        raise CodecError(f"ans weights must be {levels} or {channels} x {levels} bytes")
    table = np.frombuffer(weights, np.uint8).reshape(-1, levels)
    if (table.sum(axis=1) == 0).any():
        raise CodecError("every ans distribution needs a symbol of nonzero weight")
    return table


def decode_codes(
    weights: np.ndarray, words: memoryview | bytes, shape3: tuple[int, int, int], spec: str
) -> np.ndarray:
    """The uint8 codes ``(N, C, R)`` coded in ``words`` (checked ``weights``, see :func:`check_weights`)."""
    constriction = require(spec)
    groups = weights.shape[0]
    n, channels, rest = shape3
    per_group = n * channels * rest // groups
    stream = np.frombuffer(words, "<u4").astype(np.uint32)
    try:
        decoder = constriction.stream.stack.AnsCoder(stream)
        out = np.stack([decoder.decode(m, per_group) for m in _models(constriction, weights)])
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"ans payload is corrupt: {exc}") from None
    codes = out.astype(np.uint8)
    if groups == 1:
        return codes.reshape(shape3)
    return np.ascontiguousarray(codes.reshape(channels, n, rest).transpose(1, 0, 2))


# -- ranged tables (the pca codecs, ``_projection.py``) ------------------------------------
#
# Groups of codes whose symbols occupy a narrow range of the alphabet (the coefficients of a
# channel projection: a low-variance component uses a few codes around its centre) carry a
# table over that range only: ``tables`` is ``first`` (``G`` bytes: each group's smallest code),
# then ``last`` (``G`` bytes: its largest), then each group's weights for codes
# ``first..last`` (uint8, as above; the first and last have weight >= 1), groups in order. A
# group with one code (``first == last``) costs no stream words at all. ``words`` codes group
# 0 first, then group 1, ...


def _weights(counts: np.ndarray) -> np.ndarray:
    top = max(int(counts.max()), 1)
    return np.where(counts > 0, np.maximum(1, np.rint(counts * 255 / top)), 0).astype(np.uint8)


def encode_ranged(streams: np.ndarray, spec: str) -> tuple[bytes, np.ndarray]:
    """``(tables, words)`` of the uint8 codes ``(G, M)``: group ``g``'s codes are row ``g``."""
    constriction = require(spec)
    groups = streams.shape[0]
    first, last = streams.min(axis=1), streams.max(axis=1)
    tables: list[bytes] = [first.astype(np.uint8).tobytes(), last.astype(np.uint8).tobytes()]
    coded: list[tuple[np.ndarray, np.ndarray]] = []
    for g in range(groups):
        lo, hi = int(first[g]), int(last[g])
        symbols = streams[g].astype(np.int32) - lo
        weights = _weights(np.bincount(symbols, minlength=hi - lo + 1))
        tables.append(weights.tobytes())
        if hi > lo:
            coded.append((symbols, weights))
    coder = constriction.stream.stack.AnsCoder()
    categorical = constriction.stream.model.Categorical
    for symbols, weights in reversed(coded):  # a stack: encode the last group first
        probs = weights.astype(np.float32)
        probs /= probs.sum()
        coder.encode_reverse(symbols, categorical(probs, perfect=False))
    return b"".join(tables), np.asarray(coder.get_compressed(), "<u4")


def check_ranged(tables: object, groups: int, levels: int) -> list[np.ndarray]:
    """The ``(first, last, weights...)`` of a ``tables`` field for ``groups`` groups of codes
    below ``levels``: ``[first, last, w_0, ..., w_{G-1}]``; CodecError if malformed."""
    if not isinstance(tables, bytes) or len(tables) < 2 * groups:
        raise CodecError(f"ans tables must start with 2 x {groups} bytes")
    head = np.frombuffer(tables, np.uint8, 2 * groups).reshape(2, groups).astype(np.int64)
    first, last = head
    if (last < first).any() or (last >= levels).any():
        raise CodecError(f"ans tables need first <= last < {levels} for every group")
    sizes = last - first + 1
    if int(sizes.sum()) != len(tables) - 2 * groups:
        raise CodecError("ans tables are not as long as their ranges say")
    flat = np.frombuffer(tables, np.uint8, offset=2 * groups)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if (flat[starts] == 0).any() or (flat[ends - 1] == 0).any():
        raise CodecError("ans tables need a nonzero weight at both ends of every range")
    return [first, last, *np.split(flat, ends[:-1])]


def decode_ranged(
    tables: list[np.ndarray], words: memoryview | bytes, per_group: int, spec: str
) -> np.ndarray:
    """The uint8 codes ``(G, per_group)`` coded in ``words`` under checked ``tables``
    (:func:`check_ranged`)."""
    constriction = require(spec)
    first, last, weights = tables[0], tables[1], tables[2:]
    out = np.empty((len(weights), per_group), np.uint8)
    stream = np.frombuffer(words, "<u4").astype(np.uint32)
    categorical = constriction.stream.model.Categorical
    try:
        decoder = constriction.stream.stack.AnsCoder(stream)
        for g, w in enumerate(weights):
            if last[g] == first[g]:
                out[g] = first[g]
                continue
            probs = w.astype(np.float32)
            probs /= probs.sum()
            out[g] = decoder.decode(categorical(probs, perfect=False), per_group) + first[g]
    except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
        raise CodecError(f"ans payload is corrupt: {exc}") from None
    return out
