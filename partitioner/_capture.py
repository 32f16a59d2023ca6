"""``compile``: capture any model with torch.export and cut it into a chain of segments."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils import _pytree as pytree

from splitinfer.bundle import Bundle, Cut, fast_module, numpy_net
from splitinfer.errors import CaptureError, ConfigError
from splitinfer.manifest import exit_file, frontier_nbytes
from splitinfer.partitioner import _words as words
from splitinfer.partitioner._fidelity import measure
from splitinfer.partitioner._graph import Cuttable, SegmentError, batch_symbol
from splitinfer.partitioner._inputs import check_fidelity_inputs, check_inputs
from splitinfer.partitioner._intervals import DEFAULT_CONFIDENCE
from splitinfer.partitioner._learn import Training
from splitinfer.protocol import valid_model_name
from splitinfer.tensors import TensorSpec

log = logging.getLogger("splitinfer.partitioner")

__all__ = ["DEFAULT_CODECS", "LOSSLESS_CODECS", "compile"]

#: Codecs every bundle offers: exact, so their fidelity is 1 without measuring.
LOSSLESS_CODECS = ("f32", "f32+zstd1")
#: Codecs measured and offered when calibration inputs are given. Measuring costs one tail per
#: cut and lossy family, so the default keeps five families (others are opt-in: q8c, q3c, jpeg).
DEFAULT_CODECS = (*LOSSLESS_CODECS, "f16+zstd1", "q8+zstd1", "q6c+zstd1", "q4c+zstd1", "q2c+zstd1")

#: Batch size the programs are exported at: at 1, torch would specialize the batch dim.
_EXPORT_BATCH = 2

_HINT = (
    "torch.export (non-strict) must trace the model with a symbolic batch size. Common fixes: "
    "replace Python control flow on tensor values with torch.where or torch.cond; avoid .item(), "
    ".tolist() and .numpy() in forward; do not branch on the batch size; compute shapes with "
    "tensor.shape rather than constants. See https://pytorch.org/docs/stable/export.html"
)


def _batched(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        raise ConfigError("example inputs need a leading batch dimension; got a 0-d tensor")
    reps = -(-_EXPORT_BATCH // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:_EXPORT_BATCH].contiguous()


def _spec(t: torch.Tensor) -> TensorSpec:
    spec = TensorSpec.of(t)
    return TensorSpec((None, *spec.shape[1:]), spec.dtype)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch while it tries to export: a failed export logs warnings and prints its
    partial graph to stderr once per wrapper (twice), all before our own message says what
    went wrong. Torch's loggers are disabled and stderr is held back for the duration, then
    restored; what torch wrote to stderr is written out after all when the export succeeds."""
    loggers = [
        logger
        for name, logger in [("torch", logging.getLogger("torch")), *logging.root.manager.loggerDict.items()]
        if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))
    ]
    disabled = [logger.disabled for logger in loggers]
    held = io.StringIO()
    try:
        for logger in loggers:
            logger.disabled = True
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for logger, was in zip(loggers, disabled):
            logger.disabled = was
    sys.stderr.write(held.getvalue())  # reached only when the export succeeded


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], what: str) -> torch.export.ExportedProgram:
    batch = Dim("batch", min=1)
    try:
        with _quiet_torch():
            program = torch.export.export(
                module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False
            )
        # torch.export keeps the example inputs and saves them with the program: activations
        # that would make every segment file megabytes larger than its weights.
        program.example_inputs = None
        return program
    except Exception as exc:  # torch raises many types; name the construct and the fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.export cannot capture {what}: {type(exc).__name__}: {first}. {_HINT}"
        ) from exc


