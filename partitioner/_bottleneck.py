"""A trained bottleneck at a cut (issue 32, item 3): an encoder on the device and a decoder in
the cloud around a few-channel, low-bit latent, trained with the model frozen.

It is the codec ``bn<latent>q<bits>[+zstd<level>|+ans]`` (``compression/_bottleneck.py``):
``compile(..., training=..., bottleneck_cuts=[k], codecs=[..., "bn8q2+zstd3"])`` trains one
per cut and codec base (:func:`train_bottleneck`) and stores its encoder and decoder as
torch.export programs, and ONNX models where the bundle has ONNX (:func:`export_bottleneck`);
the fidelity table, the profile and the policies treat it like any codec (docs/learning.md).

- encoder: 3x3 conv, ReLU, 1x1 conv to ``latent`` channels, a sigmoid scaled to the ``bits``
  levels and rounded (straight-through in training): the codes are integers in
  ``0..2**bits - 1``, ``latent x H x W`` per input;
- entropy stage: the codec's (packed codes, ``+zstd<level>`` or ``+ans``); :func:`latent_bytes`
  measures the codes as bytes through zstd (level 3), as ``benchmarks/bench_learned.py`` does;
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

from splitinfer.compression import TrainedBottleneck
from splitinfer.errors import ConfigError
from splitinfer.partitioner._learn import Training, fit, teacher_views

__all__ = ["Bottleneck", "BottleneckPart", "bottleneck_id", "latent_bytes", "train_bottleneck", "trained"]


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


class BottleneckPart(nn.Module):
    """One side of a trained bottleneck as the module exported into the bundle: the encoder
    (frontier to rounded codes) or the decoder (codes, as floats, to the frontier)."""

    def __init__(self, bottleneck: Bottleneck, part: str):
        super().__init__()
        if part not in ("encoder", "decoder"):
            raise ConfigError(f"a bottleneck's part is 'encoder' or 'decoder', got {part!r}")
        self.bottleneck = bottleneck
        self.part = part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == "encoder":
            return torch.round(torch.sigmoid(self.bottleneck.encoder(x)) * self.bottleneck.levels)
        return self.bottleneck.decode(x)


def bottleneck_id(module: Bottleneck, frontier: Sequence[int], code: Sequence[int], bits: int) -> str:
    """8 hex digits naming a trained bottleneck: the sha256 of its shapes and parameters (the
    blobs carry it, so a cloud holding another bottleneck refuses them)."""
    import hashlib

    h = hashlib.sha256(f"bn {list(frontier)} {list(code)} {bits}".encode())
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:8]


def trained(module: Bottleneck, frontier: Sequence[int], bits: int) -> TrainedBottleneck:
    """``module`` as the compression room's :class:`TrainedBottleneck` (numpy functions of its
    eager encoder and decoder; a bundle binds the exported ones instead)."""
    module.eval()
    encoder, decoder = BottleneckPart(module, "encoder"), BottleneckPart(module, "decoder")
    with torch.no_grad():
        code = tuple(int(d) for d in encoder(torch.zeros(1, *frontier)).shape[1:])

    def run(part: nn.Module) -> Any:
        def call(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return part(torch.from_numpy(x)).numpy()

        return call

    return TrainedBottleneck(
        bottleneck_id(module, frontier, code, bits), tuple(frontier), code, bits, run(encoder), run(decoder)
    )


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
