"""A trained bottleneck at a cut (issue 32, item 3): an encoder on the device and a decoder in
the cloud around a few-channel, low-bit latent, trained with the model frozen.

Experimental: trained and measured by ``benchmarks/bench_learned.py`` (bytes against agreement
and accuracy); not yet a codec a bundle offers (no spec name, fidelity rows, profile or
fuzzing: docs/learning.md says what is missing).

- encoder: 3x3 conv, ReLU, 1x1 conv to ``latent`` channels, a sigmoid scaled to the ``bits``
  levels and rounded (straight-through in training): the codes are integers in
  ``0..2**bits - 1``, ``latent x H x W`` per input;
- entropy stage: the codes as bytes through zstd (level 3), which spends few bits on the
  skewed code distributions the training produces;
- decoder: 1x1 conv back to the frontier's channels, ReLU, 3x3 conv;
- loss: the frontier's reconstruction (MSE over its variance) plus the KL divergence of the
  frozen tail's output from the teacher's (no labels), on the ``training=`` inputs' frontiers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from splitinfer.errors import ConfigError
from splitinfer.partitioner._learn import Training, fit, teacher_views

__all__ = ["Bottleneck", "latent_bytes", "train_bottleneck"]


class Bottleneck(nn.Module):
    """Encoder and decoder around a ``latent``-channel, ``bits``-bit code of a ``C x H x W`` frontier."""

    def __init__(self, channels: int, latent: int, bits: int):
        super().__init__()
        if not 1 <= bits <= 8 or latent < 1:
            raise ConfigError(f"a bottleneck needs 1..8 bits and >= 1 latent channel, got {bits}, {latent}")
        self.levels = 2**bits - 1
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, latent, 1)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes (float tensor of integers in ``0..levels``), straight-through when training."""
        z = torch.sigmoid(self.encoder(x)) * self.levels
        return z + (torch.round(z) - z).detach()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes / self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def latent_bytes(codes: torch.Tensor) -> list[int]:
    """Bytes per input of the codes (``N x latent x H x W``) after the entropy stage (zstd 3)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3)
    arr = codes.detach().round().to(torch.uint8).numpy()
    return [len(compressor.compress(np.ascontiguousarray(a).tobytes())) for a in arr]


def train_bottleneck(
    bundle: Any,
    k: int,
    training: Sequence[tuple[torch.Tensor, ...]],
    options: Training,
    *,
    latent: int,
    bits: int,
    weight: float = 1.0,
) -> tuple[Bottleneck, dict[str, Any]]:
    """A bottleneck at cut ``k`` trained on ``training`` (the frontier there and the teacher's
    logits per view) with the bundle's segments frozen; the record of its training."""
    cut = bundle.cut(k)
    if len(cut.tensors) != 1 or len(cut.tensors[0].shape) != 4:
        raise ConfigError(
            f"a bottleneck reads one N x C x H x W frontier; cut {k} has {list(map(str, cut.tensors))}"
        )

    def run(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        frontier = bundle.run_segments(0, k, bundle.flatten_inputs(inputs))
        logits = bundle.run_segments(k, bundle.n_segments, frontier)
        return [frontier[0].float(), logits[0].float()]

    started = time.perf_counter()
    (frontiers, logits), views = teacher_views(training, run, options, label="bottleneck views")
    scale = float(frontiers.var()) or 1.0
    target = torch.log_softmax(logits, dim=1)
    module = Bottleneck(int(frontiers.shape[1]), latent, bits)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = frontiers[idx]
        rebuilt = module(x)
        out = bundle.run_segments(k, bundle.n_segments, (rebuilt,))[0]
        kl = nn.functional.kl_div(
            torch.log_softmax(out, dim=1), target[idx], log_target=True, reduction="batchmean"
        )
        return nn.functional.mse_loss(rebuilt, x) / scale + weight * kl

    record = fit(module, loss_of, int(frontiers.shape[0]), options, label="bottleneck")
    record.update(views, latent=latent, bits=bits, seconds=round(time.perf_counter() - started, 2))
    return module, record