def compile(  # the public name the API promises
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    name: str,
    version: str = "1",
    max_frontier_bytes: int | None = None,
    calibration: Iterable[Any] | None = None,
    evaluation: Iterable[Any] | None = None,
    labels: Sequence[int] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    codecs: Sequence[str] | None = None,
    calibration_method: str = "auto",
    fidelity_metric: str = "auto",
    fidelity_all_cuts: bool | None = None,
    zstd_dictionaries: bool = False,
    profile: bool | str = False,
    runtimes: Sequence[str] | None = None,
    training: Iterable[Any] | None = None,
    exits: Sequence[int] | None = None,
    bottleneck_cuts: Sequence[int] | None = None,
    fidelity_budget: float = 0.99,
    fidelity_early_stop: bool = False,
    seed: int = 0,
    train_steps: int = 400,
    train_seconds: float | None = None,
    progress: bool = False,
    verbose: bool = False,
) -> Bundle:
    """Capture ``model`` and return a :class:`~splitinfer.Bundle` that can be split at every cut.

    ``example_inputs`` is a tuple of tensors whose first dim is the batch. Every exact cut is
    offered except those pruned as docs/partitioning.md describes; ``max_frontier_bytes``
    also prunes cuts whose frontier (float32, batch 1) is larger. The model is put in eval mode.

    ``calibration`` (an iterable of input tuples, or of single tensors for one-input models)
    calibrates the clip ranges of quantizing codecs per cut and measures the fidelity table
    (docs/bundle-format.md) for ``codecs``, on ``evaluation`` inputs when given (held out from
    the calibration, so that the table says what unseen inputs get; with the number of inputs
    and an interval per row, its bounds at one-sided ``confidence``), else on every second
    calibration input, held out from the others (a warning says so, and the table records
    ``held_out_from: "calibration"``). ``labels`` (a class index per evaluation input, or per
    calibration input without evaluation) add top-1 accuracy and its drop from the float model
    to every row; docs/fidelity.md. Inputs are checked against ``example_inputs`` before
    anything slow runs. The
    default codecs are ``f32``, ``f32+zstd1``, ``f16+zstd1``, ``q8+zstd1``, ``q6c+zstd1``,
    ``q4c+zstd1`` and ``q2c+zstd1`` with calibration, only the two lossless ones without; lossy
    codecs need calibration inputs, ``jpeg`` codecs float image inputs ``N x 3 x H x W``.
    ``calibration_method`` is ``"auto"`` (per cut and codec, whichever of min/max, percentile and
    MSE ranges gives outputs closest to the model's), or one of those three for every cut.
    ``fidelity_all_cuts=False`` measures lossy codecs only at cuts whose frontier is no larger
    than the input, ``True`` at every cut; the default does the former for models of more than
    32 cuts only (docs/partitioning.md, "Fidelity table"). ``zstd_dictionaries``
    trains a zstd dictionary per cut and ``+zstd`` codec and keeps those that make the payload
    at least 3 % smaller on held-out calibration inputs (docs/bundle-format.md).
    ``fidelity_early_stop=True`` (a top-1 table without labels) stops measuring a lossy row once
    the upper end of its interval is below ``fidelity_budget``: a faster table on many
    evaluation inputs, whose failing rows carry a smaller ``n`` (docs/fidelity.md).

    ``profile=True`` (or a profile name; True means ``"host"``) measures segment and codec
    latencies on this machine and stores them in ``bundle.profiles``, as ``splitinfer profile``
    does for a saved bundle; the adaptive policy needs one. ``progress`` draws progress bars.

    ``runtimes`` are where the segments may run: ``"torch"`` always, ``"onnxruntime"`` too by
    default when onnx, onnxscript and onnxruntime import (the chain exported to ONNX once and
    checked against torch at every cut; docs/runtimes.md). A model ONNX cannot export logs a
    warning naming the operator and compiles for torch alone (``bundle.onnx["refused"]``).

    ``verbose=True`` prints the number of cuts, the total time and each step's time: capture
    and cuts, ONNX export and check, calibration and fidelity table, profile.

    ``training`` (unlabelled inputs like production traffic, in the form of ``calibration``)
    trains early exits (docs/learning.md) at the cuts ``exits`` names, or at cuts picked by
    cost: small heads distilled from the model's own output (images augmented; ``seed``,
    ``train_steps`` optimizer steps, ``train_seconds`` a budget for the teacher's passes), their
    confidence thresholds calibrated on held-out inputs (``evaluation``, else ``calibration``,
    else every fourth training input) so that the answers they give agree with the model at a
    lower bound (at ``confidence``) of at least ``fidelity_budget``; ``exits=[]`` trains none.
    Without ``training`` the bundle is what it is without this paragraph.

    A trained bottleneck codec ``bn<latent>q<bits>[+zstd<level>|+ans]`` named in ``codecs`` is
    trained on ``training`` (with the same budget) at each of ``bottleneck_cuts`` (cuts whose
    frontier is one float ``N x C x H x W`` tensor), before the fidelity table, which measures
    it there like any codec (docs/learning.md); it needs ``training``, ``bottleneck_cuts`` and
    ``calibration`` inputs.
    """
    laps = _Laps()
    _check_arguments(model, example_inputs, name)
    calibration, evaluation = check_fidelity_inputs(example_inputs, calibration, evaluation, labels, codecs)
    if training is not None:  # checked before the slow steps, as the other inputs are
        training = check_inputs("training", training, example_inputs)
    elif exits is not None:
        raise ConfigError(
            f"{words.name('exits')} need {words.name('training')} inputs to train their heads on"
        )
    bottlenecks = _check_bottlenecks(codecs, training, bottleneck_cuts)
    model = model.eval()
    args = tuple(_batched(t) for t in example_inputs)
    with torch.no_grad():
        try:
            program, graph = _capture(model, args)
        except CaptureError:
            _check_batch_first(model, example_inputs, args)
            _check_inputs_fit(model, example_inputs)
            raise
        modules, positions = _cut(graph, args, max_frontier_bytes)
        programs, frontiers = _segment(model, graph, modules, positions, args)
    bundle = _assemble(name, version, graph, positions, frontiers, programs, tuple(example_inputs), program)
    laps.mark("capture and cuts")
    if _wants_onnx(runtimes):
        _add_onnx(bundle, args)
        laps.mark("ONNX export and check")
    if bottlenecks:
        assert training is not None and bottleneck_cuts is not None
        options = Training(steps=train_steps, seconds=train_seconds, seed=seed, progress=progress)
        _add_bottlenecks(bundle, training, bottleneck_cuts, bottlenecks, options)
        laps.mark("bottlenecks trained")
    _add_fidelity(
        bundle,
        example_inputs,
        calibration,
        codecs,
        {
            "method": calibration_method,
            "metric": fidelity_metric,
            "all_cuts": fidelity_all_cuts,
            "dictionaries": zstd_dictionaries,
            "progress": progress,
            "evaluation": evaluation,
            "labels": labels,
            "confidence": confidence,
            "stop_below": fidelity_budget if fidelity_early_stop else None,
        },
    )
    laps.mark("calibration and fidelity table" if calibration is not None else "fidelity table (lossless)")
    if training is not None and (exits is None or len(exits) > 0):
        _add_exits(
            bundle,
            training,
            evaluation or calibration,
            "evaluation" if evaluation else "calibration" if calibration else "training",
            exits,
            Training(steps=train_steps, seconds=train_seconds, seed=seed, progress=progress),
            fidelity_budget,
            confidence,
        )
        laps.mark("early exits trained and calibrated")
    if profile:
        _add_profile(bundle, profile if isinstance(profile, str) else "host", progress)
        laps.mark("profile")
    if verbose:
        print(laps.report(f"compiled {name}: {len(bundle.cuts)} cuts"))
    return bundle


