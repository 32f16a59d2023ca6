"""Early exits: small classifiers at cuts, distilled from the model's own output (issue 32).

An exit at cut ``k`` is a head on the frontier there: global average pooling (a ``N x C x H x W``
frontier; a ``N x C`` one is used as it is), a LayerNorm and a two-layer classifier to the
model's classes. It is trained to match the frozen model's output distribution (KL divergence to
the teacher's softmax; no labels) on the ``training=`` inputs (:mod:`._learn`), and its
confidence threshold (the largest softmax probability) is calibrated on held-out inputs: the
lowest threshold whose exited answers agree with the full model's top-1 at a Wilson lower bound
(one-sided ``confidence``) of at least the fidelity budget. An exit whose answers cannot show
the budget at any threshold is recorded without a threshold and never answers.

Refusals (documented in docs/learning.md): an exit needs the model's output to be one float
tensor ``N x K`` (a classifier's logits; :func:`output_refusal`) and the frontier at its cut to
be one float tensor ``N x C x H x W`` or ``N x C`` (:func:`frontier_refusal`). Cuts the user
names are refused with a ConfigError saying why; cuts compile picks are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from splitinfer.errors import ConfigError
from splitinfer.manifest import Cut, Manifest, exit_file
from splitinfer.partitioner._intervals import wilson
from splitinfer.partitioner._learn import Training, fit, teacher_views

log = logging.getLogger("splitinfer.partitioner")

__all__ = [
    "ExitHead",
    "calibrate_threshold",
    "exit_confidence",
    "exit_file",
    "feature_cut",
    "frontier_refusal",
    "output_refusal",
    "pick_exits",
    "train_exits",
]

#: Width of the exit's hidden layer (at most; a narrow frontier gets its own width).
HIDDEN = 256
#: How many cuts compile picks when the user names none.
PICKED = 2


class ExitHead(nn.Module):
    """Pooling, LayerNorm and a two-layer classifier: frontier ``N x C (x H x W)`` to logits ``N x K``.

    With ``tail`` (the model's own frozen segments from a feature cut, a ``N x D`` frontier
    such as the pooled features before the classifier, to the output), the two layers map to
    those ``D`` features and the model's own classifier gives the logits: the head then learns
    a regression that carries over to classes its training inputs never showed, which a
    ``K``-way classifier trained on a few hundred photos of some classes cannot.
    """

    def __init__(self, channels: int, classes: int, tail: Sequence[nn.Module] = (), features: int = 0):
        super().__init__()
        hidden = min(HIDDEN, max(32, channels))
        self.norm = nn.LayerNorm(channels)
        out = features if tail else classes
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, out))
        self.tail = nn.ModuleList(tail)
        for p in self.tail.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ExitHead:
        """Train mode for the head's own layers; the model's segments stay as exported."""
        self.training = mode
        self.norm.train(mode)
        self.classifier.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        return self.from_pooled(x)

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.classifier(self.norm(pooled)))

    def from_features(self, y: torch.Tensor) -> torch.Tensor:
        """The logits from the two layers' output: through the model's own segments, if any."""
        if len(self.tail):
            frontier: Any = (y,)
            for segment in self.tail:
                frontier = tuple(segment(*frontier))
            y = frontier[0]
        return y


def feature_cut(manifest: Manifest, after: int) -> int | None:
    """The last cut after ``after`` (and before the output) whose frontier is one float ``N x D``
    tensor: where an exit hands over to the model's own classifier; None if there is none."""
    found = None
    for c in manifest.cuts[after + 1 : manifest.last_cut]:
        if len(c.tensors) == 1 and len(c.tensors[0].shape) == 2 and c.tensors[0].dtype.startswith("float"):
            found = c.index
    return found


def output_refusal(manifest: Manifest) -> str | None:
    """Why no exit can give this model's answer, or None: it must be one float tensor ``N x K``."""
    outputs = manifest.cut(manifest.last_cut).tensors
    if len(outputs) != 1:
        return f"the model has {len(outputs)} outputs; an exit answers for one (a classifier's logits N x K)"
    spec = outputs[0]
    if len(spec.shape) != 2 or not spec.dtype.startswith(("float", "bfloat")) or (spec.shape[1] or 0) < 2:
        return f"the model's output is {spec}; an exit gives a classifier's logits, float N x K with K >= 2"
    return None


def frontier_refusal(cut: Cut) -> str | None:
    """Why no exit head can read the frontier at ``cut``, or None (one float N x C x H x W or N x C)."""
    if len(cut.tensors) != 1:
        return (
            f"its frontier has {len(cut.tensors)} tensors (inside a residual or multi-branch block); an exit "
            "reads one N x C x H x W or N x C tensor: choose the cut after the block"
        )
    spec = cut.tensors[0]
    if len(spec.shape) not in (2, 4) or not spec.dtype.startswith(("float", "bfloat")):
        return f"its frontier is {spec}; an exit reads one float N x C x H x W or N x C tensor"
    return None


