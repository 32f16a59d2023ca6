"""The partitioner's subcommands: ``splitinfer compile``, ``inspect``, ``profile`` and ``plan``.

:func:`register` adds them to the ``splitinfer`` dispatcher (splitinfer/cli.py); each
``add_*_parser(subparsers)`` adds one subcommand with ``set_defaults(func=...)``; ``func(args)``
returns the exit code and raises ConfigError (the caller prints it) for a bad argument. Rates
and times are written as :mod:`splitinfer._units` reads them (``2Mbit``, ``80ms``). Only
argparse and the standard library load with this module; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from splitinfer._units import parse_duration, parse_rate
from splitinfer.errors import ConfigError

__all__ = ["add_compile_parser", "add_inspect_parser", "add_plan_parser", "add_profile_parser", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add compile, inspect, profile and plan to the ``splitinfer`` command."""
    for add in (add_compile_parser, add_inspect_parser, add_profile_parser, add_plan_parser):
        add(subparsers)


# -- compile, inspect --------------------------------------------------------------------


def add_compile_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``compile``: capture a model from a factory and write its bundle."""
    p = subparsers.add_parser(
        "compile",
        help="capture a model and write its bundle",
        description=(
            "Import MODULE, call FACTORY() to build the model, capture it with torch.export and "
            "write a bundle that can be split at every offered cut. The current directory is on "
            "the import path. Example: splitinfer compile mymodels:resnet --input-shape 1,3,224,224 "
            "--name resnet --out models/resnet"
        ),
    )
    p.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. mypkg.models:make_model")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="D0,D1,...",
        help="shape of one example input, batch first; repeat for several inputs (random values; "
        "or give --example-inputs)",
    )
    p.add_argument(
        "--example-inputs",
        metavar="FILE",
        help="the example inputs: a .pt file (a tensor or a tuple/list of tensors, read with "
        "torch.load(weights_only=True)) or a .npz file (one array per input, in order), batch first",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE|DIR",
        help="calibration inputs for the lossy codecs' ranges: a tensor file in the form of "
        "--example-inputs with N rows along the batch dim (each row one input), or a folder of images "
        "(needs --image-size; ImageNet normalisation; an image's label is the integer its file name "
        "starts with). Without --evaluation every second one is held out to measure the fidelity table",
    )
    p.add_argument(
        "--evaluation",
        metavar="FILE|DIR",
        help="inputs the fidelity table is measured on, held out of the calibration (same forms); "
        "labelled images add top-1 accuracy and its drop to the table",
    )
    p.add_argument(
        "--train",
        metavar="FILE|DIR",
        help="unlabelled inputs like production traffic (same forms as --calibration) to train early "
        "exits on (docs/learning.md); images are augmented. Their thresholds are calibrated on "
        "--evaluation, else --calibration, else every fourth of these",
    )
    p.add_argument(
        "--exits",
        metavar="CUT,CUT",
        help="cuts to put early exits at (with --train; default: two cuts picked by cost; '' for none)",
    )
    p.add_argument(
        "--bottleneck-cuts",
        metavar="CUT,CUT",
        help="cuts to train the bottleneck codecs named in --codecs at (bn<latent>q<bits>, e.g. "
        "bn8q2+zstd3; with --train; docs/learning.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training's augmentation and batches")
    p.add_argument("--train-steps", type=int, default=400, metavar="N", help="optimizer steps (default 400)")
    p.add_argument(
        "--train-seconds",
        type=float,
        metavar="S",
        help="time budget for the teacher's passes over the (augmented) training inputs",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="side of the centre crop an image folder is loaded at (the shorter side resized to N*256/224)",
    )
    p.add_argument(
        "--image-normalization",
        choices=("imagenet", "none"),
        default="imagenet",
        help="imagenet (default): (x - mean) / std with ImageNet's mean and std; none: RGB in [0, 1]",
    )
    p.add_argument(
        "--fidelity-all-cuts",
        action="store_true",
        help="measure lossy codecs at every cut (by default models of more than 32 cuts get lossy rows "
        "only where the frontier is no larger than the input)",
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="stop measuring a lossy row once its interval's upper end is below --budget (a faster "
        "table on many --evaluation inputs; top-1 without labels; docs/fidelity.md)",
    )
    p.add_argument(
        "--codecs",
        metavar="SPEC,SPEC",
        help="codecs to offer, e.g. f32,q8+zstd1,q4c+zstd1 (default: f32,f32+zstd1, and the lossy "
        "defaults with --calibration)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure this machine's segment and codec latencies into the bundle (plan and the "
        "adaptive policy need a profile; splitinfer profile adds one later)",
    )
    _add_budget_arguments(p, "the summary printed after compiling")
    p.add_argument("--force", action="store_true", help="replace the bundle at --out if there is one")
    p.add_argument(
        "--input-dtype",
        action="append",
        metavar="DTYPE",
        help="dtype of each input in order (default float32; e.g. int64, bool)",
    )
    p.add_argument("--name", required=True, help="model name, 1-128 of [A-Za-z0-9._-]")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--version", dest="model_version", default="1", help="model version label")
    p.set_defaults(func=_compile)
    return p


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--input-shape takes comma-separated ints such as 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape dims must be >= 1, got {text!r}")
    return shape


def _add_budget_arguments(p: argparse.ArgumentParser, used_for: str) -> None:
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"fidelity budget for {used_for}: top-1 agreement with the float model, 0..1 (default 0.99)",
    )
    p.add_argument(
        "--accuracy-drop",
        type=float,
        metavar="D",
        help="budget as a top-1 accuracy drop from the float model instead, e.g. 0.01 (needs a labelled "
        "table)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="one-sided confidence of the bound a row must meet the budget with (default 0.9, "
        "docs/fidelity.md)",
    )


def _budget_of(args: argparse.Namespace) -> tuple[float, float | None, float]:
    """(agreement budget, accuracy drop or None, confidence) of --budget/--accuracy-drop/--confidence."""
    from splitinfer._checks import check_number
    from splitinfer.partitioner._intervals import DEFAULT_CONFIDENCE

    if args.budget is not None and args.accuracy_drop is not None:
        raise ConfigError("give --budget (an agreement) or --accuracy-drop, not both")
    budget = 0.99 if args.budget is None else args.budget
    check_number("--budget (fidelity, 0..1)", budget, lo=0.0, hi=1.0)
    if args.accuracy_drop is not None:
        check_number("--accuracy-drop (0..1)", args.accuracy_drop, lo=0.0, hi=1.0)
    confidence = DEFAULT_CONFIDENCE if args.confidence is None else args.confidence
    check_number("--confidence", confidence, lo=0.5, hi=1.0, lo_open=True, hi_open=True)
    return budget, args.accuracy_drop, confidence


def _check_out(path: str, force: bool) -> None:
    """Refuse to replace an existing --out unless --force, and anything that is not a bundle."""
    out = Path(path)
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not (out / "manifest.json").is_file():
        raise ConfigError(
            f"--out {path} exists and is not a bundle (no manifest.json): choose another directory"
        )
    if not force:
        raise ConfigError(
            f"--out {path} is an existing bundle: pass --force to replace it (its profiles and "
            "fidelity table are lost), or choose another directory"
        )


def _fidelity_inputs(
    args: argparse.Namespace, inputs: list[Any]
) -> tuple[list[Any] | None, list[Any] | None, list[int] | None]:
    """--calibration and --evaluation read and checked against the example inputs, and the
    labels of the evaluation (or, without it, of the calibration) where the images have them;
    --train's rows (unlabelled) are left in ``args.training_rows``."""
    from splitinfer.partitioner._inputs import read_inputs

    def read(flag: str, path: str | None) -> tuple[list[Any] | None, list[int] | None]:
        if path is None:
            return None, None
        rows, labels = read_inputs(
            path,
            flag,
            len(inputs),
            image_size=args.image_size,
            normalize=args.image_normalization == "imagenet",
        )
        _check_rows(flag, path, rows[0], inputs)
        return rows, labels

    if args.image_size is not None and not any(
        p is not None and Path(p).is_dir()
        for p in (args.calibration, args.evaluation, getattr(args, "train", None))
    ):
        raise ConfigError("--image-size applies to a folder of images given to --calibration or --evaluation")
    calibration, cal_labels = read("--calibration", args.calibration)
    evaluation, ev_labels = read("--evaluation", args.evaluation)
    args.training_rows = read("--train", getattr(args, "train", None))[0]
    labels = ev_labels if evaluation is not None else cal_labels
    return calibration, evaluation, labels


