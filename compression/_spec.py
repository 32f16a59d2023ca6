"""Codec spec strings: ``<base>[+zstd<level>]``, parsed once into a frozen :class:`Spec`.

Bases:

- ``f32``, ``f16``, ``bf16``: cast floating tensors (lossless for ``f32``);
- ``q2`` .. ``q8``: uniform affine quantization to that many bits, one range per tensor;
  ``q2c`` .. ``q8c``: one range per channel (dim 1) of tensors of 3+ dims, one range otherwise;
- ``jpeg1`` .. ``jpeg100``: JPEG at that quality, for float image batches ``N x 3 x H x W``;
- ``pca<r>q<bits>`` (``r`` 1..4096, ``bits`` 2..8): a calibrated channel projection keeping ``r``
  components, their coefficients quantized on one step for all of them (``_projection.py``;
  the codec must be bound to the projection of its cut);
- ``bn<latent>q<bits>`` (``latent`` 1..256 channels, ``bits`` 1..8): a trained bottleneck, an
  encoder network on the device and a decoder in the cloud around a ``latent``-channel code of
  ``bits`` bits (``_bottleneck.py``; the codec must be bound to the bottleneck trained for its
  cut, which compile stores in the bundle: docs/learning.md).

Every base may be followed by ``+zstd1`` .. ``+zstd22``; a quantizing base (``q<bits>[c]``,
``pca<r>q<bits>``, ``bn<latent>q<bits>``) may instead be followed by ``+ans``: its codes are
entropy-coded with rANS under per-channel (per-component) symbol statistics that travel in the
blob (``_ans.py``; needs the ``constriction`` package, the ``entropy`` extra). Spellings are
canonical (no leading zeros, lower case), so one codec has exactly one name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from splitinfer.errors import CodecError

__all__ = ["VALID_FORMS", "Spec", "parse_spec"]

VALID_FORMS = (
    "f32 | f16 | bf16 | q<bits 2..8> | q<bits 2..8>c | jpeg<quality 1..100> | pca<r 1..4096>q<bits 2..8> "
    "| bn<latent 1..256>q<bits 1..8>, optionally followed by +zstd<level 1..22>, or q<bits>[c], "
    "pca<r>q<bits> or bn<latent>q<bits> followed by +ans "
    "(e.g. 'f16+zstd1', 'q8+zstd1', 'q4c+zstd3', 'q4c+ans', 'pca24q6+ans', 'bn8q2+zstd3', 'jpeg90')"
)

_CASTS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_SPEC_RE = re.compile(
    r"^(?:(?P<cast>f32|f16|bf16)|q(?P<bits>[2-8])(?P<channel>c?)|jpeg(?P<quality>[1-9]\d{0,2})"
    r"|pca(?P<rank>[1-9]\d{0,3})q(?P<pbits>[2-8])|bn(?P<latent>[1-9]\d{0,2})q(?P<bbits>[1-8]))"
    r"(?:\+zstd(?P<level>[1-9]\d?)|\+(?P<ans>ans))?$"
)


@dataclass(frozen=True)
class Spec:
    """A parsed codec spec. ``kind`` is ``"cast"``, ``"quant"``, ``"jpeg"``, ``"pca"`` or ``"bn"``."""

    text: str
    kind: str
    cast: str | None = None  # cast: the wire dtype name of floating tensors ("float16", ...)
    bits: int = 0  # quant, pca: 2..8; bn: 1..8; jpeg: 8 (per colour sample)
    per_channel: bool = False  # quant: one range per channel; jpeg: always (3 colour channels)
    quality: int = 0  # jpeg: 1..100
    zstd_level: int | None = None
    ans: bool = False  # quant, pca, bn: codes entropy-coded with rANS instead of packed
    rank: int = 0  # pca: components kept, 1..4096
    latent: int = 0  # bn: channels of the trained bottleneck's code, 1..256

    @property
    def base(self) -> str:
        """The spec without its entropy stage (``bn8q2`` of ``bn8q2+zstd3``)."""
        return self.text.split("+", 1)[0]

    @property
    def levels(self) -> int:
        """Number of quantization levels (``2**bits``)."""
        return 1 << self.bits


def parse_spec(text: object) -> Spec:
    """The :class:`Spec` named by ``text``; CodecError listing the valid forms otherwise."""
    if not isinstance(text, str):
        raise CodecError(f"unknown codec spec {text!r:.80}; valid forms: {VALID_FORMS}")
    return _parse(text)


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> Spec:
    match = _SPEC_RE.match(text)
    if match is None:
        raise CodecError(f"unknown codec spec {text!r}; valid forms: {VALID_FORMS}")
    level = match.group("level")
    zstd_level = None if level is None else int(level)
    if zstd_level is not None and zstd_level > 22:
        raise CodecError(f"zstd level must be 1..22, got {level} in {text!r}; valid forms: {VALID_FORMS}")
    ans = bool(match.group("ans"))
    if ans and not (match.group("bits") or match.group("rank") or match.group("latent")):
        raise CodecError(
            f"+ans entropy-codes quantized symbols: only q<bits>[c], pca<r>q<bits> and bn<latent>q<bits> "
            "codecs take it, "
            f"not {text!r}; "
            f"valid forms: {VALID_FORMS}"
        )
    if match.group("cast"):
        return Spec(text, "cast", cast=_CASTS[match.group("cast")], zstd_level=zstd_level)
    if match.group("bits"):
        bits = int(match.group("bits"))
        return Spec(
            text, "quant", bits=bits, per_channel=bool(match.group("channel")), zstd_level=zstd_level, ans=ans
        )
    if match.group("rank"):
        rank = int(match.group("rank"))
        if rank > 4096:
            raise CodecError(
                f"pca keeps 1..4096 components, got {rank} in {text!r}; valid forms: {VALID_FORMS}"
            )
        return Spec(text, "pca", bits=int(match.group("pbits")), zstd_level=zstd_level, ans=ans, rank=rank)
    if match.group("latent"):
        latent = int(match.group("latent"))
        if latent > 256:
            raise CodecError(
                f"a bottleneck's code has 1..256 channels, got {latent} in {text!r}; "
                f"valid forms: {VALID_FORMS}"
            )
        return Spec(text, "bn", bits=int(match.group("bbits")), zstd_level=zstd_level, ans=ans, latent=latent)
    quality = int(match.group("quality"))
    if quality > 100:
        raise CodecError(
            f"jpeg quality must be 1..100, got {quality} in {text!r}; valid forms: {VALID_FORMS}"
        )
    return Spec(text, "jpeg", bits=8, per_channel=True, quality=quality, zstd_level=zstd_level)
