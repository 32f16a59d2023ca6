"""The fidelity table: for every cut and codec, agreement with the uncompressed model and bytes.

Contract: ``measure(bundle, inputs, codecs)`` requires a bundle with every segment loaded and
calibration inputs (model input tuples, batch first); it returns the ``fidelity`` and
``calibration`` dicts that the manifest stores (docs/bundle-format.md):

- clip ranges of each quantizing codec, per cut, calibrated on the frontiers of the inputs;
- fidelity of each (cut, lossy codec): top-1 agreement with the uncompressed model for a
  classifier (one output of shape ``(batch, classes)``), mean cosine similarity of the outputs
  otherwise, measured by running the tail on the decoded frontier; lossless codecs score 1.0;
- bytes: mean encoded size of one request (batch 1), over up to ``bytes_samples`` inputs.

The table is measured in-sample (on the calibration inputs); pass inputs that look like
production traffic. Running it costs one tail per (cut, lossy codec family): the codecs that
differ only in their zstd stage share a fidelity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from splitinfer._progress import Progress
from splitinfer.bundle import Bundle
from splitinfer.compression import ClipRanges, calibrate, get_codec
from splitinfer.compression._spec import parse_spec
from splitinfer.errors import CodecError, ConfigError

__all__ = ["METRICS", "measure"]

METRICS = ("auto", "top1", "cosine")


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


def agreement(metric: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Mean per-sample agreement of two sets of output leaves."""
    if metric == "top1":
        return float((got[0].argmax(1) == want[0].argmax(1)).float().mean())
    a = torch.cat([g.reshape(g.shape[0], -1).double() for g in got], 1)
    b = torch.cat([w.reshape(w.shape[0], -1).double() for w in want], 1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def _applies(spec: str, frontier: Sequence[torch.Tensor], cut: int) -> bool:
    """JPEG only fits image batches at cut 0; other codecs fit every frontier."""
    if parse_spec(spec).kind != "jpeg":
        return True
    return cut == 0 and all(t.dtype.is_floating_point and t.dim() == 4 and t.shape[1] == 3 for t in frontier)


def measure(
    bundle: Bundle,
    inputs: Iterable[Any],
    codecs: Sequence[str],
    *,
    method: str = "mse",
    metric: str = "auto",
    bytes_samples: int = 8,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fidelity table and the calibrated clip ranges (see the module docstring)."""
    for spec in codecs:
        get_codec(spec)  # CodecError listing the valid forms for a bad spec
    x = _stack_inputs(bundle, inputs)
    n = bundle.n_segments
    reference = list(bundle.run_segments(0, n, x))
    metric = _choose_metric(metric, reference)
    lossy_bases = sorted({_base(s) for s in codecs if not _is_lossless(s)})
    table: list[dict[str, Any]] = []
    ranges: dict[str, dict[str, Any]] = {}
    frontier = x
    with Progress(n, "fidelity", enabled=progress) as bar, torch.inference_mode():
        for k in range(n):
            specs = [s for s in codecs if _applies(s, frontier, k)]
            samples = [[t[i : i + 1] for t in frontier] for i in range(frontier[0].shape[0])]
            clips: dict[str, ClipRanges] = {}
            for base in lossy_bases:
                if parse_spec(base).kind != "cast" and _applies(base, frontier, k):
                    clips[base] = calibrate(samples, base, method)
                    ranges.setdefault(str(k), {})[base] = clips[base].to_json()
            scores = {
                base: agreement(
                    metric, _tail_of_decoded(bundle, k, base, clips.get(base), frontier), reference
                )
                for base in lossy_bases
                if _applies(base, frontier, k)
            }
            for spec in specs:
                codec = get_codec(spec, clip=clips.get(_base(spec)))
                sizes = [len(codec.encode(s)) for s in samples[:bytes_samples]]
                table.append(
                    {
                        "cut": k,
                        "codec": spec,
                        "fidelity": 1.0 if _is_lossless(spec) else round(scores[_base(spec)], 6),
                        "bytes": sum(sizes) / len(sizes),
                    }
                )
            frontier = tuple(bundle.run_segments(k, k + 1, frontier))
            bar.step(note=bundle.cuts[k].name)
    for spec in codecs:
        table.append({"cut": n, "codec": spec, "fidelity": 1.0, "bytes": 0.0})
    fidelity = {"metric": metric, "samples": int(x[0].shape[0]), "method": method, "table": table}
    return fidelity, ranges


def _tail_of_decoded(
    bundle: Bundle, k: int, base: str, clip: ClipRanges | None, frontier: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    codec = get_codec(base, clip=clip)
    try:
        decoded = codec.decode(codec.encode(list(frontier)))
    except CodecError as exc:
        raise ConfigError(f"codec {base} cannot encode cut {k} ({bundle.cuts[k].name}): {exc}") from exc
    out = bundle.run_segments(k, bundle.n_segments, decoded)
    return list(pytree.tree_leaves(list(out)))