def _training_keywords(args: argparse.Namespace, budget: float, drop: float | None) -> dict[str, Any]:
    """compile's keywords for --train, --exits, --bottleneck-cuts, --seed, --train-steps and
    --train-seconds."""
    rows = getattr(args, "training_rows", None)
    cuts = _cut_list("--bottleneck-cuts", getattr(args, "bottleneck_cuts", None))
    if rows is None:
        if args.exits is not None:
            raise ConfigError("--exits needs --train inputs to train the exits' heads on")
        return {} if cuts is None else {"bottleneck_cuts": cuts}
    if drop is not None:
        raise ConfigError("early exits are calibrated to an agreement (--budget), not --accuracy-drop")
    exits = None
    if args.exits is not None:
        try:
            exits = [int(c) for c in args.exits.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(
                f"--exits takes comma-separated cut indices such as 3,6, got {args.exits!r}"
            ) from None
    return {
        "training": rows,
        "exits": exits,
        "bottleneck_cuts": cuts,
        "fidelity_budget": budget,
        "seed": args.seed,
        "train_steps": args.train_steps,
        "train_seconds": args.train_seconds,
    }


def _cut_list(flag: str, text: str | None) -> list[int] | None:
    """The cut indices of a comma-separated ``flag`` value, or None where it was not given."""
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated cut indices such as 3,6, got {text!r}") from None


def _check_rows(flag: str, path: str, row: tuple[Any, ...], inputs: list[Any]) -> None:
    """The rows of a file all share a shape: say at once, naming the file, where it is wrong."""
    for j, (t, want) in enumerate(zip(row, inputs)):
        if tuple(t.shape[1:]) != tuple(want.shape[1:]) or t.dtype != want.dtype:
            got = f"{str(t.dtype).removeprefix('torch.')}[{'x'.join(map(str, t.shape[1:]))}]"
            expected = f"{str(want.dtype).removeprefix('torch.')}[{'x'.join(map(str, want.shape[1:]))}]"
            fix = (
                "load the images at the model's size: --image-size " + str(want.shape[-1])
                if Path(path).is_dir() and t.shape[1:2] == want.shape[1:2] == (3,)
                else f"give a file of N x {'x'.join(map(str, want.shape[1:]))} {expected.split('[')[0]} rows"
            )
            raise ConfigError(
                f"{flag} {path}: tensor {j} has rows of {got}, but the model's input {j} is {expected} "
                f"(as --input-shape/--example-inputs give it): {fix}"
            )


def _compile(args: argparse.Namespace) -> int:
    """Compile with the working directory on ``sys.path`` (the factory is the user's module
    there), taken off again afterwards: ``main`` may run in a process that goes on."""
    import os
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _compile_here(args)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _compile_here(args: argparse.Namespace) -> int:
    import importlib

    from splitinfer.partitioner import compile
    from splitinfer.partitioner._inputs import check_fidelity_inputs, read_tensors
    from splitinfer.partitioner._words import cli_words

    module_name, _, attr = args.factory.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"give the model factory as MODULE:FACTORY, got {args.factory!r}")
    budget, drop, confidence = _budget_of(args)
    _check_out(args.out, args.force)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {args.factory}: {exc}") from None
    if args.example_inputs is not None:
        if args.input_shape:
            raise ConfigError("give --input-shape or --example-inputs, not both")
        inputs = read_tensors(args.example_inputs, "--example-inputs")
    elif args.input_shape:
        inputs = _random_inputs(args.input_shape, args.input_dtype or [])
    else:
        raise ConfigError(
            "give the example inputs: --input-shape D0,D1,... (repeat per input) or --example-inputs FILE"
        )
    calibration, evaluation, labels = _fidelity_inputs(args, inputs)
    codecs = None
    if args.codecs is not None:
        codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    with cli_words():
        check_fidelity_inputs(inputs, calibration, evaluation, labels, codecs)  # before the model is built
        model = _model_from(factory, args.factory)
        bundle = compile(
            model,
            tuple(inputs),
            name=args.name,
            version=args.model_version,
            calibration=calibration,
            evaluation=evaluation,
            labels=labels,
            confidence=confidence,
            codecs=codecs,
            fidelity_all_cuts=True if args.fidelity_all_cuts else None,
            fidelity_early_stop=bool(args.early_stop),
            profile=bool(args.profile),
            **{"fidelity_budget": budget, **_training_keywords(args, budget, drop)},
            verbose=True,
        )
    _check_out(args.out, args.force)  # nobody wrote one meanwhile
    out = bundle.save(args.out)
    print(f"wrote {out} ({len(bundle.cuts)} cuts, graph {bundle.graph_hash})")
    if not args.profile:
        print("no profile: plan and the adaptive policy need one (compile --profile, or splitinfer profile)")
    best = _best_codecs(bundle.fidelity, budget, drop, confidence)
    lossy = {k: r for k, r in best.items() if r["codec"].split("+", 1)[0] != "f32" and k < bundle.last_cut}
    if lossy:
        k, row = min(lossy.items(), key=lambda kv: kv[1]["bytes"])
        print(
            f"smallest payload within {_budget_text(budget, drop, confidence)}: cut {k} with {row['codec']}, "
            f"{row['bytes'] / 1024:.1f} KiB"
        )
    return 0


