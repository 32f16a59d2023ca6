"""Profiles: how long each segment and each codec takes on this machine.

Contract: :func:`profile_bundle` needs a bundle with every segment loaded; it runs the model on
synthetic inputs of the bundle's input specs (values do not change a CNN's or a
transformer's cost; integer inputs are zeros) and returns one profile in the manifest's format
(docs/decision.md)::

    {"machine": str, "created": iso8601, "repeats": int, "warmup": int,
     "segments": {"1": {"median_s": [...], "p90_s": [...]}, "8": {...}},
     "codecs": [{"cut": k, "codec": spec, "encode_s": s, "decode_s": s, "bytes": float}, ...],
     "response_bytes": float,
     "exits": {"1": {"<cut>": s, ...}, "8": {...}},
     "runtimes": {"onnxruntime": {"threads": int | None, "segments": {"1": {...}, "8": {...}}}}}

``segments`` are torch's times (the bundle's fused fx chain in eager). When the bundle has an
ONNX graph at hand (a compiled bundle's, or ``onnx=``: ``splitinfer profile`` reads the saved
bundle's) and onnxruntime imports, ``runtimes.onnxruntime`` holds the same measurement on ONNX Runtime:
each segment as a session of its own, the whole chain as one, fitted alike. The cost model prices
each side on the runtime it runs (``_profiles.segment_medians``; torch's where a profile has no
times for a runtime, as profiles from before issue 17).

Segments and codecs are timed *interleaved*: each round runs the whole chain (fused, as the edge
runs a head), then every segment on its own, then (at batch 1) every codec's encode and decode at
every cut but the last, once each; so a burst of other work on a shared machine hits them alike
rather than all the repeats of one segment. After ``warmup`` rounds, at least ``repeats`` rounds
are timed, and more until the medians are stable (:func:`is_stable`; at most
``MAX_ROUNDS_FACTOR * repeats``). Each segment is then checked against the whole chain timed in the
same rounds and against its neighbours (:func:`suspects`: longer than the whole chain, most of
its runs slowed (a median 3x its fastest), or ``NEIGHBOUR_RATIO`` times off its neighbours); a
suspect is measured again, alone with the chain, and what stays impossible is named in the
warning. ``rounds`` records how many rounds each batch size took and ``suspects`` what stayed
suspect.

On one intra-op thread (``threads=1``, as the demo and the benchmarks profile) the work runs in
the calling thread, and is timed by that thread's CPU time (``time.thread_time``): a busy machine
steals wall time from a process, not CPU time, so the figure stays what the work costs on an
idle core (``clock: "cpu"``; cache and memory-bandwidth contention still show). On more threads
the wall clock is the only honest one (``clock: "wall"``).

Each figure stored as ``median_s`` (and each codec's seconds) is the lower quartile of its rounds
(:func:`typical`): other work only adds time, so on a busy machine that is nearer the quiet
median; on a quiet machine the two barely differ.

Timing 160 tiny segments one by one adds a call overhead per segment that a fused head does not
pay, so the per-segment times are corrected: the mean excess of their sum over the fused chain
(at most 0.9 of the fastest segment's time: an overhead per call cannot be longer than the call)
is subtracted from each, and the result scaled so that the segments sum to the fused chain's
median. Then ``head(k)`` and ``tail(k)``, sums of ranges, match what the edge and the cloud
measure. Codec rows: median encode and decode seconds, bound to the bundle's calibrated ranges
(``Bundle.codec_for``), and the encoded bytes of the one synthetic input (the fidelity table's
bytes, measured on real inputs, take precedence in the cost model). A spec that
:func:`~splitinfer.compression.get_codec` refuses is skipped with a warning; a codec that does
not apply at a cut (``jpeg`` beyond cut 0) is skipped silently. ``response_bytes`` is the
model's outputs encoded with ``f32`` at batch 1. ``exits`` (only where the bundle has early
exits that may answer, loaded) is each exit head's time at every batch size, by cut: the call
the edge makes (``Bundle.run_exit``: the head on the frontier at its cut and its confidence),
timed in the same rounds as the segments, on torch (the cost model prices the ONNX Runtime
edge's exits with these too). A profile without ``exits`` (taken before issue 32's exits were
profiled) prices each exit head at 0 s.

A busy machine makes a profile lie (a model that runs in 0.7 ms profiled at 98 ms; a 71 us
convolution stored as 0.94 us, a 165 us one as 1575 us): the profile records ``spread``
(slowest over fastest run of the whole chain) and ``load_per_core`` (the 1-minute load average
per core), and a WARNING log line (:func:`busy_warning`) says which way the times are wrong (too
high, too low), names the segments that stayed suspect, and says how to re-profile, when the
runs disagree by more than 4 times, the load is above 1 per core, or a segment stayed suspect.

A profile measured on one machine stands for another through the slowdown factors of
:class:`~splitinfer.partitioner.Estimates` (a device 8x slower than the profiling host:
``device_slowdown=8``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

__all__ = [
    "MAX_LOAD_PER_CORE",
    "MAX_SPREAD",
    "Suspect",
    "busy_warning",
    "clock_for",
    "is_stable",
    "machine_description",
    "profile_bundle",
    "suspects",
    "typical",
]


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


def typical(samples: Sequence[float]) -> float:
    """What a call takes on a quiet machine, from timed ``samples``: their lower quartile. Other
    work only ever adds time to a run (a wait for the core, caches refilled after it), never
    takes it away, so on a busy machine the lower quartile is nearer the quiet median than the
    median is; on a quiet machine the two barely differ."""
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 4]


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
    spread = 1.0
    notes: list[Suspect] = []
    rounds: dict[str, int] = {}
    exit_cuts = [int(e["cut"]) for e in bundle.exits if bundle.exit_at(int(e["cut"])) is not None]
    exits: dict[str, dict[str, float]] = {}
    clock_name, clock = clock_for(torch.get_num_threads())
    with Progress(len(sizes), f"profile {bundle.name}", enabled=progress) as bar, torch.inference_mode():
        for batch in sizes:
            x = tuple(_synthetic(s, batch) for s in bundle.inputs)
            frontiers = [x]
            for i in range(n):
                frontiers.append(bundle.run_segments(i, i + 1, frontiers[i]))
            seg_fns = [partial(bundle.run_segments, i, i + 1, frontiers[i]) for i in range(n)]
            codec_fns, nbytes = _codec_fns(bundle, frontiers[:n], specs) if batch == 1 else ({}, {})
            exit_fns = {(EXIT, k): partial(bundle.run_exit, k, frontiers[k]) for k in exit_cuts}
            timing = _time_chain(
                partial(bundle.run_segments, 0, n, x),
                seg_fns,
                {**codec_fns, **exit_fns},
                repeats,
                warmup,
                clock,
            )
            if exit_cuts:
                exits[str(batch)] = {str(k): typical(timing.extra[(EXIT, k)]) for k in exit_cuts}
            rounds[str(batch)] = timing.rounds
            if batch == sizes[0]:
                spread = max(timing.chain) / max(min(timing.chain), 1e-9)
                notes = timing.suspects
                busy = busy_warning(
                    bundle.name, timing.chain, _load_per_core(), timing.suspects, _names(bundle)
                )
                if busy:  # logged, not warnings.warn: a busy CI machine must not fail a run
                    log.warning("%s", busy)
            if batch == 1:
                rows = _codec_rows(nbytes, timing.extra)
                response_bytes = float(len(get_codec("f32").encode(list(frontiers[n]))))
            segments[str(batch)] = _fit_to_chain(
                [typical(t) for t in timing.segments],
                [_p90(t) for t in timing.segments],
                typical(timing.chain),
            )
            bar.step(note=f"batch {batch}: {timing.rounds} rounds")
    return {
        "machine": machine_description(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "warmup": warmup,
        "rounds": rounds,
        "clock": clock_name,
        "spread": round(spread, 3),
        "load_per_core": _load_per_core(),
        "suspects": [f"segment {s.segment}: {s.direction} ({s.reason})" for s in notes],
        "segments": segments,
        "codecs": rows,
        "response_bytes": response_bytes,
        **({"exits": exits} if exits else {}),
    }


#: The key of an early exit's head among the calls timed beside the chain.
EXIT = "exit"


def _names(bundle: Bundle) -> list[str]:
    """Per segment, the name of the cut it ends at (what a warning names it by)."""
    return [bundle.cuts[i + 1].name for i in range(bundle.n_segments)]


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
    _, clock = clock_for(threads or 0)  # ONNX Runtime's default: a thread pool, the wall clock
    with Progress(len(sizes), f"profile {bundle.name} on onnxruntime", enabled=progress) as bar:
        runner.session(0, n)
        for i in range(n):
            runner.session(i, i + 1)
        for batch in sizes:
            x = [_synthetic(s, batch).numpy() for s in bundle.inputs]
            frontiers = [x]
            for i in range(n):
                frontiers.append(runner.run(i, i + 1, frontiers[i]))
            seg_fns = [partial(runner.run, i, i + 1, frontiers[i]) for i in range(n)]
            timing = _time_chain(partial(runner.run, 0, n, x), seg_fns, {}, repeats, warmup, clock)
            if timing.suspects:
                log.warning(
                    "%s",
                    busy_warning(
                        f"{bundle.name} on onnxruntime", timing.chain, None, timing.suspects, _names(bundle)
                    ),
                )
            segments[str(batch)] = _fit_to_chain(
                [typical(t) for t in timing.segments],
                [_p90(t) for t in timing.segments],
                typical(timing.chain),
            )
            bar.step(note=f"batch {batch}: {timing.rounds} rounds")
    return segments


def _codec_fns(
    bundle: Bundle, frontiers: Sequence[Sequence[torch.Tensor]], specs: Sequence[str]
) -> tuple[dict[tuple[int, str, str], Callable[[], object]], dict[tuple[int, str], int]]:
    """(cut, codec, "encode" | "decode") -> the call to time, for every codec that applies at
    every cut, and (cut, codec) -> the bytes it encodes that cut's frontier to."""
    fns: dict[tuple[int, str, str], Callable[[], object]] = {}
    nbytes: dict[tuple[int, str], int] = {}
    for k, frontier in enumerate(frontiers):
        tensors = list(frontier)
        for spec in specs:
            codec = _codec(bundle, k, spec)
            try:
                blob = codec.encode(tensors)
            except CodecError:
                continue  # does not apply at this cut (jpeg beyond the input)
            fns[(k, spec, "encode")] = partial(codec.encode, tensors)
            fns[(k, spec, "decode")] = partial(codec.decode, blob)
            nbytes[(k, spec)] = len(blob)
    return fns, nbytes


