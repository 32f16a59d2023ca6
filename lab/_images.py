"""Real photos that ship inside registry packages (scikit-image, scikit-learn): no download.

Used by the example app, the demo and the benchmarks; needs the ``examples`` extra.
"""

from __future__ import annotations

import numpy as np
import torch

from splitinfer.errors import ConfigError

__all__ = [
    "CALIBRATION_PHOTOS",
    "EVALUATION_PHOTOS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "photo_batch",
    "sample_photos",
]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
#: Colour photos in scikit-image that are bundled with the package (others are downloaded);
#: ``cat`` is ``chelsea`` again, ``colorwheel`` and ``logo`` are no photos.
_SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
#: Two disjoint sets of photos: a fidelity table measured on crops of photos the clip
#: ranges never saw says what unseen inputs get. Each set mixes everyday scenes with others.
CALIBRATION_PHOTOS = ("astronaut", "coffee", "motorcycle", "motorcycle_right", "hubble_deep_field", "china")
EVALUATION_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "retina", "flower")


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
        loader = getattr(skimage.data, "stereo_motorcycle" if name.startswith("motorcycle") else name, None)
        if loader is None:
            continue
        try:
            image = loader()
        except Exception:  # a photo that is not bundled (would need a download): skip it
            continue
        if isinstance(image, tuple):  # the stereo pair (and its disparity)
            image = image[1] if name == "motorcycle_right" else image[0]
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append((name, np.ascontiguousarray(image[..., :3])))
    sklearn = load_sample_images()
    for filename, image in zip(sklearn.filenames, sklearn.images):
        photos.append((filename.rsplit("/", 1)[-1].split(".")[0], image))
    return photos


def photo_batch(
    count: int,
    size: int = 224,
    seed: int = 0,
    normalize: bool = True,
    *,
    photos: tuple[str, ...] | None = None,
    jitter: bool = False,
) -> torch.Tensor:
    """``count`` crops of the sample photos (random position, scale and flip), ``N x 3 x size x size``.

    ``photos`` picks photos by name (:data:`CALIBRATION_PHOTOS`, :data:`EVALUATION_PHOTOS`; all
    by default); ``jitter`` also varies each crop's brightness, contrast and saturation by up to
    20 % (more looks from the few photos that ship).
    """
    named = sample_photos()
    if photos is not None:
        unknown = set(photos) - {n for n, _ in named}
        if unknown:
            raise ConfigError(f"unknown sample photos {sorted(unknown)}; there are {[n for n, _ in named]}")
        named = [(n, p) for n, p in named if n in photos]
    images = [torch.from_numpy(p.copy()).permute(2, 0, 1).float().div(255) for _, p in named]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        image = images[i % len(images)]
        _, h, w = image.shape
        side = int(min(h, w) * (0.5 + 0.5 * torch.rand(1, generator=gen).item()))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = image[:, top : top + side, left : left + side].unsqueeze(0)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(3)
        if jitter:
            crop = _jitter(crop, gen)
        out.append(crop)
    batch = torch.cat(out).clamp(0, 1)
    return (batch - IMAGENET_MEAN) / IMAGENET_STD if normalize else batch


def _jitter(crop: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``crop`` (1 x 3 x H x W in [0, 1]) with brightness, contrast and saturation scaled by
    factors in [0.8, 1.2]."""
    brightness, contrast, saturation = (0.8 + 0.4 * torch.rand(3, generator=gen)).tolist()
    crop = crop * brightness
    mean = crop.mean()
    crop = (crop - mean) * contrast + mean
    grey = crop.mean(dim=1, keepdim=True)
    return ((crop - grey) * saturation + grey).clamp(0, 1)
