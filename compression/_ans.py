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

__all__ = ["available", "check_weights", "decode_codes", "encode_codes", "require"]


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
