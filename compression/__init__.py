"""splitinfer.compression: tensor codecs named by short spec strings (``f16+zstd1``).

>>> codec = get_codec("f16+zstd1")
>>> tensors = codec.decode(codec.encode([torch.ones(2, 3)]))
"""

from splitinfer.compression._codec import DEFAULT_MAX_NBYTES, Codec, available_codecs, get_codec

__all__ = ["DEFAULT_MAX_NBYTES", "Codec", "available_codecs", "get_codec"]