class _Laps:
    """The time of each step of a compile, for ``verbose=True``: :meth:`mark` ends a step."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.steps: list[tuple[str, float]] = []

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.steps.append((step, now - self.last))
        self.last = now

    def report(self, head: str) -> str:
        """``head in T s`` and a line per step with its time."""
        width = max((len(step) for step, _ in self.steps), default=0)
        lines = [f"{head} in {self.last - self.started:.1f} s"]
        lines += [f"  {step:<{width}}  {seconds:6.1f} s" for step, seconds in self.steps]
        return "\n".join(lines)


def _check_arguments(model: object, example_inputs: object, name: object) -> None:
    """ConfigError unless ``name`` is a valid model name, ``model`` an nn.Module and
    ``example_inputs`` a non-empty tuple or list of tensors."""
    if not isinstance(name, str) or not valid_model_name(name):
        raise ConfigError(f"name {name!r} must be 1-128 characters of [A-Za-z0-9._-]")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple | list) or not example_inputs:
        raise ConfigError(
            "example_inputs must be a non-empty tuple of tensors, e.g. (torch.randn(1, 3, 224, 224),)"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"example input {i} is a {type(t).__name__}; every input must be a tensor")


def _capture(
    model: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.export.ExportedProgram, Cuttable]:
    """The whole model exported at ``args`` with a dynamic batch dim, and its graph to cut.

    Requires ``model`` in eval mode and ``args`` batched (:func:`_batched`). Ensures the batch
    dim stayed symbolic; CaptureError (naming the construct) when torch.export fails.
    """
    program = _export(model, args, f"model {type(model).__name__}")
    gm = program.module()
    symbol = batch_symbol(gm)
    if symbol is None:
        raise CaptureError(f"the batch dim of {type(model).__name__} did not stay symbolic. {_HINT}")
    graph = Cuttable(gm, symbol)
    _check_output_sizes(graph, type(model).__name__)
    return program, graph


def _check_output_sizes(graph: Cuttable, model_name: str) -> None:
    """CaptureError when an output's size depends on the values of the data (boolean indexing,
    ``nonzero``, ``unique``, ``masked_select``): the cloud batches and the edge checks every
    output against a shape fixed by the input shapes, so no cut could serve such a model."""
    for i, node in enumerate(graph.outputs):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and free_unbacked_symbols(val):
            shape = "[" + ", ".join(str(d) for d in val.shape) + "]"
            raise CaptureError(
                f"output {i} of model {model_name} has a size that depends on the data (shape {shape}: "
                "it comes from boolean indexing such as y[y > 0], nonzero, unique or masked_select). "
                "A split model's outputs must have sizes fixed by its input shapes, so that the cloud "
                "can batch them: return a fixed-size tensor (y and the mask y > 0, or "
                "torch.where(y > 0, y, 0)) and select the values after the call"
            )


def _cut(
    graph: Cuttable, args: tuple[torch.Tensor, ...], max_frontier_bytes: int | None
) -> tuple[list[fx.GraphModule], list[int]]:
    """The segments of ``graph`` and the cut positions they run between.

    Ensures ``len(positions) == len(modules) + 1``, ``positions[0] == 0`` and
    ``positions[-1] == graph.n_positions``: segment ``i`` computes the frontier at
    ``positions[i + 1]`` from the one at ``positions[i]``. Positions whose frontier repeats a
    neighbour's, exceeds ``max_frontier_bytes`` or ends no buildable segment are left out.
    """
    return _build_segments(graph, _choose_positions(graph, args, max_frontier_bytes))


def _segment(
    model: nn.Module,
    graph: Cuttable,
    modules: Sequence[fx.GraphModule],
    positions: Sequence[int],
    args: tuple[torch.Tensor, ...],
) -> tuple[list[torch.export.ExportedProgram], list[tuple[torch.Tensor, ...]]]:
    """Each segment exported on its own, and the frontiers at every cut for ``args``.

    Requires the segments from :func:`_cut`. Ensures the chain reproduces ``model(*args)``
    (CaptureError otherwise) and returns one program per segment and ``len(modules) + 1``
    frontiers, the first being ``args``.
    """
    frontiers = [args]
    for seg in modules:
        frontiers.append(tuple(seg(*frontiers[-1])))
    _check_equal(frontiers[-1], pytree.tree_leaves(model(*args)))
    programs = [
        _export(seg, frontiers[i], f"segment {i} ({graph.name(positions[i + 1])})")
        for i, seg in enumerate(modules)
    ]
    return programs, frontiers


def _assemble(
    name: str,
    version: str,
    graph: Cuttable,
    positions: Sequence[int],
    frontiers: Sequence[tuple[torch.Tensor, ...]],
    programs: list[torch.export.ExportedProgram],
    example_inputs: tuple[torch.Tensor, ...],
    program: torch.export.ExportedProgram,
) -> Bundle:
    """The bundle of the segment ``programs``: its cuts (frontier specs with a dynamic batch,
    byte sizes, readable names), input and output tree specs and graph hash; no codecs,
    fidelity table or profile yet (:func:`_add_fidelity` and ``profile_bundle`` add them)."""
    cuts = []
    for index, (p, frontier) in enumerate(zip(positions, frontiers)):
        specs = tuple(_spec(t) for t in frontier)
        cuts.append(Cut(index, graph.name(p), specs, frontier_nbytes(specs)))
    in_spec = pytree.treespec_dumps(pytree.tree_flatten((example_inputs, {}))[1])
    out_spec = pytree.treespec_dumps(program.call_spec.out_spec)
    return Bundle(
        name=name,
        cuts=cuts,
        inputs=cuts[0].tensors,
        in_spec=in_spec,
        out_spec=out_spec,
        graph_hash=graph_hash(programs, cuts, in_spec, out_spec),
        segments=[fast_module(p) for p in programs],
        version=version,
        _programs=programs,
    )


def _wants_onnx(runtimes: Sequence[str] | None) -> bool:
    """Whether to export ONNX: asked for (ConfigError if it cannot be), or by default when it can."""
    from splitinfer.partitioner._onnx import onnx_importable

    if runtimes is None:
        return onnx_importable()
    if isinstance(runtimes, str) or not set(runtimes) <= {"torch", "onnxruntime"} or "torch" not in runtimes:
        raise ConfigError(f"runtimes must be ('torch',) or ('torch', 'onnxruntime'), got {runtimes!r}")
    if "onnxruntime" in runtimes and not onnx_importable():
        raise ConfigError(
            "runtimes=('torch', 'onnxruntime') needs onnx, onnxscript and onnxruntime: "
            "pip install 'splitinfer[onnx]'"
        )
    return "onnxruntime" in runtimes


def _add_onnx(bundle: Bundle, args: tuple[torch.Tensor, ...]) -> None:
    """Export ``bundle``'s chain to ONNX (``bundle.onnx``), or record why it cannot be."""
    from splitinfer.partitioner._onnx import export_onnx
    from splitinfer.runtime import ONNX_FILE

    try:
        graph, entry = export_onnx(bundle.segments, args)  # type: ignore[arg-type]
    except CaptureError as exc:
        log.warning("%s; bundle %r runs on torch only", exc, bundle.name)
        bundle.onnx = {"refused": str(exc)}
        return
    bundle._onnx_graph = graph
    bundle.onnx = {"file": ONNX_FILE, **entry}


