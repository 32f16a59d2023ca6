"""Trained bottlenecks: the ``bn<latent>q<bits>`` codecs.

A trained bottleneck at a cut is a pair of small networks that compile trains with the model
frozen (``partitioner/_bottleneck.py``, docs/learning.md): an *encoder* that maps the frontier
``N x C x H x W`` to integer codes ``N x L x h x w`` in ``0 .. 2**bits - 1`` (``L`` the spec's
``latent``), and a *decoder* that maps the codes back to a frontier the model's tail takes. The
bundle stores both (torch.export programs, and ONNX models where the bundle has ONNX) and binds
them to the codec as a :class:`TrainedBottleneck` (``Manifest.codec_for`` / ``decoder_for``):
the edge runs the encoder, the cloud the decoder. This module sees them only as numpy functions,
so the codec itself needs no torch.

Encoding: the encoder's codes are rounded and clipped to the levels, then packed ``bits`` bits
each (``_pack.py``; optionally zstd-framed by ``+zstd<level>``), or with ``+ans`` rANS-coded
under per-latent-channel tables over the codes each channel uses (``_ans.encode_ranged``).
Non-finite frontier values are replaced by 0 before the encoder (the adapters' patch restores
them after decoding, like every lossy codec).

Blob entry of the (single) tensor, ``_blob.py`` framing::

    [dtype, shape, bottleneck_id, code_shape, bits]                 packed codes
    [dtype, shape, bottleneck_id, code_shape, bits, tables, words]  +ans: ``4 * words`` bytes

``shape`` is the frontier's ``[N, C, H, W]``, ``code_shape`` the codes' ``[N, L, h, w]`` (C
order; for ``+ans`` one group a latent channel, each over all samples and positions),
``bottleneck_id`` 8 hex digits naming the trained pair (a decoder bound to another refuses the
blob, naming both). Decoding checks every one against the bound bottleneck (the frontier's and
the codes' shapes, the bits, the data's length against ``max_nbytes``) before it allocates
anything, then runs the decoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from splitinfer.compression._blob import check_entry, check_size, read_data, read_header, write_blob
from splitinfer.compression._codes import decode_codes, encode_codes, wire_of_codes
from splitinfer.compression._floats import FLOATS
from splitinfer.compression._frontier import Decoded
from splitinfer.errors import CodecError

__all__ = ["BottleneckCore", "TrainedBottleneck"]

#: A network as a numpy function: a float32 batch in, a float32 batch out.
Net = Callable[[np.ndarray], np.ndarray]
_ID = re.compile(r"^[0-9a-f]{8}$")


def _dims(value: object, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, tuple | list)
        or not 1 <= len(value) <= 6
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in value)
    ):
        raise CodecError(f"a trained bottleneck's {what} shape is 1..6 positive dims, got {value!r:.80}")
    return tuple(value)


@dataclass(frozen=True, eq=False)
class TrainedBottleneck:
    """A cut's trained encoder and decoder as numpy functions, and what they map between.

    ``frontier``: the frontier's shape without the batch (``C, H, W``); ``code``: the codes'
    (``L, h, w``); ``bits``: each code's width; ``id``: 8 hex digits naming the pair (its
    blobs carry it). ``encoder`` maps a float32 ``(N, *frontier)`` batch to ``(N, *code)``
    values in ``0 .. 2**bits - 1``, ``decoder`` float32 codes back to ``(N, *frontier)``;
    either is None where this process did not load it (an edge holds the encoder, a cloud the
    decoder).
    """

    id: str
    frontier: tuple[int, ...]
    code: tuple[int, ...]
    bits: int
    encoder: Net | None = None
    decoder: Net | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise CodecError(f"a trained bottleneck's id is 8 hex digits, got {self.id!r:.20}")
        object.__setattr__(self, "frontier", _dims(self.frontier, "frontier"))
        object.__setattr__(self, "code", _dims(self.code, "code"))
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise CodecError(f"a trained bottleneck's codes have 1..8 bits, got {self.bits!r}")

    @property
    def latent(self) -> int:
        """Channels of the code (``L``)."""
        return self.code[0]

    @property
    def levels(self) -> int:
        return 1 << self.bits


@dataclass(frozen=True)
class BottleneckCore:
    """The numpy core of ``bn<latent>q<bits>[+zstd<level>|+ans]`` bound to ``bottleneck``
    (module docstring); ``_codec.BottleneckCodec`` adds the adapters."""

    spec: str
    latent: int
    bits: int
    zstd_level: int | None
    ans: bool
    bottleneck: TrainedBottleneck | None = None

    def __post_init__(self) -> None:
        b = self.bottleneck
        if b is not None and (b.latent != self.latent or b.bits != self.bits):
            raise CodecError(
                f"codec {self.spec} needs a bottleneck of {self.latent} latent channels and {self.bits} "
                f"bits; this one has {b.latent} and {b.bits}"
            )

    def _net(self, which: str) -> tuple[TrainedBottleneck, Net]:
        b = self.bottleneck
        if b is None:
            raise CodecError(
                f"codec {self.spec} needs the bottleneck trained for its cut: take the codec from the "
                "bundle (Bundle.codec_for / decoder_for on a bundle compiled with bottleneck_cuts=), or "
                "get_codec(spec, bottleneck=...)"
            )
        net = b.encoder if which == "encoder" else b.decoder
        if net is None:
            side = "the cut's head (the edge: upto_cut >= the cut)" if which == "encoder" else "its tail"
            raise CodecError(
                f"codec {self.spec}: this process holds no {which} of bottleneck {b.id}; load the bundle "
                f"with {side}"
            )
        return b, net

    def _encode(self, arrays: list[tuple[str, np.ndarray]]) -> bytes:
        b, encoder = self._net("encoder")
        if len(arrays) != 1 or arrays[0][0] not in FLOATS or tuple(arrays[0][1].shape[1:]) != b.frontier:
            kinds = ", ".join(f"{n} {tuple(a.shape)}" for n, a in arrays)
            raise CodecError(
                f"codec {self.spec} encodes one floating tensor N x {' x '.join(map(str, b.frontier))} "
                f"(the frontier its bottleneck was trained on); got {kinds or 'none'}"
            )
        name, a = arrays[0]
        n = a.shape[0]
        code_shape = (n, *b.code)
        if n == 0:
            codes = np.zeros(code_shape, np.uint8)
        else:
            x = np.ascontiguousarray(a, np.float32)
            if not np.isfinite(x).all():
                x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # the adapters' patch restores them
            raw = np.asarray(encoder(x))
            if raw.shape != code_shape:
                raise CodecError(f"bottleneck {b.id}'s encoder gave {raw.shape}, expected {code_shape}")
            with np.errstate(invalid="ignore"):
                codes = np.clip(np.nan_to_num(np.rint(raw)), 0, b.levels - 1).astype(np.uint8)
        groups = codes.reshape(n, b.latent, math.prod(b.code[1:]))
        fields, chunks = encode_codes(groups, self.bits, self.ans, self.spec)
        entry = [name, list(a.shape), b.id, list(code_shape), self.bits, *fields]
        return write_blob(self.spec, [entry], chunks, self.zstd_level)

    def _check(
        self, view: memoryview, max_nbytes: int
    ) -> tuple[str, tuple[int, ...], list[object], int, int]:
        """``(dtype, shape, fields, raw_nbytes, offset)`` of a blob whose header fits the bound
        bottleneck; CodecError naming the first field that does not."""
        b = self.bottleneck
        assert b is not None
        entries, raw_nbytes, offset, _ = read_header(view, self.spec)
        if len(entries) != 1:
            raise CodecError(f"a {self.spec} blob holds one tensor, this one {len(entries)}")
        name, shape, fields = check_entry(entries[0])
        if name not in FLOATS or len(fields) != (5 if self.ans else 3):
            raise CodecError(
                "a bottleneck tensor entry is [float dtype, shape, bottleneck id, code shape, bits"
                + (", tables, words]" if self.ans else "]")
            )
        if fields[0] != b.id:
            raise CodecError(
                f"blob was encoded with bottleneck {fields[0]!r:.20}, this decoder has {b.id}: edge and "
                "cloud must load the same bundle (its bottlenecks are part of it)"
            )
        if len(shape) != 1 + len(b.frontier) or shape[1:] != b.frontier:
            raise CodecError(
                f"bottleneck {b.id} decodes frontiers N x {' x '.join(map(str, b.frontier))}, the blob "
                f"declares {list(shape)}"
            )
        if fields[1] != [shape[0], *b.code]:
            raise CodecError(
                f"bottleneck {b.id} has codes {[shape[0], *b.code]}, the blob declares {fields[1]!r:.80}"
            )
        if fields[2] != self.bits:
            raise CodecError(
                f"bottleneck {b.id} has {b.levels} levels ({self.bits} bits), the blob {fields[2]!r:.20} bits"
            )
        check_size(raw_nbytes, raw_nbytes, 4 * math.prod(shape), max_nbytes)
        return name, shape, fields, raw_nbytes, offset

    def _decode(self, view: memoryview, max_nbytes: int) -> list[Decoded]:
        b, decoder = self._net("decoder")
        name, shape, fields, raw_nbytes, offset = self._check(view, max_nbytes)
        n = shape[0]
        numel = n * math.prod(b.code)
        groups = (n, b.latent, math.prod(b.code[1:]))
        wire, tables = wire_of_codes(fields[3:], groups, self.bits, self.ans)
        # the limit is the decoded frontier's (what a server allows a request): the codes'
        # float32 copy for the decoder must fit it too, on its own
        check_size(wire, raw_nbytes, max(4 * math.prod(shape), 4 * numel), max_nbytes)
        data = read_data(view[offset:], wire, self.zstd_level is not None)
        if n == 0:
            return [(name, "float32", np.empty(shape, np.float32))]
        codes = decode_codes(data, tables, groups, self.bits, self.spec)
        x = np.ascontiguousarray(codes.reshape(n, *b.code), np.float32)
        out = np.asarray(decoder(x))
        if out.shape != shape:
            raise CodecError(f"bottleneck {b.id}'s decoder gave {out.shape}, expected {shape}")
        return [(name, "float32", np.array(out, np.float32, copy=True))]
