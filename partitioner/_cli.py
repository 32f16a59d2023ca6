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
        metavar="FILE",
        help="calibration inputs for the lossy codecs' ranges and the fidelity table, in the same "
        "form, N rows along the batch dim (each row one input)",
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
    p.add_argument(
        "--budget",
        type=float,
        default=0.99,
        help="fidelity budget for the summary printed after compiling (default 0.99)",
    )
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


def _compile(args: argparse.Namespace) -> int:
    import importlib
    import os
    import sys

    from splitinfer.partitioner import compile

    module_name, _, attr = args.factory.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"give the model factory as MODULE:FACTORY, got {args.factory!r}")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {args.factory}: {exc}") from None
    from splitinfer._checks import check_number

    check_number("--budget (fidelity, 0..1)", args.budget, lo=0.0, hi=1.0)
    if args.example_inputs is not None:
        if args.input_shape:
            raise ConfigError("give --input-shape or --example-inputs, not both")
        inputs = _read_tensors(args.example_inputs, "--example-inputs")
    elif args.input_shape:
        inputs = _random_inputs(args.input_shape, args.input_dtype or [])
    else:
        raise ConfigError(
            "give the example inputs: --input-shape D0,D1,... (repeat per input) or --example-inputs FILE"
        )
    calibration = None
    if args.calibration is not None:
        rows = _read_tensors(args.calibration, "--calibration")
        n = rows[0].shape[0] if rows[0].dim() else 0
        if len(rows) != len(inputs) or any(t.dim() == 0 or t.shape[0] != n for t in rows):
            raise ConfigError(
                f"--calibration must hold {len(inputs)} tensor(s) (one per model input) with the same "
                "number of rows along dim 0"
            )
        calibration = [tuple(t[i : i + 1] for t in rows) for i in range(n)]
    codecs = None
    if args.codecs is not None:
        codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    model = _model_from(factory, args.factory)
    bundle = compile(
        model,
        tuple(inputs),
        name=args.name,
        version=args.model_version,
        calibration=calibration,
        codecs=codecs,
        profile=bool(args.profile),
        verbose=True,
    )
    out = bundle.save(args.out)
    print(f"wrote {out} ({len(bundle.cuts)} cuts, graph {bundle.graph_hash})")
    if not args.profile:
        print("no profile: plan and the adaptive policy need one (compile --profile, or splitinfer profile)")
    best = _best_codecs(bundle.fidelity, args.budget)
    lossy = {k: r for k, r in best.items() if r["codec"].split("+", 1)[0] != "f32" and k < bundle.last_cut}
    if lossy:
        k, row = min(lossy.items(), key=lambda kv: kv[1]["bytes"])
        print(
            f"smallest payload at fidelity >= {args.budget}: cut {k} with {row['codec']}, "
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


def _read_tensors(path: str, what: str) -> list[Any]:
    """The tensors in a ``.pt`` file (a tensor or a tuple/list of them; ``torch.load`` with
    ``weights_only=True``: no code runs) or a ``.npz`` file (its arrays in order)."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what}: no file {path!r}")
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                return [torch.from_numpy(np.array(data[k])) for k in data.files]
        if file.suffix in (".pt", ".pth"):
            loaded = torch.load(file, weights_only=True, map_location="cpu")
        else:
            raise ConfigError(f"{what} takes a .pt or .npz file, got {path!r}")
    except ConfigError:
        raise
    except Exception as exc:  # pickle, zip and numpy errors: say what the file must hold
        raise ConfigError(f"{what}: cannot read {path!r}: {type(exc).__name__}: {exc}") from None
    tensors = [loaded] if isinstance(loaded, torch.Tensor) else loaded
    if (
        not isinstance(tensors, list | tuple)
        or not tensors
        or not all(isinstance(t, torch.Tensor) for t in tensors)
    ):
        raise ConfigError(
            f"{what}: {path!r} must hold a tensor or a tuple/list of tensors, one per model input"
        )
    return list(tensors)


def add_inspect_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``inspect``: print a bundle's cut table."""
    p = subparsers.add_parser(
        "inspect",
        help="print a bundle's cut table",
        description=(
            "Print a bundle's cuts: index, name, float32 KiB at batch 1, the smallest codec whose "
            "fidelity meets --budget (when the bundle has a fidelity table) and the tensors."
        ),
    )
    p.add_argument("bundle", metavar="DIR", help="bundle directory")
    p.add_argument("--budget", type=float, default=0.99, help="fidelity budget for the smallest-codec column")
    p.set_defaults(func=_inspect)
    return p


def _inspect(args: argparse.Namespace) -> int:
    from splitinfer._checks import check_number
    from splitinfer.manifest import Cut, read_manifest

    check_number("--budget (fidelity, 0..1)", args.budget, lo=0.0, hi=1.0)
    root = Path(args.bundle)
    manifest = read_manifest(root)
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    print(f"bundle   {manifest['name']} version {manifest.get('version')}  ({size / 2**20:.1f} MiB on disk)")
    print(f"graph    {manifest['graph_hash']}")
    print(f"codecs   {', '.join(manifest.get('codecs', []))}")
    onnx = manifest.get("onnx") or {}
    if onnx.get("file"):
        print(f"onnx     opset {onnx.get('opset')}: heads and tails of every cut on torch or onnxruntime")
    else:
        print(f"onnx     none ({onnx.get('refused') or 'compiled without onnx'}): every cut on torch only")
    errors = onnx.get("max_abs_error", {}) if onnx.get("file") else {}
    cuts = [Cut.from_json(c) for c in manifest["cuts"]]
    width = max(len(c.name) for c in cuts)
    best = _best_codecs(manifest.get("fidelity", {}), args.budget)
    head = f"{'cut':>4}  {'name':<{width}}  {'KiB@1':>9}  "
    if best:
        head += f"{'smallest at fidelity >= ' + str(args.budget) + ' (95% CI)':<52}  "
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
            line += f"{pick:<52}  "
        error = errors.get(str(c.index))
        runtimes = f"torch onnxruntime ({error:.1e})" if error is not None else "torch"
        line += f"{runtimes:<28}  "
        print(line + tensors)
    if best and unmeasured:
        print(
            f"* lossy codecs unmeasured at {len(unmeasured)} cut(s) (no fidelity row: policies never "
            "use them; compile with fidelity_all_cuts=True to measure them)"
        )
    fidelity = manifest.get("fidelity", {})
    if fidelity.get("table"):
        if fidelity.get("held_out"):
            where = (
                f"{fidelity.get('samples')} held-out input(s) (ranges calibrated on "
                f"{fidelity.get('calibration_samples')} others)"
            )
        else:
            where = f"{fidelity.get('samples')} calibration input(s), in-sample"
        print(
            f"fidelity: {fidelity.get('metric')} agreement with the uncompressed model on {where}; "
            "95% confidence interval in brackets; bytes are the mean per request at batch 1"
        )
    return 0


def _fidelity_text(row: dict[str, Any]) -> str:
    """``0.984 [0.93-1.00]``: a row's fidelity and its 95 % interval (tables before issue 22
    have none)."""
    span = row.get("interval")
    if not isinstance(span, list) or len(span) != 2:
        return f"{row['fidelity']:.3f}"
    return f"{row['fidelity']:.3f} [{span[0]:.2f}-{span[1]:.2f}]"


def _unmeasured(manifest: dict[str, Any], last: int) -> set[int]:
    """The cuts (but the last) where some lossy codec of the bundle has no fidelity row."""
    lossy = [c for c in manifest.get("codecs", []) if c.split("+", 1)[0] != "f32"]
    rows = {(r["cut"], r["codec"]) for r in manifest.get("fidelity", {}).get("table", [])}
    return {k for k in range(last) for c in lossy if (k, c) not in rows}


def _best_codecs(fidelity: dict[str, Any], budget: float) -> dict[int, dict[str, Any]]:
    """Per cut, the smallest codec whose fidelity meets ``budget``."""
    best: dict[int, dict[str, Any]] = {}
    for row in fidelity.get("table", []):
        if row["fidelity"] >= budget and (row["cut"] not in best or row["bytes"] < best[row["cut"]]["bytes"]):
            best[row["cut"]] = row
    return best


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
    p.add_argument("--budget", type=float, default=0.99, help="fidelity budget, 0..1 (default 0.99)")
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
    if name == "adaptive":
        settings.update(
            fidelity_budget=args.budget,
            privacy_floor=args.privacy_floor,
            energy_weight=args.energy_weight,
            explore=0.0,
        )
    elif name == "cloud":
        settings.update(fidelity_budget=args.budget)
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
    from splitinfer.partitioner._profile import profile_bundle
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
