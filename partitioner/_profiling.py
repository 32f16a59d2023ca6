"""Profiles: how long each segment and each codec takes on this machine.

Contract: :func:`profile_bundle` needs a bundle with every segment loaded; it runs the model on
synthetic inputs of the bundle's input specs (values do not change a CNN's or a
transformer's cost; integer inputs are zeros) and returns one profile in the manifest's format
(docs/decision.md)::

    {"machine": str, "created": iso8601, "repeats": int, "warmup": int,
     "segments": {"1": {"median_s": [...], "p90_s": [...]}, "8": {...}},
     "codecs": [{"cut": k, "codec": spec, "encode_s": s, "decode_s": s, "bytes": float}, ...],
     "response_bytes": float,
     "runtimes": {"onnxruntime": {"threads": int | None, "segments": {"1": {...}, "8": {...}}}}}

``segments`` are torch's times (the bundle's fused fx chain in eager). When the bundle has an
ONNX graph at hand (a compiled bundle's, or ``onnx=``: ``splitinfer profile`` reads the saved
bundle's) and onnxruntime imports, ``runtimes.onnxruntime`` holds the same measurement on ONNX Runtime:
each segment as a session of its own, the whole chain as one, fitted alike. The cost model prices
each side on the runtime it runs (``_profiles.segment_medians``; torch's where a profile has no
times for a runtime, as profiles from before issue 17).

Segments: each segment is timed on its own (``warmup`` runs, then ``repeats``; median and
90th percentile) at every batch size, and the chain of all segments is timed fused, as the edge
runs a head. Timing 160 tiny segments one by one adds a call overhead per segment that a fused
head does not pay, so the per-segment times are corrected: the mean excess of their sum over the
fused chain is subtracted from each (never below a tenth of its own time) and the result
scaled so that the segments sum to the fused chain's median. Then ``head(k)`` and ``tail(k)``,
sums of ranges, match what the edge and the cloud measure.

Codecs: every codec at every cut but the last, at batch 1, bound to the bundle's calibrated
ranges (``Bundle.codec_for``): median encode and decode seconds, and the encoded bytes of that
one synthetic input (the fidelity table's bytes, measured on real inputs, take precedence in
the cost model). A spec that :func:`~splitinfer.compression.get_codec` refuses is skipped with
a warning; a codec that does not apply at a cut (``jpeg`` beyond cut 0) is skipped silently.
``response_bytes`` is the model's outputs encoded with ``f32`` at batch 1.

A busy machine makes a profile lie (a model that runs in 0.7 ms profiled at 98 ms): the profile
records ``spread`` (slowest over fastest run of the whole chain) and ``load_per_core`` (the
1-minute load average per core), and a WARNING log line says how to re-profile when the runs
disagree by more than 4 times or the load is above 1 per core (:func:`busy_warning`).

A profile measured on one machine stands for another through the slowdown factors of
:class:`~splitinfer.partitioner.Estimates` (a device 8x slower than the profiling host:
``device_slowdown=8``).
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from splitinfer._progress import Progress
from splitinfer.bundle import Bundle
from splitinfer.compression import Codec, get_codec
from splitinfer.errors import CodecError, ConfigError, CutNotLoadedError
from splitinfer.runtime import OnnxGraph, OnnxRunner, onnx_available
from splitinfer.tensors import TensorSpec, dtype_from_name

log = logging.getLogger("splitinfer.partitioner")

__all__ = ["MAX_LOAD_PER_CORE", "MAX_SPREAD", "busy_warning", "machine_description", "profile_bundle"]


def machine_description() -> str:
    """The processor, core count and torch build of this machine (no host name)."""
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def _synthetic(spec: TensorSpec, batch: int) -> torch.Tensor:
    shape = (batch, *spec.concrete(batch)[1:])
    dtype = dtype_from_name(spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _timed(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _p90(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _usable_codecs(bundle: Bundle, codecs: Sequence[str] | None) -> list[str]:
    specs = list(bundle.codecs if codecs is None else codecs)
    usable = []
    for spec in specs:
        try:
            get_codec(spec)
        except CodecError as exc:
            warnings.warn(f"profile: skipping codec {spec!r}: {exc}", RuntimeWarning, stacklevel=3)
            continue
        usable.append(spec)
    return usable


def _codec(bundle: Bundle, k: int, spec: str) -> Codec:
    return bundle.codec_for(k, spec) if spec in bundle.codecs else get_codec(spec)


def _check(bundle: Bundle, batch_sizes: Sequence[int], repeats: int, warmup: int) -> list[int]:
    if not bundle.can_head(bundle.n_segments):
        raise CutNotLoadedError(
            f"profiling bundle {bundle.name!r} needs every segment: load it without upto_cut/from_cut"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an int >= 0, got {warmup!r}")
    sizes = sorted({1, *batch_sizes}) if batch_sizes else [1]
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be ints >= 1, got {list(batch_sizes)!r}")
    return sizes


def profile_bundle(
    bundle: Bundle,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    codecs: Sequence[str] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    progress: bool = True,
    runtimes: Sequence[str] | None = None,
    onnx: OnnxGraph | None = None,
) -> dict[str, Any]:
    """Measure ``bundle`` on this machine and return a profile (see the module docstring).

    ``batch_sizes`` are the batch sizes to time segments at (1 is always included: the edge
    runs one request at a time); ``codecs`` defaults to ``bundle.codecs``; ``threads`` sets
    torch's intra-op threads while profiling (default: leave them; on a machine shared with
    other work, 1 gives far steadier times; ONNX Runtime's intra-op threads alike, None: its
    default). Store the result as ``bundle.profiles[name]`` (or ``update_manifest(path,
    profiles=...)`` for a saved bundle).

    ``runtimes`` are the runtimes to time: torch always, and by default onnxruntime too when the
    ONNX graph is at hand (``onnx``, else the one ``bundle`` holds) and onnxruntime imports;
    ``("torch", "onnxruntime")`` requires both (ConfigError). The bundle must run on torch.
    """
    sizes = _check(bundle, batch_sizes, repeats, warmup)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an int >= 1 or None, got {threads!r}")
    graph = _onnx_to_time(bundle, runtimes, onnx)
    specs = _usable_codecs(bundle, codecs)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        profile = _measure(bundle, sizes, specs, repeats, warmup, progress)
    finally:
        torch.set_num_threads(previous)
    if graph is not None:
        profile["runtimes"] = {
            "onnxruntime": {
                "threads": threads,
                "segments": _measure_onnx(bundle, graph, sizes, repeats, warmup, threads, progress),
            }
        }
    return profile


def _onnx_to_time(bundle: Bundle, runtimes: Sequence[str] | None, onnx: OnnxGraph | None) -> OnnxGraph | None:
    """The ONNX graph to time ONNX Runtime on, or None (see :func:`profile_bundle`)."""
    if bundle.runtime != "torch":
        raise ConfigError(
            f"profile bundle {bundle.name!r} loaded with runtime='torch': the profile times torch, "
            "and ONNX Runtime too when the bundle has an ONNX graph"
        )
    if runtimes is not None and (
        isinstance(runtimes, str) or not set(runtimes) <= {"torch", "onnxruntime"} or "torch" not in runtimes
    ):
        raise ConfigError(f"runtimes must be ('torch',) or ('torch', 'onnxruntime'), got {runtimes!r}")
    graph = onnx if onnx is not None else bundle._onnx_graph
    if runtimes is None:
        return graph if graph is not None and onnx_available() else None
    if "onnxruntime" not in runtimes:
        return None
    if graph is None:
        raise ConfigError(f"bundle {bundle.name!r} has no ONNX graph to time ONNX Runtime on")
    if not onnx_available():
        raise ConfigError("timing ONNX Runtime needs onnxruntime: pip install 'splitinfer[edge]'")
    return graph


def _measure(
    bundle: Bundle, sizes: list[int], specs: list[str], repeats: int, warmup: int, progress: bool
) -> dict[str, Any]:
    n = bundle.n_segments
    segments: dict[str, dict[str, list[float]]] = {}
    rows: list[dict[str, Any]] = []
    response_bytes = 0.0
    with Progress(n * len(sizes), f"profile {bundle.name}", enabled=progress) as bar, torch.inference_mode():
        for batch in sizes:
            x = tuple(_synthetic(s, batch) for s in bundle.inputs)
            chain = _timed(partial(bundle.run_segments, 0, n, x), 2 * repeats + 1, warmup + 1)
            full = statistics.median(chain)
            if batch == sizes[0]:
                spread = max(chain) / max(min(chain), 1e-9)
                busy = busy_warning(bundle.name, chain, _load_per_core())
                if busy:  # logged, not warnings.warn: a busy CI machine must not fail a run
                    log.warning("%s", busy)
            medians, p90s = [], []
            frontier = x
            for i in range(n):
                if batch == 1:
                    rows.extend(_profile_codecs(bundle, i, frontier, specs, repeats, warmup))
                times = _timed(partial(bundle.run_segments, i, i + 1, frontier), repeats, warmup)
                medians.append(statistics.median(times))
                p90s.append(_p90(times))
                frontier = bundle.run_segments(i, i + 1, frontier)
                bar.step(note=f"batch {batch}: {bundle.cuts[i + 1].name}")
            if batch == 1:
                response_bytes = float(len(get_codec("f32").encode(list(frontier))))
            segments[str(batch)] = _fit_to_chain(medians, p90s, full)
    return {
        "machine": machine_description(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "warmup": warmup,
        "spread": round(spread, 3),
        "load_per_core": _load_per_core(),
        "segments": segments,
        "codecs": rows,
        "response_bytes": response_bytes,
    }


def _measure_onnx(
    bundle: Bundle,
    graph: OnnxGraph,
    sizes: list[int],
    repeats: int,
    warmup: int,
    threads: int | None,
    progress: bool,
) -> dict[str, dict[str, list[float]]]:
    """Per-segment times on ONNX Runtime (one session per segment, fitted to the whole chain's
    session, as for torch) at every batch size; sessions are built before they are timed."""
    n = bundle.n_segments
    runner = OnnxRunner(graph, threads=threads, name=bundle.name)
    segments: dict[str, dict[str, list[float]]] = {}
    with Progress(n * len(sizes), f"profile {bundle.name} on onnxruntime", enabled=progress) as bar:
        runner.session(0, n)
        for i in range(n):
            runner.session(i, i + 1)
        for batch in sizes:
            x = [_synthetic(s, batch).numpy() for s in bundle.inputs]
            full = statistics.median(_timed(partial(runner.run, 0, n, x), 2 * repeats + 1, warmup + 1))
            medians, p90s = [], []
            frontier = x
            for i in range(n):
                times = _timed(partial(runner.run, i, i + 1, frontier), repeats, warmup)
                medians.append(statistics.median(times))
                p90s.append(_p90(times))
                frontier = runner.run(i, i + 1, frontier)
                bar.step(note=f"batch {batch}: {bundle.cuts[i + 1].name}")
            segments[str(batch)] = _fit_to_chain(medians, p90s, full)
    return segments


def _profile_codecs(
    bundle: Bundle, k: int, frontier: Sequence[torch.Tensor], specs: Sequence[str], repeats: int, warmup: int
) -> list[dict[str, Any]]:
    rows = []
    tensors = list(frontier)
    for spec in specs:
        codec = _codec(bundle, k, spec)
        try:
            blob = codec.encode(tensors)
        except CodecError:
            continue  # does not apply at this cut (jpeg beyond the input)
        encode = _timed(partial(codec.encode, tensors), repeats, warmup)
        decode = _timed(partial(codec.decode, blob), repeats, warmup)
        rows.append(
            {
                "cut": k,
                "codec": spec,
                "encode_s": statistics.median(encode),
                "decode_s": statistics.median(decode),
                "bytes": float(len(blob)),
            }
        )
    return rows


#: Slowest over fastest run of the whole chain beyond which the repeats disagree wildly.
MAX_SPREAD = 4.0
#: 1-minute load average per core above which the machine is busy.
MAX_LOAD_PER_CORE = 1.0


def _load_per_core() -> float | None:
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except (OSError, AttributeError):  # no load average on this platform
        return None


def busy_warning(name: str, chain_s: Sequence[float], load_per_core: float | None) -> str | None:
    """Why a profile of ``name`` (whose whole-chain runs took ``chain_s``) cannot be trusted, or
    None: its runs disagree by more than :data:`MAX_SPREAD` times, or the load average per core
    was above :data:`MAX_LOAD_PER_CORE`; the message says how to re-profile."""
    fastest, slowest = min(chain_s), max(chain_s)
    reasons = []
    if slowest > MAX_SPREAD * max(fastest, 1e-9):
        reasons.append(f"its runs took from {fastest * 1e3:.3g} to {slowest * 1e3:.3g} ms")
    if load_per_core is not None and load_per_core > MAX_LOAD_PER_CORE:
        reasons.append(f"the load average was {load_per_core:.2f} per core")
    if not reasons:
        return None
    return (
        f"the profile of {name} was taken on a busy machine ({'; '.join(reasons)}): its times may be "
        "far too high, and plan and the adaptive policy would trust them. Re-profile when the "
        f"machine is idle: splitinfer profile <bundle dir> --repeats 20 (or profile_bundle(bundle, "
        "threads=1) on a machine shared with other work)"
    )


def _fit_to_chain(medians: list[float], p90s: list[float], full: float) -> dict[str, list[float]]:
    """Per-segment times corrected for per-call overhead so that they sum to the fused chain."""
    total = sum(medians)
    if total <= 0:
        return {"median_s": medians, "p90_s": p90s}
    excess = max(0.0, (total - full) / len(medians))
    trimmed = [max(m - excess, 0.1 * m) for m in medians]
    scale = full / sum(trimmed) if sum(trimmed) > 0 else 1.0
    fitted = [t * scale for t in trimmed]
    return {
        "median_s": fitted,
        "p90_s": [p * f / m if m > 0 else p for p, f, m in zip(p90s, fitted, medians)],
    }
