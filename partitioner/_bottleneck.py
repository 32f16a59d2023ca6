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
- start (:func:`principal_start`): the encoder's codes begin as the frontier's first ``latent``
  principal components (of its channel vectors, over the training frontiers), each spread over
  the levels by its standard deviation, and the decoder as their inverse, so that the first
  steps refine a PCA codec instead of learning from random weights;
- loss: the frontier's reconstruction (MSE over its variance) plus the KL divergence of the
  frozen tail's output from the teacher's (no labels), on the ``training=`` inputs' frontiers,
  and optionally (``rate > 0``) the codes' estimated bits per code (:func:`soft_entropy`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from splitinfer.compression import TrainedBottleneck
from splitinfer.errors import ConfigError
from splitinfer.partitioner._learn import Training, fit, teacher_views

log = logging.getLogger("splitinfer.partitioner")

#: A principal start is refined at this share of the training's learning rate: at the full
#: 3e-3, 20 Adam steps took EfficientNet-Lite0's bn16q4 at cut 57 from 43 % agreement (the PCA
#: start alone) to 0 %, at 1e-4 to 49 % (96 photos; docs/learning.md).
PRINCIPAL_LR = 1 / 30
#: Training views the loss is compared on before and after the fit (the start is kept if the
#: fit made it worse).
PROBE_VIEWS = 64

__all__ = [
    "Bottleneck",
    "BottleneckPart",
    "bottleneck_id",
    "latent_bytes",
    "principal_start",
    "soft_entropy",
    "train_bottleneck",
    "trained",
]


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

    @property
    def latent(self) -> int:
        """Channels of the code."""
        conv = self.encoder[2]
        assert isinstance(conv, nn.Conv2d)
        return conv.out_channels

    def soft_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The codes before rounding (floats in ``0..levels``): what the rate term prices."""
        return torch.sigmoid(self.encoder(x)) * self.levels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes (float tensor of integers in ``0..levels``), straight-through when training."""
        z = torch.sigmoid(self.encoder(x)) * self.levels
        return z + (torch.round(z) - z).detach()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes / self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


#: Most channel vectors :func:`principal_start` reads (evenly spaced beyond that).
_START_VECTORS = 1 << 16
#: The codes' logits span +-SPREAD standard deviations of a component per unit (sigmoid(1.5) = 0.82).
_SPREAD = 2.0