def _codec_rows(nbytes: dict[tuple[int, str], int], times: dict[Any, list[float]]) -> list[dict[str, Any]]:
    return [
        {
            "cut": k,
            "codec": spec,
            "encode_s": typical(times[(k, spec, "encode")]),
            "decode_s": typical(times[(k, spec, "decode")]),
            "bytes": float(size),
        }
        for (k, spec), size in nbytes.items()
    ]


#: Slowest over fastest run of the whole chain beyond which the repeats disagree wildly.
MAX_SPREAD = 4.0
#: 1-minute load average per core above which the machine is busy.
MAX_LOAD_PER_CORE = 1.0
#: Rounds of timing go on past ``repeats`` until stable, up to this many times ``repeats``.
MAX_ROUNDS_FACTOR = 4
#: A median is stable when leaving out the last third of its samples moves it by at most this
#: share (the whole chain's; a segment's may move twice as much: they are shorter, noisier).
STABLE_TOLERANCE = 0.1
#: A segment whose median is this many times its own fastest run was slowed in most of its
#: rounds (the code it runs does not change between rounds; other work does): too high.
SEGMENT_SPREAD = 3.0
#: A segment this many times slower than its neighbours (the geometric median of up to two on
#: each side), or faster, is measured again; still one then, it is a real outlier (a big
#: convolution between two additions) and not named in the warning.
NEIGHBOUR_RATIO = 20.0
#: How often suspect segments are measured again before the warning names them.
REMEASURES = 2
TOO_HIGH, TOO_LOW = "too high", "too low"