def pick_exits(manifest: Manifest, count: int = PICKED) -> list[int]:
    """The cuts compile offers exits at when the user names none: among the cuts a head can read,
    those nearest 1/2 and 3/4 of the chain's segments (the head's cost grows along the chain,
    an exit's agreement too; with a profile, of its measured head time)."""
    last = manifest.last_cut
    servable = [c.index for c in manifest.cuts if 0 < c.index < last and frontier_refusal(c) is None]
    if not servable:
        return []
    cost = _head_costs(manifest)
    total = cost[last] or 1.0
    chosen: list[int] = []
    for share in (0.5, 0.75)[:count]:
        best = min(servable, key=lambda k: (abs(cost[k] / total - share), k))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def _head_costs(manifest: Manifest) -> list[float]:
    """Cumulative head cost per cut: profiled segment times where there is a profile, else one per segment."""
    times: list[float] | None = None
    for profile in manifest.profiles.values():
        segs = profile.get("segments") if isinstance(profile, dict) else None
        medians = (segs.get("1") or {}).get("median_s") if isinstance(segs, dict) else None
        if isinstance(medians, list) and len(medians) == manifest.n_segments:
            times = [float(t) for t in medians]
            break
    per = times or [1.0] * manifest.n_segments
    out = [0.0]
    for t in per:
        out.append(out[-1] + t)
    return out


def calibrate_threshold(
    confidences: Sequence[float], agree: Sequence[bool], budget: float, confidence: float
) -> tuple[float | None, int, int]:
    """The lowest confidence threshold at which the inputs that exit (confidence >= threshold)
    agree with the full model at a Wilson lower bound >= ``budget``: (threshold, exited,
    agreeing); (None, 0, 0) when no threshold shows it. The threshold lies midway between the
    last input that exits and the next below it, so that rounding at run time cannot move an
    input across it."""
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    best: tuple[float | None, int, int] = (None, 0, 0)
    agreeing = 0
    for rank, i in enumerate(order, start=1):
        agreeing += bool(agree[i])
        if rank < len(order) and confidences[order[rank]] == confidences[i]:
            continue  # ties exit together
        if wilson(agreeing / rank, rank, confidence)[0] >= budget:
            below = confidences[order[rank]] if rank < len(order) else max(0.0, confidences[i] - 1e-6)
            best = ((float(confidences[i]) + float(below)) / 2, rank, agreeing)
    return best