def _model_from(factory: Any, where: str) -> Any:
    """The model that ``factory`` (the object ``where`` names) builds, or ``factory`` itself when
    it already is a module; ConfigError in one line when it is not callable or raises."""
    import sys
    import traceback

    from torch import nn

    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ConfigError(
            f"{where} is an object of type {type(factory).__name__}, not a model factory: give "
            "MODULE:FACTORY naming a function or class that takes no arguments and returns the model"
        )
    try:
        return factory()
    except Exception as exc:
        # Where it raised: the innermost frame in the user's code, not in torch or the stdlib.
        frames = traceback.extract_tb(exc.__traceback__)[1:]
        own = [f for f in frames if not f.filename.startswith((sys.prefix, sys.base_prefix))]
        frame = (own or frames)[-1] if frames else None
        at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"the model factory {where} raised {type(exc).__name__}{at}" + (f": {first}" if first else "")
        ) from None


def _random_inputs(shapes_text: list[str], dtypes: list[str]) -> list[Any]:
    """Example inputs of the given shapes and dtypes: floats random, ints 0, bools False (a
    bool input is usually a padding mask: all True would mask every position)."""
    import torch

    from splitinfer.tensors import dtype_from_name

    shapes = [_parse_shape(s) for s in shapes_text]
    if len(dtypes) not in (0, len(shapes)):
        raise ConfigError(f"give one --input-dtype per --input-shape ({len(shapes)}), or none")
    inputs = []
    for i, shape in enumerate(shapes):
        dtype = dtype_from_name(dtypes[i]) if dtypes else torch.float32
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype))
    return inputs