@dataclass(frozen=True)
class Suspect:
    """A segment time that cannot be right as measured: which, which way, why.

    ``hard``: impossible (a segment longer than the whole chain, or most of its runs slowed);
    otherwise only odd beside its neighbours, and a real outlier if measured again alike."""

    segment: int
    direction: str
    reason: str
    hard: bool = True


def is_stable(samples: Sequence[float], tolerance: float = STABLE_TOLERANCE) -> bool:
    """Whether ``samples``' median moves by at most ``tolerance`` (a share) when the last third
    of them is left out (fewer than 3 samples: not yet)."""
    if len(samples) < 3:
        return False
    whole = statistics.median(samples)
    earlier = statistics.median(samples[: len(samples) - max(1, len(samples) // 3)])
    return abs(whole - earlier) <= tolerance * max(whole, 1e-12)


def suspects(segments: Sequence[Sequence[float]], chains: Sequence[Sequence[float]]) -> list[Suspect]:
    """The segment times of ``segments`` (per segment, its samples) that the whole chain's times
    ``chains`` (per segment, the chain's samples from the same rounds) or their neighbours
    contradict. Pure: fed times, it reads no clock.

    - longer than the whole chain that contains it: too high;
    - a median over ``SEGMENT_SPREAD`` times its own fastest run: other work slowed most of its
      runs, too high;
    - over ``NEIGHBOUR_RATIO`` times the geometric median of its neighbours' medians (up to two on each
      side; too high) or under it (too low): not impossible (``hard=False``), measured again.
    """
    if len(segments) != len(chains):
        raise ConfigError(f"suspects: {len(segments)} segments but {len(chains)} chain series")
    medians = [statistics.median(s) for s in segments]
    out: list[Suspect] = []
    for i, (seg, chain) in enumerate(zip(segments, chains)):
        m, whole, fastest = medians[i], statistics.median(chain), min(seg)
        near = [medians[j] for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < len(medians)]
        typical = math.exp(statistics.median(math.log(max(x, 1e-12)) for x in near)) if near else m
        if m > whole:
            out.append(
                Suspect(i, TOO_HIGH, f"{m * 1e3:.3g} ms, longer than the whole chain's {whole * 1e3:.3g}")
            )
        elif m > SEGMENT_SPREAD * fastest:
            out.append(
                Suspect(i, TOO_HIGH, f"{m * 1e3:.3g} ms, {m / max(fastest, 1e-12):.1f}x its fastest run")
            )
        elif m > NEIGHBOUR_RATIO * typical:
            out.append(Suspect(i, TOO_HIGH, f"{m * 1e3:.3g} ms beside {typical * 1e3:.3g}", False))
        elif m * NEIGHBOUR_RATIO < typical:
            out.append(Suspect(i, TOO_LOW, f"{m * 1e3:.3g} ms beside {typical * 1e3:.3g}", False))
    return out


@dataclass
class _Timing:
    """Interleaved timings of a chain, its segments and other calls (see :func:`_time_chain`)."""

    chain: list[float]
    segments: list[list[float]]
    extra: dict[Any, list[float]]
    rounds: int
    suspects: list[Suspect]


def _once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def clock_for(threads: int) -> tuple[str, Callable[[], float]]:
    """The clock to time work running on ``threads`` intra-op threads: one thread runs the work
    in the calling thread, whose CPU time (``time.thread_time``) other processes cannot inflate
    (a busy machine steals wall time, not CPU time); more threads need the wall clock."""
    return ("cpu", time.thread_time) if threads == 1 else ("wall", time.perf_counter)


def _time_chain(
    chain_fn: Callable[[], object],
    seg_fns: Sequence[Callable[[], object]],
    extra_fns: dict[Any, Callable[[], object]],
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> _Timing:
    """Time the whole chain, each segment and each extra call (codecs) once per round, in turn,
    so that a burst of other work hits them alike; at least ``repeats`` rounds, then on until
    the chain's and the segments' medians are stable (:func:`is_stable`; at most
    ``MAX_ROUNDS_FACTOR * repeats`` rounds). Then the :func:`suspects` are measured again, alone
    with the chain, up to ``REMEASURES`` times; a neighbour-only suspect that stays one is a
    real outlier, not named."""
    for _ in range(warmup):
        for fn in (chain_fn, *seg_fns, *extra_fns.values()):
            fn()
    chain: list[float] = []
    segs: list[list[float]] = [[] for _ in seg_fns]
    extra: dict[Any, list[float]] = {k: [] for k in extra_fns}
    rounds = 0
    while True:
        chain.append(_once(chain_fn, clock))
        for i, fn in enumerate(seg_fns):
            segs[i].append(_once(fn, clock))
        for k, fn in extra_fns.items():
            extra[k].append(_once(fn, clock))
        rounds += 1
        settled = is_stable(chain) and all(is_stable(s, 2 * STABLE_TOLERANCE) for s in segs)
        if rounds >= repeats and (settled or rounds >= MAX_ROUNDS_FACTOR * repeats):
            break
    chains: list[list[float]] = [list(chain) for _ in seg_fns]
    found = suspects(segs, chains)
    for _ in range(REMEASURES):
        if not found:
            break
        again = sorted({s.segment for s in found})
        fresh_chain: list[float] = []
        fresh: dict[int, list[float]] = {i: [] for i in again}
        for _ in range(max(repeats, 3)):
            fresh_chain.append(_once(chain_fn, clock))
            for i in again:
                fresh[i].append(_once(seg_fns[i], clock))
        chain += fresh_chain
        for i in again:
            segs[i], chains[i] = fresh[i], fresh_chain
        found = suspects(segs, chains)
    # An outlier beside its neighbours that is still one after being measured again is real (a
    # big convolution between two additions); only the impossible figures are named.
    return _Timing(chain, segs, extra, rounds, [s for s in found if s.hard])


def _load_per_core() -> float | None:
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except (OSError, AttributeError):  # no load average on this platform
        return None


def busy_warning(
    name: str,
    chain_s: Sequence[float],
    load_per_core: float | None,
    found: Sequence[Suspect] = (),
    segment_names: Sequence[str] | None = None,
) -> str | None:
    """Why a profile of ``name`` (whose whole-chain runs took ``chain_s``) cannot be trusted, or
    None: its runs disagree by more than :data:`MAX_SPREAD` times, the load average per core
    was above :data:`MAX_LOAD_PER_CORE`, or segments stayed :func:`suspects` after being
    measured again (``found``). The message says which way the times are wrong (other work only
    slows runs down, so a wild spread or a high load reads too high; a suspect segment says its
    own direction), names the segments, and says how to re-profile."""
    fastest, slowest = min(chain_s), max(chain_s)
    reasons = []
    directions = set()
    if slowest > MAX_SPREAD * max(fastest, 1e-9):
        reasons.append(f"its runs took from {fastest * 1e3:.3g} to {slowest * 1e3:.3g} ms")
        directions.add(TOO_HIGH)
    if load_per_core is not None and load_per_core > MAX_LOAD_PER_CORE:
        reasons.append(f"the load average was {load_per_core:.2f} per core")
        directions.add(TOO_HIGH)
    for direction in (TOO_HIGH, TOO_LOW):
        named = [s for s in found if s.direction == direction]
        if named:
            directions.add(direction)
            which = "; ".join(
                f"segment {s.segment}"
                + (
                    f" (to {segment_names[s.segment]})"
                    if segment_names and s.segment < len(segment_names)
                    else ""
                )
                + f": {s.reason}"
                for s in named[:6]
            )
            more = f" and {len(named) - 6} more" if len(named) > 6 else ""
            reasons.append(f"{len(named)} segment time(s) {direction}: {which}{more}")
    if not reasons:
        return None
    way = " or ".join(d for d in (TOO_HIGH, TOO_LOW) if d in directions)
    return (
        f"the profile of {name} was taken on a busy machine ({'; '.join(reasons)}): its times may be "
        f"far {way}, and plan and the adaptive policy would trust them. Re-profile when the "
        f"machine is idle: splitinfer profile <bundle dir> --repeats 20 (or profile_bundle(bundle, "
        "threads=1) on a machine shared with other work)"
    )


def _fit_to_chain(medians: list[float], p90s: list[float], full: float) -> dict[str, list[float]]:
    """Per-segment times corrected for per-call overhead so that they sum to the fused chain.

    The overhead a call adds is the same for every segment and cannot exceed the fastest
    segment's own time, so the excess subtracted from each is capped at 0.9 of the fastest
    segment's median; what the segments' sum exceeds the chain by beyond that is other work's
    (a burst during the segments' runs) and is taken off in proportion by the scaling, rather
    than driving the short segments' times to nothing."""
    total = sum(medians)
    if total <= 0:
        return {"median_s": medians, "p90_s": p90s}
    excess = min(max(0.0, (total - full) / len(medians)), 0.9 * min(medians))
    trimmed = [max(m - excess, 0.1 * m) for m in medians]
    scale = full / sum(trimmed) if sum(trimmed) > 0 else 1.0
    fitted = [t * scale for t in trimmed]
    return {
        "median_s": fitted,
        "p90_s": [p * f / m if m > 0 else p for p, f, m in zip(p90s, fitted, medians)],
    }