def exit_confidence(logits: Any) -> Any:
    """The largest softmax probability per row of ``logits`` (numpy, float64): what a threshold is
    compared with, at calibration and at run time alike."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    z = np.exp(values - values.max(axis=1, keepdims=True))
    return z.max(axis=1) / z.sum(axis=1)


def _check_cuts(manifest: Manifest, cuts: Sequence[int]) -> None:
    last = manifest.last_cut
    for k in cuts:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k < last:
            raise ConfigError(
                f"exits are placed at cuts 1..{last - 1} (between the input and the output), got {k!r}"
            )
        reason = frontier_refusal(manifest.cut(k))
        if reason:
            raise ConfigError(f"no exit at cut {k} ({manifest.cut(k).name}): {reason}")


def train_exits(
    bundle: Any,
    training: Sequence[tuple[torch.Tensor, ...]],
    held_out: Sequence[tuple[torch.Tensor, ...]],
    held_out_from: str,
    cuts: Sequence[int] | None,
    options: Training,
    budget: float,
    confidence: float,
    *,
    feature_weight: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[int, ExitHead]]:
    """Exit heads at ``cuts`` (None: :func:`pick_exits`) trained on ``training`` and calibrated
    on ``held_out``: the manifest's ``exits`` entries and the trained heads by cut (every one;
    compile keeps those with a threshold).

    ``feature_weight`` > 0 (an experiment, measured by ``benchmarks/bench_learned.py
    --feature-weight``; compile leaves it 0) adds, for heads that hand over to the model's own
    classifier at a feature cut, the mean squared error of their features against the
    teacher's there (over the teacher features' variance) times that weight to the loss."""
    reason = output_refusal(bundle)
    if reason:
        if cuts:
            raise ConfigError(f"no early exits for {bundle.name!r}: {reason}")
        log.warning("no early exits for %r: %s", bundle.name, reason)
        return [], {}
    if cuts:
        _check_cuts(bundle, cuts)
        chosen = sorted(set(cuts))
    else:
        chosen = pick_exits(bundle)
    if not chosen:
        log.warning(
            "no early exits for %r: no cut's frontier is one N x C x H x W or N x C tensor", bundle.name
        )
        return [], {}
    at = feature_cut(bundle, min(chosen)) if feature_weight > 0 else None
    (*pooled, logits), views = teacher_views(
        training, _pooled_runner(bundle, chosen, at), options, label="exit views"
    )
    features = pooled.pop() if at is not None else None
    classes = int(logits.shape[1])
    heads = nn.ModuleDict(
        {str(k): _new_head(bundle, k, int(p.shape[1]), classes) for k, p in zip(chosen, pooled)}
    )
    target = torch.log_softmax(logits.float(), dim=1)
    scale = float(features.var()) if features is not None else 1.0

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for k, p in zip(chosen, pooled):
            head = _head(heads, k)
            y = head.classifier(head.norm(p[idx].float()))
            out = torch.log_softmax(head.from_features(y), dim=1)
            total = total + nn.functional.kl_div(out, target[idx], log_target=True, reduction="batchmean")
            if features is not None and len(head.tail) and feature_cut(bundle, k) == at:
                mse = nn.functional.mse_loss(y, features[idx])
                total = total + feature_weight * mse / max(scale, 1e-12)
        return total

    record = fit(heads, loss_of, int(logits.shape[0]), options, label="exit heads")
    (*held_pooled, held_logits), _ = teacher_views(
        held_out, _pooled_runner(bundle, chosen), Training(views=1, augment="none"), label="exit held out"
    )
    want = held_logits.argmax(dim=1)
    entries = []
    with torch.no_grad():
        for k, p in zip(chosen, held_pooled):
            logits_k = _head(heads, k).from_pooled(p.float())
            conf = exit_confidence(logits_k.numpy())
            agree = (logits_k.argmax(dim=1) == want).tolist()
            threshold, exited, agreeing = calibrate_threshold(conf.tolist(), agree, budget, confidence)
            n = len(agree)
            lo, hi = wilson(agreeing / exited, exited, confidence) if exited else (0.0, 1.0)
            entries.append(
                {
                    "cut": k,
                    "name": bundle.cut(k).name,
                    "file": exit_file(k) if threshold is not None else None,
                    "classes": classes,
                    "threshold": threshold,
                    "exit_rate": round(exited / n, 6),
                    "agreement": round(agreeing / exited, 6) if exited else None,
                    "n": exited,
                    "lo": round(lo, 6),
                    "hi": round(hi, 6),
                    "samples": n,
                    "head_agreement": round(sum(agree) / n, 6),
                    "budget": budget,
                    "confidence": confidence,
                    "held_out_from": held_out_from,
                    "training": {
                        **views,
                        **record,
                        "seconds": round(views["teacher_seconds"] + record["fit_seconds"], 2),
                        "seed": options.seed,
                    },
                }
            )
            if threshold is None:
                log.warning(
                    "exit at cut %d: no threshold shows agreement >= %g at confidence %g on %d held-out "
                    "input(s) (the head agrees on %.1f%% of them); it is recorded and never answers",
                    k,
                    budget,
                    confidence,
                    n,
                    100 * sum(agree) / n,
                )
    return entries, {k: _head(heads, k) for k in chosen}


def _new_head(bundle: Any, k: int, channels: int, classes: int) -> ExitHead:
    """The head at cut ``k``: onto the model's own classifier where a feature cut follows."""
    at = feature_cut(bundle, k)
    if at is None:
        return ExitHead(channels, classes)
    tail = [bundle.segments[i] for i in range(at, bundle.n_segments)]
    features = int(bundle.cut(at).tensors[0].shape[1] or 0)
    return ExitHead(channels, classes, tail, features)


def _head(heads: nn.ModuleDict, k: int) -> ExitHead:
    head = heads[str(k)]
    assert isinstance(head, ExitHead)
    return head


def _pooled_runner(bundle: Any, cuts: Sequence[int], features_at: int | None = None) -> Any:
    """A function of a batch of inputs: the pooled frontier at each of ``cuts``, the frontier at
    ``features_at`` (when given) and the logits."""
    wanted = set(cuts)

    def run(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        frontier: tuple[torch.Tensor, ...] = bundle.flatten_inputs(inputs)
        kept, features = [], []
        for i, segment in enumerate(bundle.segments):
            if i in wanted:
                t = frontier[0]
                kept.append(t.float().mean(dim=(2, 3)) if t.dim() == 4 else t.float())
            if i == features_at:
                features.append(frontier[0].float())
            frontier = tuple(segment(*frontier))
        return [*kept, *features, frontier[0].float()]

    return run