def _add_profile(bundle: Bundle, name: str, progress: bool) -> None:
    """Measure ``bundle``'s segment and codec latencies on this machine as profile ``name``."""
    from splitinfer.partitioner._profiling import profile_bundle

    bundle.profiles[name] = profile_bundle(bundle, progress=progress)


def _add_fidelity(
    bundle: Bundle,
    example_inputs: Sequence[torch.Tensor],
    calibration: Iterable[Any] | None,
    codecs: Sequence[str] | None,
    options: dict[str, Any],
) -> None:
    """Set ``bundle``'s codecs, fidelity table, calibration ranges and zstd dictionaries.

    Without ``calibration`` only lossless codecs are allowed (ConfigError otherwise), measured
    on ``example_inputs`` (fidelity ``samples`` 0, no dictionaries); with it, ``codecs``
    (default :data:`DEFAULT_CODECS`) are calibrated and measured on it (``_fidelity.measure``,
    ``options`` its keywords).
    """
    if codecs is not None and (isinstance(codecs, str) or not codecs):
        raise ConfigError(f"codecs must be a non-empty list of specs such as {list(DEFAULT_CODECS)}")
    if calibration is None:
        chosen = list(LOSSLESS_CODECS if codecs is None else codecs)
        lossy = [c for c in chosen if not c.startswith("f32")]
        if lossy:
            raise ConfigError(
                f"lossy codecs {lossy} need calibration inputs to measure their fidelity: pass "
                f"{words.example('calibration')} (a few dozen inputs like production traffic)"
            )
        inputs: Iterable[Any] = [tuple(example_inputs)]
    else:
        chosen = list(DEFAULT_CODECS if codecs is None else codecs)
        inputs = calibration
    _check_image_codecs(bundle, chosen, explicit=codecs is not None)
    if calibration is None:
        options = {**options, "hold_out": False, "labels": None}  # the example inputs: nothing to hold out
        if options.get("evaluation") is not None:
            raise ConfigError(
                f"{words.name('evaluation')} inputs need {words.name('calibration')} inputs too "
                "(the codecs' ranges are calibrated on those)"
            )
        options = {**options, "dictionaries": False}  # nothing to train on
    fidelity, ranges, dictionaries, projections = measure(bundle, inputs, chosen, **options)
    if calibration is None:
        fidelity["samples"] = 0  # bytes measured on the example inputs only
    bundle.codecs = chosen
    bundle.fidelity = fidelity
    bundle.calibration = ranges
    bundle.dictionaries = dictionaries
    bundle.projections = projections