def principal_start(module: Bottleneck, frontiers: torch.Tensor) -> None:
    """Set ``module``'s weights so that it is, up to the sigmoid's curve, a PCA codec of
    ``frontiers`` (``N x C x H x W``): the encoder's 3x3 conv the identity shifted by each
    channel's minimum (so the ReLU passes everything), its 1x1 conv the first ``latent``
    principal components scaled by ``1 / (SPREAD * sd)``; the decoder the inverse of the
    sigmoid's linear part, the components' transpose, and the shift back."""
    c, latent = int(frontiers.shape[1]), module.latent
    x = frontiers.detach().permute(0, 2, 3, 1).reshape(-1, c).double()
    if x.shape[0] > _START_VECTORS:
        x = x[torch.linspace(0, x.shape[0] - 1, _START_VECTORS).long()]
    mean, lo = x.mean(0), x.min(0).values
    centred = x - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / max(1, x.shape[0] - 1))
    order = torch.argsort(values, descending=True)[: min(latent, c)]
    w = torch.zeros(latent, c, dtype=torch.float64)
    w[: len(order)] = vectors[:, order].T
    sd = torch.ones(latent, dtype=torch.float64)
    sd[: len(order)] = values[order].clamp(min=1e-12).sqrt()
    scale = 1 / (_SPREAD * sd)
    gain = 4 * _SPREAD * sd  # sigmoid(z) ~ 1/2 + z/4
    identity = torch.zeros(c, c, 3, 3, dtype=torch.float64)
    identity[range(c), range(c), 1, 1] = 1
    layers = [
        (module.encoder[0], identity, -lo),
        (module.encoder[2], (w * scale[:, None])[:, :, None, None], -(w @ (mean - lo)) * scale),
        (module.decoder[0], (w.T * gain[None, :])[:, :, None, None], mean - lo - w.T @ (gain / 2)),
        (module.decoder[2], identity, lo),
    ]
    with torch.no_grad():
        for conv, weight, bias in layers:
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            conv.weight.copy_(weight.to(conv.weight.dtype))
            conv.bias.copy_(bias.to(conv.bias.dtype))


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
    start: str = "principal",
    rate: float = 0.0,
) -> tuple[Bottleneck, dict[str, Any]]:
    """A bottleneck at cut ``k`` trained on ``training`` (the frontier there and the teacher's
    logits per view) with the bundle's segments frozen; the record of its training.

    The loss is the frontier's reconstruction (MSE over its variance), ``weight`` times the KL
    divergence of the frozen tail's output from the teacher's (gradients flow through the
    tail's segments, which stay as they are), and ``rate`` times the codes' estimated bits per
    code in the batch (:func:`soft_entropy`; 0: no rate term, the rate is then set by ``latent``
    and ``bits``).
    ``start``: ``"principal"`` (:func:`principal_start`) or ``"random"`` (PyTorch's init)."""
    if start not in ("principal", "random"):
        raise ConfigError(f"a bottleneck starts 'principal' or 'random', got {start!r}")
    if not rate >= 0 or not weight >= 0:
        raise ConfigError(
            f"a bottleneck's loss weights are numbers >= 0, got weight={weight!r}, rate={rate!r}"
        )
    cut = bundle.cut(k)
    if len(cut.tensors) != 1 or len(cut.tensors[0].shape) != 4:
        raise ConfigError(
            f"a bottleneck reads one N x C x H x W frontier; cut {k} has {list(map(str, cut.tensors))}"
        )
    tail = _frozen_tail(bundle, k)

    def run(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        frontier = bundle.run_segments(0, k, bundle.flatten_inputs(inputs))
        logits = bundle.run_segments(k, bundle.n_segments, frontier)
        return [frontier[0].float(), logits[0].float()]

    started = time.perf_counter()
    (frontiers, logits), views = teacher_views(training, run, options, label="bottleneck views")
    scale = float(frontiers.var()) or 1.0
    target = torch.log_softmax(logits, dim=1)
    torch.manual_seed(options.seed)
    module = Bottleneck(int(frontiers.shape[1]), latent, bits)
    if start == "principal":
        principal_start(module, frontiers)
    estimated: list[float] = []

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = frontiers[idx]
        rebuilt = module(x)
        loss = nn.functional.mse_loss(rebuilt, x) / scale
        if weight > 0:
            out = tail(rebuilt)
            kl = nn.functional.kl_div(
                torch.log_softmax(out, dim=1), target[idx], log_target=True, reduction="batchmean"
            )
            loss = loss + weight * kl
        if rate > 0:
            bits_per_code = soft_entropy(module.soft_codes(x), module.levels + 1)
            estimated.append(float(bits_per_code.detach()))
            loss = loss + rate * bits_per_code
        return loss

    n = int(frontiers.shape[0])
    probe = torch.arange(min(n, PROBE_VIEWS))
    with torch.no_grad():
        before, kept = float(loss_of(probe)), copy.deepcopy(module.state_dict())
    if start == "principal":  # refine the PCA codec, do not relearn it
        options = dataclasses.replace(options, lr=options.lr * PRINCIPAL_LR)
    record = fit(module, loss_of, n, options, label="bottleneck")
    with torch.no_grad():
        after = float(loss_of(probe))
    if not after <= before:  # the fit made it worse (or diverged): keep the start
        module.load_state_dict(kept)
        log.warning(
            "bottleneck at cut %d: the fit's loss on %d training views rose from %.4g to %.4g; the "
            "%s start is kept",
            k,
            len(probe),
            before,
            after,
            start,
        )
    record.update(probe_loss=[round(before, 5), round(min(before, after), 5)], kept_start=not after <= before)
    record.update(
        views, latent=latent, bits=bits, start=start, seconds=round(time.perf_counter() - started, 2)
    )
    if rate > 0:
        record.update(rate=rate, bits_per_code=round(estimated[-1], 4))
    return module, record


#: Width of the soft assignment of a continuous code to the levels (in levels squared).
TEMPERATURE = 0.5


def soft_entropy(z: torch.Tensor, levels: int) -> torch.Tensor:
    """The estimated bits per code of continuous codes ``z`` (``N x latent x h x w``, floats in
    ``0..levels - 1``): each code softly assigned to the levels (``softmax(-(z - s)**2 /
    TEMPERATURE)``), the assignments averaged per code channel over the batch into a
    distribution, and its entropy averaged over the channels. Differentiable: minimising it
    moves each channel's codes onto few levels, which the entropy stage then codes in few bits
    (``+ans`` codes each channel under its own table)."""
    grid = torch.arange(levels, dtype=z.dtype, device=z.device)
    soft = torch.softmax(-((z.unsqueeze(-1) - grid) ** 2) / TEMPERATURE, dim=-1)
    p = soft.transpose(0, 1).reshape(z.shape[1], -1, levels).mean(dim=1)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(dim=1).mean()


def _frozen_tail(bundle: Any, k: int) -> Any:
    """The bundle's segments from cut ``k`` as a function that autograd sees through (the
    bundle's own ``run_segments`` runs in inference mode); their parameters are not trained."""
    segments = [bundle.segments[i] for i in range(k, bundle.n_segments)]
    if any(s is None or not isinstance(s, nn.Module) for s in segments):
        raise ConfigError(
            f"a bottleneck trains on torch segments from cut {k} on: compile's bundle, or a full load"
        )
    for segment in segments:
        for p in segment.parameters():
            p.requires_grad_(False)

    def run(x: torch.Tensor) -> torch.Tensor:
        frontier: Any = (x,)
        for segment in segments:
            frontier = tuple(segment(*frontier))
        return frontier[0]

    return run