def add_inspect_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``inspect``: print a bundle's cut table."""
    p = subparsers.add_parser(
        "inspect",
        help="print a bundle's cut table",
        description=(
            "Verify a bundle's files against their sha256 and print its cuts: index, name, float32 KiB "
            "at batch 1, the smallest codec the budget admits (its interval's bound meets the budget; "
            "when the bundle has a fidelity table) and the tensors. Rows the sample cannot decide are "
            "marked with how many inputs would. --json prints the whole fidelity table instead."
        ),
    )
    p.add_argument("bundle", metavar="DIR", help="bundle directory")
    _add_budget_arguments(p, "the smallest-codec column")
    p.add_argument("--json", action="store_true", help="print the bundle's fidelity table as JSON")
    p.add_argument("--no-verify", action="store_true", help="do not check the files' sha256 (faster)")
    p.set_defaults(func=_inspect)
    return p


def _verify(root: Path, manifest: dict[str, Any]) -> list[str]:
    """The bundle files that are missing or whose sha256 differs from the manifest's."""
    from splitinfer.manifest import sha256_of

    bad = []
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = root / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_of(path) != digest:
            bad.append(f"{name} (sha256 differs: altered or corrupted)")
    return bad


def _inspect(args: argparse.Namespace) -> int:
    import json
    import sys

    from splitinfer.manifest import Cut, read_manifest

    budget, drop, confidence = _budget_of(args)
    root = Path(args.bundle)
    manifest = read_manifest(root)
    bad = None if args.no_verify else _verify(root, manifest)
    fidelity = manifest.get("fidelity", {})
    if args.json:
        doc = {
            "bundle": manifest["name"],
            "version": manifest.get("version"),
            "verified": None if bad is None else not bad,
            "damaged": bad or [],
            **fidelity_json(fidelity, budget, drop, confidence),
            "exits": exits_json(manifest.get("exits") or []),
        }
        print(json.dumps(doc, indent=1))
        return 1 if bad else 0
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    print(f"bundle   {manifest['name']} version {manifest.get('version')}  ({size / 2**20:.1f} MiB on disk)")
    print(f"graph    {manifest['graph_hash']}")
    if bad is None:
        print("files    not verified (--no-verify)")
    elif bad:
        print(f"files    DAMAGED: {', '.join(bad)}")
    else:
        print(f"files    {len(manifest.get('files', {}))} verified against their sha256")
    print(f"codecs   {', '.join(manifest.get('codecs', []))}")
    onnx = manifest.get("onnx") or {}
    if onnx.get("file"):
        print(f"onnx     opset {onnx.get('opset')}: heads and tails of every cut on torch or onnxruntime")
    else:
        print(f"onnx     none ({onnx.get('refused') or 'compiled without onnx'}): every cut on torch only")
    errors = onnx.get("max_abs_error", {}) if onnx.get("file") else {}
    cuts = [Cut.from_json(c) for c in manifest["cuts"]]
    width = max(len(c.name) for c in cuts)
    best = _best_codecs(fidelity, budget, drop, confidence)
    undecided = _undecided(fidelity, best, budget, drop, confidence)
    head = f"{'cut':>4}  {'name':<{width}}  {'KiB@1':>9}  "
    if best:
        head += f"{'smallest within ' + _budget_text(budget, drop, confidence):<52}  "
    head += f"{'runtimes (onnx error)':<28}  "
    print(head + "tensors")
    unmeasured = _unmeasured(manifest, len(cuts) - 1)
    for c in cuts:
        tensors = ", ".join(str(t) for t in c.tensors)
        line = f"{c.index:>4}  {c.name:<{width}}  {c.nbytes / 1024:>9.1f}  "
        if best:
            row = best.get(c.index)
            pick = f"{row['codec']} {row['bytes'] / 1024:.1f} KiB ({_fidelity_text(row)})" if row else "-"
            if c.index in unmeasured:
                pick += " *"
            if c.index in undecided:
                pick += " ?"
            line += f"{pick:<52}  "
        error = errors.get(str(c.index))
        runtimes = f"torch onnxruntime ({error:.1e})" if error is not None else "torch"
        line += f"{runtimes:<28}  "
        print(line + tensors)
    if best and unmeasured:
        print(
            f"* lossy codecs unmeasured at {len(unmeasured)} cut(s) (no fidelity row: policies never "
            "use them; compile with --fidelity-all-cuts to measure them)"
        )
    if undecided:
        print(
            f"? at {len(undecided)} cut(s) a smaller codec's sample cannot decide the budget (its estimate "
            f"meets it, its bound at confidence {confidence:g} does not):"
        )
        for k in sorted(undecided)[:8]:
            row, need = undecided[k]
            more = f"about {need} evaluation inputs would decide it" if need else "no number of inputs can"
            kib = row["bytes"] / 1024
            print(f"    cut {k}: {row['codec']} {kib:.1f} KiB ({_fidelity_text(row)}): {more}")
    if fidelity.get("table"):
        print(_provenance(fidelity, confidence))
    for line in _exit_lines(manifest.get("exits") or []):
        print(line)
    if bad:
        print(
            f"warning: bundle {root} is damaged ({len(bad)} file(s)): recompile or copy it again",
            file=sys.stderr,
        )
        return 1
    return 0