def _add_exits(
    bundle: Bundle,
    training: list[tuple[Any, ...]] | None,
    held_out: list[tuple[Any, ...]] | None,
    held_out_from: str,
    cuts: Sequence[int] | None,
    options: Any,
    budget: float,
    confidence: float,
) -> None:
    """Train and calibrate ``bundle``'s early exits (``_exits.train_exits``) and keep their
    heads as exported programs (saved like segments: hashed, no pickles)."""
    from splitinfer._checks import check_number
    from splitinfer.partitioner._exits import train_exits

    check_number("fidelity_budget (agreement, 0..1)", budget, lo=0.0, hi=1.0)
    assert training is not None
    if held_out is None:
        if len(training) < 8:
            raise ConfigError(
                f"{words.name('training')}: {len(training)} input(s) without evaluation or calibration "
                "inputs; give at least 8 (every fourth is held out to calibrate the exits' thresholds) "
                f"or {words.name('evaluation')} inputs"
            )
        held_out = training[3::4]
        training = [t for i, t in enumerate(training) if i % 4 != 3]
    entries, heads = train_exits(bundle, training, held_out, held_out_from, cuts, options, budget, confidence)
    offered = {e["cut"] for e in entries if e["threshold"] is not None}
    for k, head in heads.items():
        if k not in offered:
            continue
        frontier = tuple(
            torch.zeros((_EXPORT_BATCH, *(int(d or 1) for d in t.shape[1:])), dtype=getattr(torch, t.dtype))
            for t in bundle.cut(k).tensors
        )
        program = _export(head.eval(), frontier, f"the exit head at cut {k}")
        bundle._exit_programs[k] = program
        bundle.exit_heads[k] = fast_module(program)
        if bundle.onnx.get("file"):  # the torch-free edge runs the exits too
            bundle._exit_onnx[k] = _exit_onnx(program, frontier)
    for entry in entries:
        if entry["cut"] in bundle._exit_onnx:
            entry["onnx"] = exit_file(entry["cut"]).replace(".pt2", ".onnx")
    bundle.exits = entries


