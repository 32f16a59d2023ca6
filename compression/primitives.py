"""The building blocks the codecs are made of, public for measuring them one by one
(benchmarks/bench_codecs.py) and for writing a new codec (``_codec._Adapters`` has the contract).

- bit packing: :func:`pack_bits`, :func:`unpack_bits`, :func:`packed_nbytes`;
- affine quantization on ``N x C x rest`` views: :func:`channel_view`, :func:`sanitize` (ranges
  without the non-finite values), :func:`affine` (scale and offset for ``levels``),
  :func:`quantize` and :func:`dequantize`;
- the rANS entropy stage of ``+ans`` (needs the ``entropy`` extra): :func:`encode_codes`,
  :func:`decode_codes`.

Numpy only; importing this loads no torch.
"""

from splitinfer.compression._ans import decode_codes, encode_codes
from splitinfer.compression._pack import pack_bits, packed_nbytes, unpack_bits
from splitinfer.compression._quant import affine, channel_view, dequantize, quantize, sanitize

__all__ = [
    "affine",
    "channel_view",
    "decode_codes",
    "dequantize",
    "encode_codes",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "sanitize",
    "unpack_bits",
]
