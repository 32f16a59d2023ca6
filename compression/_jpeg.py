"""JPEG encoding and decoding of uint8 image batches with Pillow.

One JPEG file (baseline, Pillow's default 4:2:0 chroma subsampling) per image of an
``(N, 3, H, W)`` uint8 batch. Decoding accepts only JPEG files whose header says RGB and exactly
``W x H``, checked before the pixels are decoded, so a hostile file cannot make Pillow allocate
more than the blob header allowed. Every Pillow error becomes a CodecError. Pillow is an
optional dependency, imported on first use.
"""

from __future__ import annotations

import io
from types import ModuleType

import numpy as np

from splitinfer.errors import CodecError

__all__ = ["MAX_SIDE", "decode_images", "encode_images"]

#: Largest width or height a JPEG file can hold.
MAX_SIDE = 65_500


def _pillow() -> ModuleType:
    """PIL.Image, imported on first use: Pillow is optional (only the jpeg codecs need it)."""
    try:
        from PIL import Image
    except ImportError:
        raise CodecError("the jpeg codecs need Pillow: pip install Pillow") from None
    return Image


def encode_images(codes: np.ndarray, quality: int) -> list[bytes]:
    """One JPEG file per image of the uint8 batch ``codes`` ``(N, 3, H, W)``."""
    Image = _pillow()
    files = []
    for image in codes:  # one Pillow call per image; the pixels are never looped over
        out = io.BytesIO()
        try:
            Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB").save(
                out, "JPEG", quality=quality
            )
        except Exception as exc:  # Pillow raises OSError, ValueError, ...: none may leak
            raise CodecError(f"JPEG encoding failed: {exc}") from None
        files.append(out.getvalue())
    return files


def decode_images(files: list[memoryview], height: int, width: int) -> np.ndarray:
    """The uint8 batch ``(N, 3, height, width)`` held in ``files`` (one JPEG file each)."""
    Image = _pillow()
    out = np.empty((len(files), 3, height, width), np.uint8)
    for i, data in enumerate(files):
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
                if image.mode != "RGB" or image.size != (width, height):
                    raise CodecError(
                        f"image {i} is a {image.mode} JPEG of {image.size[0]}x{image.size[1]}, "
                        f"the blob header says RGB {width}x{height}"
                    )
                image.load()
                pixels = np.asarray(image)
        except CodecError:
            raise
        except Exception as exc:  # truncated or corrupt files: OSError, SyntaxError, ...
            raise CodecError(f"image {i} is not a valid JPEG file: {exc}") from None
        if pixels.shape != (height, width, 3):
            raise CodecError(f"image {i} decoded to shape {pixels.shape}")
        out[i] = pixels.transpose(2, 0, 1)
    return out