def _check_bottlenecks(
    codecs: Sequence[str] | None, training: list[Any] | None, cuts: Sequence[int] | None
) -> list[str]:
    """The bases (``bn8q2``) of the trained bottleneck codecs in ``codecs``; ConfigError, saying
    what to pass, where ``training`` or ``cuts`` are missing for them (or named without them)."""
    from splitinfer.compression import parse_spec

    bases = sorted({parse_spec(c).base for c in codecs or () if parse_spec(c).kind == "bn"})
    named = [c for c in codecs or () if parse_spec(c).kind == "bn"]
    if bases and training is None:
        raise ConfigError(
            f"codecs {named} are trained bottlenecks: pass {words.name('training')} inputs (unlabelled, "
            f"like production traffic) to train them on, and {words.name('bottleneck_cuts')} (the cuts "
            "to train them at)"
        )
    if bases and not cuts:
        raise ConfigError(
            f"codecs {named} are trained bottlenecks: name the cuts to train them at with "
            f"{words.name('bottleneck_cuts')} (cuts whose frontier is one float N x C x H x W tensor)"
        )
    if cuts and not bases:
        raise ConfigError(
            f"{words.name('bottleneck_cuts')} train the bottleneck codecs named in {words.name('codecs')}; "
            "name one, such as 'bn8q2+zstd3' (8 latent channels of 2 bits, then zstd level 3)"
        )
    return bases


