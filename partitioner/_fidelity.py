"""The fidelity table: for every cut and codec, agreement with the uncompressed model and bytes.

Contract: ``measure(bundle, inputs, codecs, evaluation=None)`` requires a bundle with every
segment loaded and calibration inputs (model input tuples, batch first); it returns the
``fidelity``, ``calibration``, ``dictionaries`` and ``projections`` that the manifest stores
(docs/bundle-format.md). Clip ranges and dictionaries are fitted on ``inputs``; agreement and
bytes are measured on ``evaluation`` when given (held out: inputs the ranges never saw, so the
table says what production traffic will get), else on ``inputs`` themselves (in-sample, as
in older bundles). Every row carries a 95 % confidence interval on its agreement (Wilson score
interval for top-1, normal approximation for cosine similarity) and the table the number of
inputs it was measured on:

- clip ranges of each quantizing codec, per cut, calibrated on the frontiers of the inputs;
  with ``method="auto"`` every method (min/max, percentile, MSE) is tried and the one whose
  decoded frontier gives outputs closest to the uncompressed model's wins (see below);
- fidelity of each (cut, lossy codec): top-1 agreement with the uncompressed model for a
  classifier (one output of shape ``(batch, classes)``), mean cosine similarity of the outputs
  otherwise, measured by running the tail on the decoded frontier; lossless codecs score 1.0;
- bytes: mean encoded size of one request (batch 1), over up to ``bytes_samples`` inputs;
- channel projections: at each cut where a ``pca<r>q<bits>`` codec applies (a frontier of one
  floating tensor), one projection fitted on the calibration frontier (``compression.fit_projection``),
  shared by every pca codec of the cut (each keeps its first ``r`` components);
- trained bottlenecks (``bn<latent>q<bits>`` codecs): measured at the cuts where the bundle has
  one (compile trains them first, ``bottleneck_cuts``), whatever the frontier's size; elsewhere
  they have no row;
- zstd dictionaries (``dictionaries=True``): for each cut and ``+zstd`` codec, a dictionary
  trained on the calibration frontiers, tried only where the payload is at most
  :data:`DICT_MAX_BYTES` and kept only where it makes the payload measurably smaller
  (:data:`DICT_MIN_SAVING`) on ``bytes_samples`` inputs it was not trained on (evaluation
  inputs when held out, else the first calibration inputs, left out of its training).

Which cuts are measured: with ``all_cuts=False``, lossy codecs only at cuts whose float32
frontier is no larger than the model input's (cut 0 always); with ``True``, at every cut; with
``None`` (the default), the rule applies only to models of more than :data:`FULL_TABLE_CUTS`
cuts, where measuring everything would take many minutes. Such a cut uploads more than the raw
input would with the same codec family and adds device work before it; docs/partitioning.md
("Fidelity table") says when the policy could still want one and how to measure it. Lossless
codecs get rows at every cut. A (cut, lossy codec) without a row has unknown fidelity, which
the policies treat as infeasible.

Stopping early (``stop_below``, compile's ``fidelity_early_stop``): a top-1 table without labels can
measure its lossy rows in chunks of :data:`STOP_CHUNK` evaluation inputs and stop a row once it
cannot be admitted at the budget: the upper end of its interval (at ``confidence``) is below
the budget, or its misses so far keep the lower bound on all the evaluation inputs below the
budget even if every input not yet measured agreed (at 0.99 and 0.9 on 192 inputs: one miss).
Such a row's ``n`` is the inputs it was measured on; the table records ``stopped_below``. It
saves the tail runs of the rows that fail, so that the rows that may pass can be measured on
the many inputs their interval needs (163 without a miss to show 0.99 at 0.9). A policy run
later at a lower budget may find such rows too wide to admit: compile for the budget you run.

Cost: the head runs once per cut (frontier ``k + 1`` is computed from frontier ``k``); the
tail of cut ``k`` runs once per lossy codec family on the decoded frontiers of every variant
concatenated along the batch (up to :data:`ROWS_PER_CALL` rows a call), in channels-last
memory format (1.2-2x faster for EfficientNet-Lite0 on CPU). Choosing the calibration method
runs each candidate's tail on the first :data:`PROBE_SAMPLES` calibration inputs only; the
chosen ranges are then measured on all evaluation inputs. Pass inputs that look like
production traffic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from splitinfer._progress import Progress
from splitinfer.bundle import Bundle
from splitinfer.compression import (
    CALIBRATION_METHODS,
    ChannelProjection,
    ClipRanges,
    TrainedBottleneck,
    ZstdDictionary,
    calibrate_all,
    get_codec,
    parse_spec,
    payload_of,
)
from splitinfer.compression import MAX_PROJECTION_CHANNELS as MAX_CHANNELS
from splitinfer.compression import fit_projection as fit
from splitinfer.compression import train_dictionary as train
from splitinfer.errors import CodecError, ConfigError
from splitinfer.partitioner import _words as words
from splitinfer.partitioner._intervals import (
    DEFAULT_CONFIDENCE,
    INTERVAL_METHODS,
    drop_interval,
    mean_interval,
    wilson,
)

__all__ = [
    "DICT_MAX_BYTES",
    "DICT_MIN_SAVING",
    "FULL_TABLE_CUTS",
    "METHODS",
    "METRICS",
    "PROBE_SAMPLES",
    "ROWS_PER_CALL",
    "STOP_CHUNK",
    "measure",
]

METRICS = ("auto", "top1", "cosine")
METHODS = ("auto", *CALIBRATION_METHODS)
#: Inputs the candidate calibration methods are compared on (``method="auto"``).
PROBE_SAMPLES = 8
#: Models with at most this many cuts get lossy rows at every cut by default (``all_cuts=None``).
FULL_TABLE_CUTS = 32
#: Largest batch a tail runs at while measuring.
ROWS_PER_CALL = 64
#: Inputs a row is measured on between two looks at its interval (``stop_below``).
STOP_CHUNK = 32
#: A trained zstd dictionary is kept only if it saves at least this share of the payload.
DICT_MIN_SAVING = 0.03
#: Dictionaries are tried only for payloads up to this size (measured: larger ones gain nothing).
DICT_MAX_BYTES = 16 * 1024
#: Preference among methods whose outputs are equally close (simplest first).
_ORDER = {"minmax": 0, "percentile": 1, "mse": 2}

log = logging.getLogger("splitinfer.partitioner")

#: A channel projection is fitted only where the calibration gives at least this many channel
#: vectors a channel (inputs x positions >= 4 C). Fewer cannot estimate a C x C covariance: 32
#: crops of EfficientNet-Lite0's 1280 pooled features gave 31 components that carried all the
#: calibration energy and 0 % top-1 agreement on held-out photos, and a table measured on the
#: calibration inputs themselves would have said 100 %.
VECTORS_PER_CHANNEL = 4


def _base(spec: str) -> str:
    return spec.split("+", 1)[0]


def _is_lossless(spec: str) -> bool:
    return _base(spec) == "f32"


def _stack_inputs(bundle: Bundle, inputs: Iterable[Any]) -> tuple[torch.Tensor, ...]:
    rows: list[tuple[torch.Tensor, ...]] = []
    for item in inputs:
        item = item if isinstance(item, tuple | list) else (item,)
        rows.append(bundle.flatten_inputs(tuple(item)))
    if not rows:
        raise ConfigError("calibration needs at least one input")
    return tuple(torch.cat([r[i] for r in rows]) for i in range(len(rows[0])))


def _choose_metric(metric: str, outputs: Sequence[torch.Tensor]) -> str:
    if metric not in METRICS:
        raise ConfigError(f"fidelity metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric != "auto":
        return metric
    if len(outputs) == 1 and outputs[0].dim() == 2 and outputs[0].shape[1] > 1:
        return "top1"
    return "cosine"


def per_sample(metric: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample agreement (float64) of two sets of output leaves: 0/1 for top-1, else cosine."""
    if metric == "top1":
        return (got[0].argmax(1) == want[0].argmax(1)).double()
    a = torch.cat([g.reshape(g.shape[0], -1).double() for g in got], 1)
    b = torch.cat([w.reshape(w.shape[0], -1).double() for w in want], 1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def agreement(metric: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Mean per-sample agreement of two sets of output leaves."""
    return float(per_sample(metric, got, want).mean())


#: z of a two-sided 95 % interval.
_Z95 = 1.959964


def interval(metric: str, values: torch.Tensor) -> tuple[float, float]:
    """95 % confidence interval on the mean of per-sample agreements: the Wilson score interval
    for top-1 (0/1 values; right at 0 and 1, unlike the normal approximation), the normal
    approximation for cosine similarities, clipped to [-1, 1]."""
    n = int(values.numel())
    if n == 0:
        return (0.0, 1.0)
    mean = float(values.mean())
    if metric == "top1":
        z2 = _Z95 * _Z95
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return (max(0.0, centre - half), min(1.0, centre + half))
    sd = float(values.std()) if n > 1 else 0.0
    half = _Z95 * sd / math.sqrt(n)
    return (max(-1.0, mean - half), min(1.0, mean + half))


def _applies(spec: str, frontier: Sequence[torch.Tensor], cut: int, bundle: Bundle | None = None) -> bool:
    """JPEG only fits image batches at cut 0; a channel projection (pca) only a frontier of one
    floating tensor ``N x C x ...`` of at most MAX_CHANNELS channels; a trained bottleneck (bn)
    only the cuts ``bundle`` has one at; other codecs fit every frontier."""
    kind = parse_spec(spec).kind
    if kind == "bn":
        return bundle is not None and bundle.bottleneck_at(cut, spec) is not None
    if kind == "pca":
        return _projectable(frontier)
    if kind != "jpeg":
        return True
    return cut == 0 and all(t.dtype.is_floating_point and t.dim() == 4 and t.shape[1] == 3 for t in frontier)


def _projectable(frontier: Sequence[torch.Tensor]) -> bool:
    return (
        len(frontier) == 1
        and frontier[0].dtype.is_floating_point
        and frontier[0].dim() >= 2
        and 0 < frontier[0].shape[1] <= MAX_CHANNELS
    )


def _fast_layout(frontier: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """4-d float tensors in channels-last memory format (same values, faster convolutions)."""
    return tuple(
        t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.dtype.is_floating_point else t
        for t in frontier
    )


def _rows(frontier: Sequence[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    return [t[start:stop] for t in frontier]


def _run(bundle: Bundle, k: int, frontier: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The output leaves of the tail from cut ``k``, in batches of at most ROWS_PER_CALL rows."""
    total = frontier[0].shape[0]
    parts = []
    for start in range(0, total, ROWS_PER_CALL):
        chunk = _rows(frontier, start, start + ROWS_PER_CALL)
        try:
            out = bundle.run_segments(k, bundle.n_segments, _fast_layout(chunk))
        except RuntimeError:  # a tail that needs contiguous tensors (x.view(n, -1) after a conv)
            out = bundle.run_segments(k, bundle.n_segments, [t.contiguous() for t in chunk])
        parts.append(list(pytree.tree_leaves(list(out))))
    return [torch.cat(p) for p in zip(*parts)]


@dataclass(frozen=True)
class _Variant:
    base: str
    method: str  # "-" for casts and projections
    clip: ClipRanges | None
    projection: ChannelProjection | None = None
    bottleneck: TrainedBottleneck | None = None


def _codec(
    spec: str,
    clip: ClipRanges | None,
    projection: ChannelProjection | None,
    bottleneck: TrainedBottleneck | None = None,
) -> Any:
    kind = parse_spec(spec).kind
    if kind == "pca":
        return get_codec(spec, projection=projection)
    if kind == "bn":
        return get_codec(spec, bottleneck=bottleneck)
    return get_codec(spec, clip=clip)


def _trained(bundle: Bundle, k: int, spec: str) -> TrainedBottleneck | None:
    """The trained bottleneck a bn codec is bound to at cut ``k`` (None for other codecs)."""
    return bundle.bottleneck_at(k, spec) if parse_spec(spec).kind == "bn" else None


def _decode(bundle: Bundle, k: int, v: _Variant, frontier: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    codec = _codec(v.base, v.clip, v.projection, v.bottleneck)
    try:
        return codec.decode(codec.encode(list(frontier)))
    except CodecError as exc:
        raise ConfigError(f"codec {v.base} cannot encode cut {k} ({bundle.cuts[k].name}): {exc}") from exc


def _tails(
    bundle: Bundle, k: int, variants: Sequence[_Variant], frontier: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The tail's output leaves for each variant's decoded ``frontier``, variants concatenated
    along the batch so that one call serves several of them."""
    rows = frontier[0].shape[0]
    per_call = max(1, ROWS_PER_CALL // max(rows, 1))
    results: list[list[torch.Tensor]] = []
    for start in range(0, len(variants), per_call):
        group = [_decode(bundle, k, v, frontier) for v in variants[start : start + per_call]]
        batch = [torch.cat(ts) for ts in zip(*group)]
        outputs = _run(bundle, k, batch)
        for i in range(len(group)):
            results.append([o[i * rows : (i + 1) * rows] for o in outputs])
    return results


def _score(
    bundle: Bundle,
    k: int,
    variants: Sequence[_Variant],
    evaluated: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    target: torch.Tensor | None,
    metric: str,
    stop_below: float | None,
    confidence: float,
) -> dict[str, _Scores]:
    """Each variant's scores on the evaluated rows: all of them, or (``stop_below``) chunk by
    chunk while the variant may still be admitted at ``stop_below`` (:func:`_may_meet`)."""
    rows = int(evaluated[0].shape[0])
    if stop_below is None:
        outs = _tails(bundle, k, variants, evaluated)
        return {v.base: _Scores.of(metric, out, want, target) for v, out in zip(variants, outs)}
    hits: dict[str, list[torch.Tensor]] = {v.base: [] for v in variants}
    live = list(variants)
    for start in range(0, rows, STOP_CHUNK):
        stop = min(rows, start + STOP_CHUNK)
        chunk = [w[start:stop] for w in want]
        for v, out in zip(live, _tails(bundle, k, live, _rows(evaluated, start, stop))):
            hits[v.base].append(per_sample(metric, out, chunk))
        live = [v for v in live if _may_meet(torch.cat(hits[v.base]), rows, stop_below, confidence)]
        if not live:
            break
    return {b: _Scores(torch.cat(h)) for b, h in hits.items()}


def _may_meet(seen: torch.Tensor, rows: int, budget: float, confidence: float) -> bool:
    """Whether a row whose first inputs agreed as ``seen`` says may still be admitted at
    ``budget``: its interval's upper end is not below it, and the lower bound it would have if
    every one of the ``rows`` inputs not yet measured agreed is not below it either."""
    n, hits = int(seen.numel()), float(seen.sum())
    if wilson(hits / n, n, confidence)[1] < budget:
        return False
    return wilson((hits + rows - n) / rows, rows, confidence)[0] >= budget


def measure(
    bundle: Bundle,
    inputs: Iterable[Any],
    codecs: Sequence[str],
    *,
    method: str = "auto",
    metric: str = "auto",
    bytes_samples: int = 8,
    all_cuts: bool | None = None,
    dictionaries: bool = False,
    progress: bool = True,
    evaluation: Iterable[Any] | None = None,
    labels: Sequence[int] | None = None,
    hold_out: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
    stop_below: float | None = None,
) -> tuple[
    dict[str, Any], dict[str, Any], dict[str, dict[str, ZstdDictionary]], dict[str, ChannelProjection]
]:
    """The fidelity table, the calibrated clip ranges, the kept zstd dictionaries and the
    channel projections (module docstring); dictionaries map cut (as a string) and codec spec
    to a trained dictionary, projections cut to the projection its pca codecs use.
    ``evaluation`` (inputs like ``inputs``) holds the table's inputs out of the calibration;
    without it and with ``hold_out``, every second calibration input is held out instead (and
    the table says so: ``held_out_from: "calibration"``). ``labels`` (one class index per
    evaluation row, or per calibration row when the evaluation is held out of it) add top-1
    accuracy and its drop from the float model to every row. ``confidence`` is the one-sided
    level of the intervals stored (``_intervals.py``). ``stop_below`` (a top-1 agreement budget;
    top-1 tables without labels only) measures rows in chunks of :data:`STOP_CHUNK` inputs and
    stops a row once the upper end of its interval is below the budget (module docstring)."""
    if stop_below is not None and not 0 < stop_below <= 1:
        raise ConfigError(f"stop_below is a top-1 agreement in (0, 1], got {stop_below}")
    for spec in codecs:
        get_codec(spec)  # CodecError listing the valid forms for a bad spec
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    x = _stack_inputs(bundle, inputs)
    held_out_from = None
    if evaluation is not None:
        ev = _stack_inputs(bundle, evaluation)
    elif hold_out and int(x[0].shape[0]) >= 2:
        x, ev = tuple(t[0::2] for t in x), tuple(t[1::2] for t in x)
        labels = None if labels is None else list(labels)[1::2]
        held_out_from = "calibration"
    else:
        ev = None
    n_cal = int(x[0].shape[0])
    held_out = ev is not None
    if ev is not None:
        x = tuple(torch.cat(pair) for pair in zip(x, ev))
    total = int(x[0].shape[0])
    first = n_cal if held_out else 0  # evaluation rows: [first, total)
    if held_out_from:
        log.warning(
            "no %s inputs: the fidelity table of %r is measured on %d of the calibration inputs "
            "held out (every second one), the ranges calibrated on the other %d; pass %s for a table "
            "on inputs of their own",
            words.name("evaluation"),
            bundle.name,
            total - first,
            n_cal,
            words.example("evaluation"),
        )
    n = bundle.n_segments
    reference = _run(bundle, 0, x)
    want = [r[first:] for r in reference]
    metric, degenerate = _metric_for(bundle.name, metric, want)
    target = _labels(labels, want, total - first)
    if metric != "top1" or target is not None:
        stop_below = None  # an accuracy-drop or cosine budget is not an agreement: measure all
    methods = CALIBRATION_METHODS if method == "auto" else (method,)
    probe = min(n_cal, PROBE_SAMPLES)
    lossy_bases = sorted({_base(s) for s in codecs if not _is_lossless(s)})
    limit = bundle.cuts[0].nbytes
    if all_cuts is None:
        all_cuts = n <= FULL_TABLE_CUTS
    table: list[dict[str, Any]] = []
    ranges: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, ZstdDictionary]] = {}
    projections: dict[str, ChannelProjection] = {}
    unfit: list[tuple[int, int, int]] = []  # (cut, channels, calibration vectors) without pca rows
    frontier = x
    with Progress(n, "fidelity", enabled=progress) as bar, torch.inference_mode():
        for k in range(n):
            lossy_here = all_cuts or k == 0 or bundle.cuts[k].nbytes <= limit
            bases = [
                b
                for b in lossy_bases
                if (lossy_here or parse_spec(b).kind == "bn") and _applies(b, frontier, k, bundle)
            ]
            calibration = _rows(frontier, 0, n_cal)
            evaluated = _rows(frontier, first, total)
            clips = _choose_ranges(bundle, k, bases, methods, calibration, reference, metric, probe)
            for base, clip in clips.items():
                ranges.setdefault(str(k), {})[base] = clip.to_json()
            projection = None
            if any(parse_spec(b).kind == "pca" for b in bases):
                vectors = math.prod(calibration[0].shape[:1] + calibration[0].shape[2:])
                if vectors >= VECTORS_PER_CHANNEL * calibration[0].shape[1]:
                    projection = projections[str(k)] = fit(calibration)
                else:
                    unfit.append((k, calibration[0].shape[1], vectors))
                    bases = [b for b in bases if parse_spec(b).kind != "pca"]
            variants = [
                _Variant(
                    b,
                    "-" if b not in clips else clips[b].method,
                    clips.get(b),
                    projection,
                    _trained(bundle, k, b),
                )
                for b in bases
            ]
            scores = _score(bundle, k, variants, evaluated, want, target, metric, stop_below, confidence)
            samples = [_rows(frontier, i, i + 1) for i in range(first, total)]
            trained_on = [_rows(frontier, i, i + 1) for i in range(n_cal)] if held_out else None
            for spec in codecs:
                if not _applies(spec, frontier, k, bundle) or not (
                    _is_lossless(spec) or _base(spec) in scores
                ):
                    continue
                codec = _codec(spec, clips.get(_base(spec)), projection, _trained(bundle, k, spec))
                nbytes = _mean_bytes(codec, samples[:bytes_samples])
                measured = _Scores.exact(target, want) if _is_lossless(spec) else scores[_base(spec)]
                row = {
                    "cut": k,
                    "codec": spec,
                    **measured.row(metric, confidence),
                    "bytes": nbytes,
                }
                if (
                    dictionaries
                    and parse_spec(spec).zstd_level is not None
                    and parse_spec(spec).kind not in ("pca", "bn")
                    and nbytes <= DICT_MAX_BYTES
                ):
                    training = trained_on if trained_on is not None else samples[bytes_samples:]
                    found = _dictionary(codec, training, samples[:bytes_samples], nbytes)
                    if found is not None:
                        kept.setdefault(str(k), {})[spec] = found[0]
                        row["bytes"] = found[1]
                table.append(row)
            frontier = bundle.run_segments(k, k + 1, frontier)
            bar.step(note=bundle.cuts[k].name)
    if unfit:
        k, c, v = max(unfit, key=lambda u: u[1] / max(u[2], 1))
        log.warning(
            "pca codecs left out at %d cut(s) (%s): a channel projection needs at least %d calibration "
            "channel vectors a channel (inputs x positions), and cut %d has %d channels but %d vectors; "
            "give at least %d calibration samples to measure them there%s",
            len(unfit),
            ", ".join(str(u[0]) for u in unfit),
            VECTORS_PER_CHANNEL,
            k,
            c,
            v,
            math.ceil(VECTORS_PER_CHANNEL * c * n_cal / max(v, 1)) * (2 if held_out_from else 1),
            f" (half of them are held out for the table: or pass {words.example('evaluation')})"
            if held_out_from
            else "",
        )
    last = _Scores.exact(target, want).row(metric, confidence)
    for spec in codecs:
        table.append({"cut": n, "codec": spec, **last, "bytes": 0.0})
    fidelity: dict[str, Any] = {
        "metric": metric,
        "samples": total - first,
        "calibration_samples": n_cal,
        "held_out": held_out,
        "method": method,
        "confidence": confidence,
        "interval_method": INTERVAL_METHODS[metric],
        "table": table,
    }
    if held_out_from:
        fidelity["held_out_from"] = held_out_from
    if stop_below is not None:
        fidelity["stopped_below"] = stop_below
    if target is not None:
        fidelity["labels"] = int(target.numel())
        fidelity["float_accuracy"] = round(float((want[0].argmax(1) == target).double().mean()), 6)
        fidelity["accuracy_interval_method"] = INTERVAL_METHODS["accuracy_drop"]
    if degenerate is not None:
        fidelity["degenerate"] = degenerate
    return fidelity, ranges, kept, projections


#: The float model's top-1 is "(nearly) constant" where one class takes at least this share of
#: the evaluation inputs: agreement then says nothing about a codec (issue 28).
DEGENERATE_SHARE = 0.9


def _metric_for(name: str, metric: str, want: Sequence[torch.Tensor]) -> tuple[str, dict[str, Any] | None]:
    """The metric the table uses, and a record of a degenerate reference (else None).

    A classifier whose top-1 is one class on at least DEGENERATE_SHARE of at least two
    evaluation inputs would call every codec perfect: warn once, naming the model and the class,
    and measure cosine similarity of the outputs instead (``metric="auto"``; a metric the user
    named is kept, with the warning)."""
    chosen = _choose_metric(metric, want)
    if not (len(want) == 1 and want[0].dim() == 2 and want[0].shape[1] > 1 and want[0].shape[0] >= 2):
        return chosen, None
    top = want[0].argmax(1)
    counts = torch.bincount(top, minlength=want[0].shape[1])
    cls = int(counts.argmax())
    share = float(counts[cls]) / int(top.numel())
    if share < DEGENERATE_SHARE:
        return chosen, None
    switch = metric == "auto"
    log.warning(
        "model %r predicts class %d for %.0f%% of the %d evaluation inputs: top-1 agreement would call "
        "every codec perfect, so the fidelity table %s. Give inputs the model tells apart (a trained "
        "model, inputs of your task)",
        name,
        cls,
        100 * share,
        int(top.numel()),
        "measures cosine similarity of the outputs instead" if switch else f"keeps the {chosen} you named",
    )
    record = {"class": cls, "share": round(share, 4), "metric": "cosine" if switch else chosen}
    return ("cosine" if switch else chosen), record


def _labels(labels: Sequence[int] | None, want: Sequence[torch.Tensor], n: int) -> torch.Tensor | None:
    """The evaluation rows' labels as a tensor, checked against the model's outputs."""
    if labels is None:
        return None
    if not (len(want) == 1 and want[0].dim() == 2):
        raise ConfigError(
            f"{words.name('labels')} need a classifier (one output of shape batch x classes) to "
            "measure top-1 accuracy; this model's outputs are "
            + ", ".join(str(tuple(w.shape[1:])) for w in want)
        )
    target = torch.as_tensor(list(labels), dtype=torch.int64)
    if target.numel() != n:
        raise ConfigError(f"{words.name('labels')}: {target.numel()} label(s) for {n} evaluation input(s)")
    classes = want[0].shape[1]
    if bool(((target < 0) | (target >= classes)).any()):
        raise ConfigError(f"{words.name('labels')} must be class indices in 0..{classes - 1}")
    return target


@dataclass(frozen=True)
class _Scores:
    """One (cut, codec)'s measurement on the evaluation inputs: per-input agreement and, with
    labels, how many inputs it lost and gained against the float model's top-1."""

    values: torch.Tensor
    correct: torch.Tensor | None = None
    lost: int = 0
    gained: int = 0
    lossless: bool = False  # agreement 1 by definition, no interval

    @classmethod
    def of(
        cls,
        metric: str,
        got: Sequence[torch.Tensor],
        want: Sequence[torch.Tensor],
        target: torch.Tensor | None,
    ) -> _Scores:
        values = per_sample(metric, got, want)
        if target is None:
            return cls(values)
        correct, ref = got[0].argmax(1) == target, want[0].argmax(1) == target
        return cls(values, correct, int((ref & ~correct).sum()), int((~ref & correct).sum()))

    @classmethod
    def exact(cls, target: torch.Tensor | None, want: Sequence[torch.Tensor]) -> _Scores:
        n = int(want[0].shape[0])
        correct = None if target is None else want[0].argmax(1) == target
        return cls(torch.ones(n, dtype=torch.float64), correct, lossless=True)

    def row(self, metric: str, confidence: float) -> dict[str, Any]:
        n = int(self.values.numel())
        mean = float(self.values.mean()) if n else 1.0
        out: dict[str, Any] = {"fidelity": round(mean, 6), "n": n}
        if metric == "cosine":
            sd = float(self.values.std()) if n > 1 else 0.0
            out["sd"] = round(sd, 6)
            out["cosine"] = round(mean, 6)
            low, high = mean_interval(mean, sd, n, confidence)
        else:
            low, high = wilson(mean, n, confidence)
        if self.lossless:
            low, high = 1.0, 1.0
        out["interval"] = [round(low, 4), round(high, 4)]
        if self.correct is not None:
            out["accuracy"] = round(float(self.correct.double().mean()), 6)
            out["accuracy_drop"] = round((self.lost - self.gained) / max(n, 1), 6)
            out["lost"], out["gained"] = self.lost, self.gained
            d_lo, d_hi = (0.0, 0.0) if self.lossless else drop_interval(self.lost, self.gained, n, confidence)
            out["drop_interval"] = [round(d_lo, 4), round(d_hi, 4)]
        return out


def _mean_bytes(codec: Any, samples: Sequence[Sequence[torch.Tensor]]) -> float:
    sizes = [len(codec.encode(list(s))) for s in samples]
    return sum(sizes) / len(sizes)


def _choose_ranges(
    bundle: Bundle,
    k: int,
    bases: Sequence[str],
    methods: Sequence[str],
    frontier: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    metric: str,
    probe: int,
) -> dict[str, ClipRanges]:
    """Per quantizing base, the calibrated ranges to use at cut ``k``.

    With one method, its ranges. With several, each candidate's decoded frontier of the first
    ``probe`` inputs goes through the tail, and the candidate with the highest agreement wins;
    ties go to the higher mean cosine similarity of the outputs, then to the simpler method.
    Candidates with identical ranges are run once.
    """
    quant = [b for b in bases if parse_spec(b).kind in ("quant", "jpeg")]
    if not quant:
        return {}
    calibrated = calibrate_all(frontier, quant, methods)
    if len(methods) == 1:
        return {b: calibrated[(b, methods[0])] for b in quant}
    candidates: list[_Variant] = []
    for b in quant:
        seen: list[ClipRanges] = []
        for m in sorted(methods, key=_ORDER.__getitem__):
            clip = calibrated[(b, m)]
            if all(clip.tensors != s.tensors for s in seen):
                seen.append(clip)
                candidates.append(_Variant(b, m, clip))
    small = _rows(frontier, 0, probe)
    want = [r[:probe] for r in reference]
    best: dict[str, tuple[tuple[float, float, int], ClipRanges]] = {}
    for v, out in zip(candidates, _tails(bundle, k, candidates, small)):
        assert v.clip is not None
        score = (agreement(metric, out, want), agreement("cosine", out, want), -_ORDER[v.method])
        if v.base not in best or score > best[v.base][0]:
            best[v.base] = (score, v.clip)
    return {b: clip for b, (_, clip) in best.items()}


def _dictionary(
    codec: Any,
    training: Sequence[Sequence[torch.Tensor]],
    test: Sequence[Sequence[torch.Tensor]],
    nbytes: float,
) -> tuple[ZstdDictionary, float] | None:
    """A dictionary trained on ``training`` and its mean bytes on ``test`` (other samples), if
    it saves at least DICT_MIN_SAVING of ``nbytes`` (the bytes on ``test`` without); else None."""
    dictionary = train([payload_of(codec, list(s)) for s in training], codec.spec)
    if dictionary is None:
        return None
    bound = get_codec(codec.spec, clip=getattr(codec, "clip", None), dictionary=dictionary)
    with_dict = _mean_bytes(bound, test)
    if with_dict > nbytes * (1 - DICT_MIN_SAVING):
        return None
    return dictionary, with_dict
