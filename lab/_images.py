"""Real photos that ship inside registry packages (scikit-image, scikit-learn): no download.

Used by the example app, the demo and the benchmarks; needs the ``examples`` extra.
"""

from __future__ import annotations

import numpy as np
import torch

from splitinfer.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "photo_batch", "sample_photos"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
#: Colour photos in scikit-image that are bundled with the package (others are downloaded).
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "motorcycle")


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) colour photos from scikit-image and scikit-learn."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ConfigError(
            f"real photos need the examples extra: pip install 'splitinfer[examples]' ({exc})"
        ) from None
    photos = []
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, "stereo_motorcycle" if name == "motorcycle" else name, None)
        if loader is None:
            continue
        try:
            image = loader()
        except Exception:  # a photo that is not bundled (would need a download): skip it
            continue
        image = image[0] if isinstance(image, tuple) else image
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append((name, np.ascontiguousarray(image[..., :3])))
    sklearn = load_sample_images()
    for filename, image in zip(sklearn.filenames, sklearn.images):
        photos.append((filename.rsplit("/", 1)[-1].split(".")[0], image))
    return photos


def photo_batch(count: int, size: int = 224, seed: int = 0, normalize: bool = True) -> torch.Tensor:
    """``count`` crops of the sample photos (random position, scale and flip), ``N x 3 x size x size``."""
    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1).float().div(255) for _, p in sample_photos()]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        image = photos[i % len(photos)]
        _, h, w = image.shape
        side = int(min(h, w) * (0.5 + 0.5 * torch.rand(1, generator=gen).item()))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = image[:, top : top + side, left : left + side].unsqueeze(0)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
    batch = torch.cat(out).clamp(0, 1)
    return (batch - IMAGENET_MEAN) / IMAGENET_STD if normalize else batch