def _add_bottlenecks(
    bundle: Bundle,
    training: list[tuple[Any, ...]],
    cuts: Sequence[int],
    bases: Sequence[str],
    options: Training,
) -> None:
    """Train a bottleneck at each of ``cuts`` for each codec base (``bn8q2``) and keep its encoder
    and decoder as exported programs (and ONNX models where the bundle has ONNX), saved like
    segments; ``bundle.bottlenecks`` records them (docs/learning.md)."""
    from splitinfer.compression import parse_spec
    from splitinfer.manifest import bottleneck_file
    from splitinfer.partitioner._bottleneck import BottleneckPart, train_bottleneck, trained

    last = bundle.last_cut
    for k in sorted(set(cuts)):
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k < last:
            raise ConfigError(
                f"{words.name('bottleneck_cuts')} are cuts 1..{last - 1} (between the input and the output), "
                f"got {k!r}"
            )
        for base in bases:
            spec = parse_spec(base)
            module, record = train_bottleneck(
                bundle, k, training, options, latent=spec.latent, bits=spec.bits
            )
            frontier = tuple(int(d or 1) for d in bundle.cut(k).tensors[0].shape[1:])
            bound = trained(module, frontier, spec.bits)
            entry: dict[str, Any] = {
                "id": bound.id,
                "latent": spec.latent,
                "bits": spec.bits,
                "frontier": list(frontier),
                "code": list(bound.code),
            }
            programs, models = [], []
            for part in ("encoder", "decoder"):
                shape = frontier if part == "encoder" else bound.code
                args = (torch.zeros(_EXPORT_BATCH, *shape),)
                program = _export(
                    BottleneckPart(module, part).eval(), args, f"the bottleneck's {part} at cut {k}"
                )
                programs.append(program)
                entry[part] = bottleneck_file(k, base, part)
                if bundle.onnx.get("file"):  # the torch-free edge encodes, the torch-free cloud decodes
                    models.append(_exit_onnx(program, args, f"a bottleneck's {part}"))
                    entry[f"{part}_onnx"] = bottleneck_file(k, base, part, ".onnx")
            entry["training"] = {**record, "seed": options.seed}
            bundle._bottleneck_programs[(k, base)] = (programs[0], programs[1])
            if models:
                bundle._bottleneck_onnx[(k, base)] = (models[0], models[1])
            bundle.bottleneck_nets[(k, base)] = tuple(  # type: ignore[assignment]
                numpy_net(fast_module(p)) for p in programs
            )
            bundle.bottlenecks.setdefault(str(k), {})[base] = entry


def _exit_onnx(
    program: torch.export.ExportedProgram, args: tuple[torch.Tensor, ...], what: str = "an exit head"
) -> bytes:
    """The exit head's (or ``what``'s) program as an ONNX model (bytes); CaptureError naming the operator."""
    from splitinfer.partitioner._onnx import _quiet

    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, args, dynamo=True, verbose=False)
        assert onnx_program is not None
        return bytes(onnx_program.model_proto.SerializeToString())
    except Exception as exc:  # the exporter raises many types
        raise CaptureError(f"ONNX cannot export {what}: {type(exc).__name__}: {exc}") from exc


def _check_image_codecs(bundle: Bundle, chosen: list[str], *, explicit: bool) -> None:
    """JPEG codecs encode float image batches ``N x 3 x H x W`` at cut 0 only: on a model whose
    inputs are not such images they could send nothing. ConfigError for codecs the caller
    named; the defaults just drop them."""
    images = all(
        s.dtype in ("float32", "float16", "bfloat16", "float64") and len(s.shape) == 4 and s.shape[1] == 3
        for s in bundle.inputs
    )
    jpeg = [c for c in chosen if c.startswith("jpeg")]
    if images or not jpeg:
        return
    if explicit:
        raise ConfigError(
            f"codecs {jpeg} encode float image batches N x 3 x H x W, and only at cut 0; this model's "
            f"inputs are {', '.join(map(str, bundle.inputs))}, so they could send nothing: drop them "
            "(q8+zstd1 or f16+zstd1 compress any frontier)"
        )
    chosen[:] = [c for c in chosen if c not in jpeg]


def _choose_positions(
    graph: Cuttable, args: tuple[torch.Tensor, ...], max_frontier_bytes: int | None
) -> list[int]:
    """Valid cut positions, without repeats of a neighbour's frontier (the same values:
    ``Cuttable.same_values``)."""
    last = graph.n_positions
    positions, previous = [0], list(graph.inputs)
    for p in range(1, last):
        frontier = graph.frontier(p)
        if frontier is None or graph.same_values(frontier, previous):
            continue
        if max_frontier_bytes is not None:
            nbytes = sum(n.meta["val"][0].numel() * 4 for n in frontier)
            if nbytes > max_frontier_bytes:
                continue
        positions.append(p)
        previous = frontier
    positions.append(last)
    return positions


