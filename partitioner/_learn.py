"""Learning from the user's unlabelled inputs: augmentation, the teacher's views and a
distillation loop (issue 32; docs/learning.md).

Everything here trains small modules beside a frozen, compiled model: the model itself (its
segments) is the teacher and never changes, so a bundle compiled with training data computes
the same answers at every cut as one compiled without. The loop is two stages:

1. *views*: each training input (images: in randomly resized crops, flipped, colour-jittered;
   other inputs: as they are) runs once through the frozen chain; what a student needs from it
   (for an exit head: the pooled frontier at its cut and the final logits) is kept. The time
   budget bounds this stage, which holds nearly all of the compute;
2. *fit*: the students are trained on the kept views with Adam for a number of steps (the
   step budget), minibatches drawn with the seed, the loss logged.

A seed makes both stages repeatable on one machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitinfer._progress import Progress
from splitinfer.errors import ConfigError

log = logging.getLogger("splitinfer.partitioner")

__all__ = ["Training", "augment_images", "fit", "image_like", "teacher_views"]


@dataclass(frozen=True)
class Training:
    """How compile trains on ``training=`` inputs (the keywords of :func:`splitinfer.compile`).

    ``views``: how many times each input is seen by the teacher (the first view plain, the others
    augmented where the inputs are images); ``seconds``: a budget for that stage (the views stop
    when it is spent, at least one per input); ``steps``: optimizer steps of the fit; ``batch``:
    its minibatch; ``seed``: of the augmentation and the minibatches; ``augment``: ``"auto"``
    (images only), ``"images"`` or ``"none"``.
    """

    steps: int = 400
    seconds: float | None = None
    views: int = 4
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    augment: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"train_steps must be an int >= 1, got {self.steps!r}")
        if self.seconds is not None and not (isinstance(self.seconds, int | float) and self.seconds > 0):
            raise ConfigError(f"train_seconds must be a number > 0 (or None), got {self.seconds!r}")
        if not isinstance(self.views, int) or self.views < 1:
            raise ConfigError(f"train_views must be an int >= 1, got {self.views!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if self.augment not in ("auto", "images", "none"):
            raise ConfigError(f"augment must be 'auto', 'images' or 'none', got {self.augment!r}")


def image_like(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the model takes one float image batch ``N x 3 x H x W`` (augmentation applies)."""
    return (
        len(inputs) == 1
        and inputs[0].is_floating_point()
        and inputs[0].dim() == 4
        and inputs[0].shape[1] == 3
    )


def augment_images(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` (``N x 3 x H x W``, any normalisation) in a random resized crop (8-100 % of the area,
    aspect 3/4-4/3, resized back bilinearly), flipped left-right half the time, with brightness,
    contrast and saturation jittered by up to 20 % each. Torch only (no torchvision)."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    r = torch.rand(n, 8, generator=gen)
    for i in range(n):
        area = h * w * (0.08 + 0.92 * float(r[i, 0]))
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(r[i, 1]))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        top = int(float(r[i, 2]) * (h - ch + 1))
        left = int(float(r[i, 3]) * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if float(r[i, 4]) < 0.5:
            crop = crop.flip(-1)
        mean = crop.mean(dim=(1, 2, 3), keepdim=True)
        crop = mean + (crop - mean) * (0.8 + 0.4 * float(r[i, 5]))  # contrast
        gray = crop.mean(dim=1, keepdim=True)
        crop = gray + (crop - gray) * (0.8 + 0.4 * float(r[i, 6]))  # saturation
        crop = crop + (float(r[i, 7]) - 0.5) * 0.4 * crop.std().clamp(min=1e-6)  # brightness
        out[i] = crop[0]
    return out


def teacher_views(
    rows: Sequence[tuple[torch.Tensor, ...]],
    run: Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]],
    options: Training,
    *,
    label: str = "teacher",
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """What ``run`` keeps (a list of tensors, batch first) for each view of the training ``rows``,
    concatenated along the batch, and a record of the stage (views, seconds, augmented).

    View 0 is the rows as given; later views are augmented (images) or skipped (other inputs:
    repeats teach nothing). Stops after the view in which ``options.seconds`` runs out.
    """
    augment = options.augment == "images" or (options.augment == "auto" and image_like(rows[0]))
    views = options.views if augment else 1
    gen = torch.Generator().manual_seed(options.seed)
    batch = tuple(torch.cat([r[j] for r in rows]) for j in range(len(rows[0])))
    n = batch[0].shape[0]
    kept: list[list[torch.Tensor]] = []
    started = time.perf_counter()
    done = 0
    chunk = 16
    with torch.no_grad(), Progress(views * n, label, enabled=options.progress) as bar:
        for v in range(views):
            for lo in range(0, n, chunk):
                part = tuple(t[lo : lo + chunk] for t in batch)
                if v > 0:
                    part = (augment_images(part[0], gen),)
                kept.append(run(part))
                bar.step(part[0].shape[0])
            done = v + 1
            if options.seconds is not None and time.perf_counter() - started > options.seconds:
                break
    columns = [torch.cat([k[j] for k in kept]) for j in range(len(kept[0]))]
    record = {
        "inputs": n,
        "views": done,
        "augmented": augment,
        "teacher_seconds": round(time.perf_counter() - started, 2),
    }
    return columns, record


def fit(
    students: torch.nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    options: Training,
    *,
    label: str = "fit",
) -> dict[str, Any]:
    """Train ``students`` (their parameters, with Adam) for ``options.steps`` steps on minibatch
    indices into ``n`` kept views: ``loss_of(indices)`` returns the loss. Returns the record of
    the fit: steps, seconds and the loss logged every tenth of the run (first and last included)."""
    torch.manual_seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed + 1)
    students.train()
    optimizer = torch.optim.Adam([p for p in students.parameters() if p.requires_grad], lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    losses: list[list[float]] = []
    every = max(1, options.steps // 10)
    started = time.perf_counter()
    with torch.enable_grad(), Progress(options.steps, label, enabled=options.progress) as bar:
        for step in range(options.steps):
            idx = torch.randint(0, n, (min(options.batch, n),), generator=gen)
            loss = loss_of(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            if step % every == 0 or step == options.steps - 1:
                losses.append([step, round(value, 5)])
                log.info("%s step %d/%d loss %.4f", label, step + 1, options.steps, value)
            bar.step(note=f"loss {value:.4f}")
    students.eval()
    return {"steps": options.steps, "fit_seconds": round(time.perf_counter() - started, 2), "loss": losses}