def exits_json(exits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The early exits for scripts (``inspect --json``): per exit its cut, threshold, exit rate
    and the agreement of the answers it gives with their n and interval (docs/learning.md)."""
    keys: tuple[str, ...] = ("cut", "name", "threshold", "exit_rate", "agreement", "n", "lo", "hi")
    keys += ("samples", "confidence", "budget", "held_out_from", "head_agreement")
    out = []
    for e in exits:
        row = {k: e.get(k) for k in keys}
        training = e.get("training") or {}
        row["training"] = {
            k: training.get(k) for k in ("inputs", "views", "augmented", "steps", "seconds", "seed")
        }
        row["offered"] = e.get("threshold") is not None
        out.append(row)
    return out


def _exit_lines(exits: list[dict[str, Any]]) -> list[str]:
    """inspect's lines about the early exits (none without them)."""
    if not exits:
        return []
    lines = [f"exits    {len(exits)} early exit(s): answered on the device where the head is confident"]
    for e in exits:
        where = f"    cut {e['cut']} ({e.get('name', '?')})"
        if e.get("threshold") is None:
            agrees = 100 * (e.get("head_agreement") or 0)
            lines.append(
                f"{where}: never answers (no threshold shows agreement >= {e.get('budget')} on "
                f"{e.get('samples')} held-out inputs; the head agrees on {agrees:.1f}%)"
            )
            continue
        lines.append(
            f"{where}: exits {100 * e['exit_rate']:.1f}% of {e.get('samples')} held-out inputs at "
            f"confidence >= {e['threshold']:.3f}; those answers agree {e['agreement']:.3f} "
            f"[{e['lo']:.2f}-{e['hi']:.2f}] n={e['n']} (bound at {e.get('confidence')})"
        )
    return lines


def _provenance(fidelity: dict[str, Any], confidence: float) -> str:
    """How the table was measured, in one sentence."""
    if fidelity.get("held_out_from") == "calibration":
        where = (
            f"{fidelity.get('samples')} input(s) held out of the calibration (ranges calibrated on the "
            f"other {fidelity.get('calibration_samples')}; no --evaluation inputs)"
        )
    elif fidelity.get("held_out"):
        where = (
            f"{fidelity.get('samples')} held-out input(s) (ranges calibrated on "
            f"{fidelity.get('calibration_samples')} others)"
        )
    else:
        where = f"{fidelity.get('samples')} calibration input(s), in-sample"
    text = f"fidelity: {fidelity.get('metric')} agreement with the uncompressed model on {where}; "
    if "float_accuracy" in fidelity:
        accuracy = fidelity["float_accuracy"]
        text += f"{fidelity['labels']} labelled: float model top-1 accuracy {accuracy:.3f}; "
    degenerate = fidelity.get("degenerate")
    if degenerate:
        text += (
            f"the float model predicts class {degenerate['class']} for {100 * degenerate['share']:.0f}% of "
            f"them, so {degenerate['metric']} is measured; "
        )
    method = fidelity.get("interval_method", "wilson" if fidelity.get("metric") == "top1" else "normal")
    text += (
        f"brackets: {method} interval, bounds at one-sided confidence {confidence:g}; "
        "bytes are the mean per request at batch 1"
    )
    return text


def fidelity_json(
    fidelity: dict[str, Any], budget: float, drop: float | None, confidence: float
) -> dict[str, Any]:
    """The fidelity table for scripts (``inspect --json``): one object per row with cut, codec,
    bytes, agreement (in the table's metric), its bounds lo and hi at ``confidence``, n, accuracy
    and its drop where labelled, cosine where it is the metric, and whether the budget admits it
    (``admitted``; null where the row cannot say) or the sample cannot decide (``decided``)."""
    from splitinfer.partitioner._intervals import (
        INTERVAL_METHODS,
        drop_interval,
        inputs_to_decide,
        row_bounds,
    )

    metric = str(fidelity.get("metric", "top1"))
    samples = fidelity.get("samples") if isinstance(fidelity.get("samples"), int) else None
    rows = []
    for r in fidelity.get("table", []):
        bounds = row_bounds(r, metric, confidence, samples)
        n = r.get("n", samples)
        out: dict[str, Any] = {
            "cut": r["cut"],
            "codec": r["codec"],
            "bytes": r.get("bytes"),
            "metric": metric,
            "agreement": r["fidelity"],
            "lo": None if bounds is None else round(bounds[0], 6),
            "hi": None if bounds is None else round(bounds[1], 6),
            "n": n,
        }
        if "accuracy" in r:
            out["accuracy"] = r["accuracy"]
            out["accuracy_drop"] = r.get("accuracy_drop")
            if all(isinstance(r.get(k), int) for k in ("lost", "gained", "n")):
                lo, hi = drop_interval(r["lost"], r["gained"], r["n"], confidence)
                out["drop_lo"], out["drop_hi"] = round(lo, 6), round(hi, 6)
        if metric == "cosine":
            out["cosine"] = r.get("cosine", r["fidelity"])
        admitted = _admits(r, fidelity, budget, drop, confidence)
        out["admitted"] = admitted
        exact = r["codec"].split("+", 1)[0] == "f32"
        out["decided"] = exact or drop is not None or bounds is None or not (bounds[0] < budget <= bounds[1])
        if not out["decided"] and isinstance(n, int):
            out["inputs_to_decide"] = inputs_to_decide(
                float(r["fidelity"]), budget, confidence, r.get("sd") if metric == "cosine" else None
            )
        rows.append(out)
    result: dict[str, Any] = {
        "metric": metric,
        "samples": samples,
        "calibration_samples": fidelity.get("calibration_samples"),
        "held_out": fidelity.get("held_out"),
        "held_out_from": fidelity.get("held_out_from"),
        "confidence": confidence,
        "interval_method": INTERVAL_METHODS.get(metric),
        "budget": {"agreement": budget} if drop is None else {"accuracy_drop": drop},
    }
    if "float_accuracy" in fidelity:
        result["float_accuracy"] = fidelity["float_accuracy"]
        result["labels"] = fidelity.get("labels")
    if fidelity.get("degenerate"):
        result["degenerate"] = fidelity["degenerate"]
    result["rows"] = rows
    return result


def _fidelity_text(row: dict[str, Any]) -> str:
    """``0.984 [0.93-1.00] n=48``: a row's fidelity, the interval the table stores and its
    sample size (older tables may have no interval or no n)."""
    text = f"{row['fidelity']:.3f}"
    span = row.get("interval")
    if isinstance(span, list) and len(span) == 2:
        text += f" [{span[0]:.2f}-{span[1]:.2f}]"
    if isinstance(row.get("n"), int):
        text += f" n={row['n']}"
    if "accuracy_drop" in row:
        text += f" drop {row['accuracy_drop']:+.3f}"
    return text


def _budget_text(budget: float, drop: float | None, confidence: float) -> str:
    if drop is not None:
        return f"accuracy drop <= {drop} ({confidence:g})"
    return f"fidelity >= {budget} ({confidence:g})"


def _unmeasured(manifest: dict[str, Any], last: int) -> set[int]:
    """The cuts (but the last) where some lossy codec of the bundle has no fidelity row."""
    lossy = [c for c in manifest.get("codecs", []) if c.split("+", 1)[0] != "f32"]
    rows = {(r["cut"], r["codec"]) for r in manifest.get("fidelity", {}).get("table", [])}
    return {k for k in range(last) for c in lossy if (k, c) not in rows}


def _admits(
    row: dict[str, Any], fidelity: dict[str, Any], budget: float, drop: float | None, confidence: float
) -> bool | None:
    """Whether the policies' rule admits ``row`` (``_costs.CostModel.exclusions``); None where
    an accuracy-drop budget meets a row without labels."""
    from splitinfer.partitioner._intervals import drop_interval, row_bounds

    if row["codec"].split("+", 1)[0] == "f32":
        return True
    if drop is not None:
        if not all(isinstance(row.get(k), int) for k in ("lost", "gained", "n")):
            return None
        return drop_interval(row["lost"], row["gained"], row["n"], confidence)[1] <= drop
    samples = fidelity.get("samples") if isinstance(fidelity.get("samples"), int) else None
    bounds = row_bounds(row, str(fidelity.get("metric", "top1")), confidence, samples or None)
    return (row["fidelity"] if bounds is None else bounds[0]) >= budget


def _best_codecs(
    fidelity: dict[str, Any], budget: float, drop: float | None = None, confidence: float = 0.9
) -> dict[int, dict[str, Any]]:
    """Per cut, the smallest codec the budget admits (its bound meets it, as the policies rule)."""
    best: dict[int, dict[str, Any]] = {}
    for row in fidelity.get("table", []):
        if _admits(row, fidelity, budget, drop, confidence) and (
            row["cut"] not in best or row["bytes"] < best[row["cut"]]["bytes"]
        ):
            best[row["cut"]] = row
    return best


def _undecided(
    fidelity: dict[str, Any],
    best: dict[int, dict[str, Any]],
    budget: float,
    drop: float | None,
    confidence: float,
) -> dict[int, tuple[dict[str, Any], int | None]]:
    """Per cut, the smallest row smaller than the admitted one whose estimate meets the budget
    but whose bound does not, with the inputs that would decide it (agreement budgets)."""
    from splitinfer.partitioner._intervals import inputs_to_decide

    if drop is not None:
        return {}
    metric = str(fidelity.get("metric", "top1"))
    found: dict[int, tuple[dict[str, Any], int | None]] = {}
    for row in fidelity.get("table", []):
        k = row["cut"]
        chosen = best.get(k)
        if row["fidelity"] < budget or _admits(row, fidelity, budget, drop, confidence):
            continue
        if chosen is not None and row["bytes"] >= chosen["bytes"]:
            continue
        if k in found and found[k][0]["bytes"] <= row["bytes"]:
            continue
        sd = row.get("sd") if metric == "cosine" else None
        found[k] = (row, inputs_to_decide(float(row["fidelity"]), budget, confidence, sd))
    return found


# -- plan --------------------------------------------------------------------------------


def add_plan_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``plan``: rank a bundle's candidates under given network and device conditions."""
    p = subparsers.add_parser(
        "plan",
        help="rank a bundle's (cut, codec) candidates for given network and device conditions",
        description=(
            "Predict the end-to-end latency of every (cut, codec) candidate of a bundle from its "
            "profile, fidelity table and the conditions given, and print the ranked candidates and "
            "the winner with the reason. Example: splitinfer plan models/effnet --uplink 2Mbit "
            "--rtt 80ms --device-slowdown 8 --plot plan.png"
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (its segments are not loaded)")
    p.add_argument("--uplink", required=True, help="uplink rate, e.g. 2Mbit, 500kbit, 1.5Gbit")
    p.add_argument("--downlink", help="downlink rate (default: the uplink rate)")
    p.add_argument("--rtt", default="50ms", help="network round trip, e.g. 80ms (default 50ms)")
    p.add_argument("--queue", default="0ms", help="queueing in the cloud, e.g. 5ms (default 0ms)")
    p.add_argument(
        "--device-slowdown", type=float, default=1.0, help="device time / profiled time (default 1)"
    )
    p.add_argument("--cloud-slowdown", type=float, default=1.0, help="cloud time / profiled time (default 1)")
    p.add_argument(
        "--policy", default="adaptive", help="adaptive, cloud, local or neurosurgeon (default adaptive)"
    )
    _add_budget_arguments(p, "the adaptive and cloud policies")
    p.add_argument(
        "--privacy-floor", type=int, metavar="K", help="never cut before cut K (except all on device)"
    )
    p.add_argument(
        "--energy-weight", type=float, default=0.0, help="seconds per joule of device energy (default 0)"
    )
    p.add_argument("--profile", metavar="NAME", help="device profile to use (default host, else the first)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="candidates to list (default 10; 0: all)")
    p.add_argument("--plot", metavar="FILE.png", help="draw predicted latency per cut (needs matplotlib)")
    p.set_defaults(func=_plan)
    return p


def _plan(args: argparse.Namespace) -> int:
    from splitinfer.partitioner._estimate import Estimates
    from splitinfer.partitioner._policy import make_policy

    uplink = parse_rate(args.uplink, "--uplink")
    est = Estimates(
        uplink_bps=uplink,
        downlink_bps=uplink if args.downlink is None else parse_rate(args.downlink, "--downlink"),
        rtt_s=parse_duration(args.rtt, "--rtt"),
        cloud_queue_s=parse_duration(args.queue, "--queue"),
        device_slowdown=_positive(args.device_slowdown, "--device-slowdown"),
        cloud_slowdown=_positive(args.cloud_slowdown, "--cloud-slowdown"),
    )
    if args.top < 0:
        raise ConfigError(f"--top must be >= 0, got {args.top}")
    from splitinfer.manifest import Manifest

    bundle = Manifest.load(args.bundle)  # the decision needs no segments (and no torch)
    settings = _policy_settings(args)
    policy = make_policy(args.policy, bundle, **settings)
    explanation = policy.explain(est)
    print(f"bundle {bundle.name}: {len(bundle.cuts)} cuts, codecs {', '.join(bundle.codecs)}")
    print(explanation.format(top=args.top or None))
    if args.plot:
        out = plot_plan(explanation, bundle.last_cut, args.plot)
        print(f"wrote {out}")
    return 0


def _positive(value: float, what: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a number > 0, got {value}")
    return value


def _policy_settings(args: argparse.Namespace) -> dict[str, Any]:
    name = args.policy
    if name == "static":
        raise ConfigError("plan ranks candidates: use --policy adaptive, cloud, local or neurosurgeon")
    settings: dict[str, Any] = {"profile": args.profile}
    budget, drop, confidence = _budget_of(args)
    budgets: dict[str, Any] = ({"fidelity_budget": budget} if drop is None else {"accuracy_drop": drop}) | {
        "confidence": confidence
    }
    if name == "adaptive":
        settings.update(
            **budgets,
            privacy_floor=args.privacy_floor,
            energy_weight=args.energy_weight,
            explore=0.0,
        )
    elif name == "cloud":
        settings.update(**budgets)
    elif name == "neurosurgeon":
        settings.update(privacy_floor=args.privacy_floor)
    return settings


#: Stacked bar segments of the plot: label and the stages they add up.
_BARS = (
    ("head", ("head",)),
    ("encode", ("encode",)),
    ("transfer", ("rtt", "uplink", "downlink")),
    ("queue", ("queue",)),
    ("tail", ("decode", "tail")),
)


def plot_plan(explanation: Any, last_cut: int, path: str | Path) -> Path:
    """Stacked bars of the best allowed candidate's predicted stages at every cut."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'splitinfer[plot]'") from None
    best: dict[int, Any] = {}
    for c in explanation.candidates:  # allowed ones come first, best first
        if c.feasible and c.cut not in best:
            best[c.cut] = c
    cuts = sorted(best)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * len(cuts) + 4)), 4.5))
    bottom = [0.0] * len(cuts)
    for label, stages in _BARS:
        heights = [sum(best[k].stages.get(s, 0.0) for s in stages) * 1000 for k in cuts]
        ax.bar(cuts, heights, bottom=bottom, label=label, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    winner = explanation.decision.cut
    if winner in best:
        ax.annotate(
            f"winner: cut {winner}\n{best[winner].predicted_s * 1000:.1f} ms",
            xy=(winner, best[winner].predicted_s * 1000),
            xytext=(0, 18),
            textcoords="offset points",
            ha="center",
            arrowprops={"arrowstyle": "->"},
        )
    e = explanation.estimates
    ax.set_title(
        f"{explanation.policy}: uplink {e.uplink_bps / 1e6:.3g} Mbit/s, rtt {e.rtt_s * 1000:.0f} ms, "
        f"device x{e.device_slowdown:g}\n(best codec per cut; cut {last_cut} = all on device)",
        fontsize=10,
    )
    ax.set_xlabel("cut")
    ax.set_ylabel("predicted latency (ms)")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out)
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out


# -- profile -----------------------------------------------------------------------------


def add_profile_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``profile``: measure a saved bundle on this machine and store the profile in it."""
    p = subparsers.add_parser(
        "profile",
        help="measure a bundle's segment and codec times on this machine and store them in it",
        description=(
            "Time every segment (batch 1 and the cloud's batch sizes) and every codec at every cut "
            "on this machine, and store the result as a named profile in the bundle's manifest. "
            "Policies scale a profile to other machines by a slowdown factor. Example: "
            "splitinfer profile models/effnet --name host"
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (updated in place)")
    p.add_argument("--name", default="host", help="profile name (default host)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each segment and codec (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    p.add_argument("--batch-sizes", default="1,8", metavar="B,B", help="segment batch sizes (default 1,8)")
    p.add_argument(
        "--threads", type=int, help="torch threads while profiling (default: torch's; 1 is steadiest)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_profile)
    return p


def _profile(args: argparse.Namespace) -> int:
    from splitinfer.bundle import Bundle
    from splitinfer.manifest import read_manifest, update_manifest
    from splitinfer.partitioner._profiling import profile_bundle
    from splitinfer.runtime import has_onnx, load_onnx, onnx_available

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.name):
        raise ConfigError(f"--name must be 1-64 characters of [A-Za-z0-9._-], got {args.name!r}")
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(
            f"--batch-sizes takes comma-separated ints such as 1,8; got {args.batch_sizes!r}"
        ) from None
    root = Path(args.bundle)
    bundle = Bundle.load(root)
    doc = read_manifest(root)
    # ONNX Runtime is timed too where the bundle has its graph (the cost model prices each side
    # on the runtime it runs)
    onnx = load_onnx(root, doc).graph if has_onnx(doc) and onnx_available() else None
    profile = profile_bundle(
        bundle,
        batch_sizes=sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        progress=not args.quiet,
        onnx=onnx,
    )
    profiles = dict(doc.get("profiles", {}))
    profiles[args.name] = profile
    update_manifest(root, profiles=profiles)

    def whole(segments: dict[str, Any]) -> str:
        return ", ".join(f"{sum(s['median_s']) * 1000:.2f} ms at batch {b}" for b, s in segments.items())

    ort = profile.get("runtimes", {}).get("onnxruntime")
    print(
        f"profile {args.name!r} of {bundle.name}: whole model {whole(profile['segments'])}"
        + (f"; on onnxruntime {whole(ort['segments'])}" if ort else "")
        + f"; {len(profile['codecs'])} codec measurements; stored in {root}"
    )
    return 0