def _build_segments(graph: Cuttable, positions: list[int]) -> tuple[list[fx.GraphModule], list[int]]:
    """Segments between consecutive positions; a position no segment can end at is dropped."""
    kept, modules = [0], []
    for p in positions[1:]:
        try:
            modules.append(graph.build_segment(kept[-1], p))
        except SegmentError as exc:
            if p == positions[-1]:
                raise CaptureError(f"cannot build the last segment: {exc}. {_HINT}") from None
            continue
        kept.append(p)
    return modules, kept


def _check_batch_first(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], args: tuple[torch.Tensor, ...]
) -> None:
    """After a failed capture: ConfigError if the model fails on ``args`` (the example inputs at
    the export batch) but runs with a batch dim added in front of the example inputs, that is,
    if they lack one (torch's own error names a channel count)."""
    try:
        model(*args)
        return  # it runs at the export batch: the capture failed for another reason
    except Exception:
        pass
    try:
        model(*(t.unsqueeze(0) for t in example_inputs))
    except Exception:  # the model fails either way: the capture error is the one to show
        return
    shapes = ", ".join(f"input {i} has shape {tuple(t.shape)}" for i, t in enumerate(example_inputs))
    fixed = ", ".join(f"torch.randn{(1, *t.shape)}" for t in example_inputs)
    raise ConfigError(
        f"example inputs must be batch-first: {shapes}, and the model runs only with a batch dim "
        f"in front; pass e.g. ({fixed},)"
    )


def _check_inputs_fit(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    """After a failed capture: ConfigError if the model fails on the example inputs even when
    run eagerly, outside torch.export. Then the inputs (their shape, most often) are wrong for
    the model, and torch.export's advice about control flow would mislead."""
    try:
        model(*example_inputs)
        return  # the model runs on them: the capture failed for a reason of torch.export's
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    shapes = ", ".join(
        f"input {i} is {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        for i, t in enumerate(example_inputs)
    )
    raise ConfigError(
        f"model {type(model).__name__} fails on the example inputs when run on its own, before any "
        f"capture ({error}); {shapes}. The input shape is likely wrong for this model: give the "
        "shape (and dtype) it was built for"
    )


def _check_equal(got: Sequence[torch.Tensor], want: Sequence[object]) -> None:
    if len(got) != len(want):
        raise CaptureError(f"the segment chain yields {len(got)} outputs, the model {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        if not isinstance(b, torch.Tensor):
            raise CaptureError(
                f"model outputs must be tensors (in any tuple/list/dict), got {type(b).__name__}"
            )
        if a.shape != b.shape:
            raise CaptureError(
                f"the segment chain does not reproduce the model's outputs: output {i} has shape "
                f"{tuple(a.shape)}, the model's {tuple(b.shape)}"
            )
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            diff = (a.double() - b.double()).abs()
            finite = torch.isfinite(diff)
            largest = float(diff[finite].max()) if bool(finite.any()) else math.nan
            nans = int(torch.isnan(b).sum()) if b.is_floating_point() else 0
            note = (
                f"; the model's own output has {nans} NaN(s): check the example inputs (an input "
                "that is all padding, say)"
                if nans
                else ""
            )
            raise CaptureError(
                f"the segment chain does not reproduce the model's outputs: output {i} differs by up "
                f"to {largest:.3g}{note}"
            )


def graph_hash(programs: Sequence[torch.export.ExportedProgram], cuts: Sequence[Cut], *specs: str) -> str:
    """A digest of the graphs, weights and cuts: edge and cloud must agree on it."""
    h = hashlib.sha256()
    h.update(json.dumps([c.to_json() for c in cuts], sort_keys=True).encode())
    for s in specs:
        h.update(s.encode())
    for program in programs:
        h.update(str(program.graph).encode())
        for key, value in sorted(program.state_dict.items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for key, value in sorted(program.constants.items()):
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
