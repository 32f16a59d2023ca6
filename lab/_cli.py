"""The lab's subcommands: ``splitinfer demo`` and ``splitinfer loadtest``.

:func:`register` adds them to the ``splitinfer`` dispatcher (splitinfer/cli.py). Only argparse
loads with this module; each command imports the lab (and torch) when it runs.
"""

from __future__ import annotations

import argparse

from splitinfer.errors import ConfigError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` and ``loadtest`` to the ``splitinfer`` command."""
    _add_demo(subparsers)
    _add_loadtest(subparsers)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="every split policy, live, on EfficientNet-Lite0 in a deployment: devices of different "
        "speeds on real 3G traces, a cloud that gets busy (about 2 minutes)",
        description=(
            "Compile EfficientNet-Lite0 with its real weights (calibrated on real photos; cached, so "
            "only the first run compiles: under a minute, or a few on a busy machine), start the "
            "cloud server on 127.0.0.1, and run the edge client with each policy (adaptive, "
            "neurosurgeon, cloud, local, static) side by side. The default scenario is a deployment: "
            "three devices (0.25x, 1x and 4x the median device's speed) each on its own stretch of a "
            "real 3G trace through its own link emulator, a background tenant whose load on the cloud "
            "peaks halfway through, and a static configuration chosen at deploy time on traces the "
            "run does not replay. `--scenario single`: one device on one trace stretch, an idle cloud. "
            "Prints a table per policy and writes a report (Markdown, CSV, PNG plots). Ctrl-C stops "
            "everything it started."
        ),
    )
    p.add_argument(
        "--scenario",
        choices=("deployment", "single"),
        default="deployment",
        help="deployment (default): several devices, real traces, a busy cloud, a deploy-time static; "
        "single: one device on one trace stretch, static tuned on that stretch",
    )
    p.add_argument(
        "--trace",
        default=None,
        metavar="NAME|FILE",
        help="--scenario single: shipped trace name or a trace file (default norway-3g-train-1)",
    )
    p.add_argument(
        "--offset",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds into the trace to start (default 30; deployment: device i starts 37 s later than i-1)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds to run (default 90, or 60 when the bundle had to be compiled first; 8 with --quick)",
    )
    p.add_argument(
        "--slowdown",
        type=float,
        default=None,
        metavar="N",
        help="emulated device N times slower than this machine (deployment: the median device) (default: "
        "where running all on the device ties with sending the input to the cloud on this stretch; "
        "deployment: on a shipped trace the run does not replay)",
    )
    p.add_argument(
        "--budget", type=float, default=0.99, help="fidelity budget: top-1 agreement at least (default 0.99)"
    )
    p.add_argument(
        "--delay", default="40ms", metavar="TIME", help="one-way delay the link adds (default 40ms)"
    )
    p.add_argument(
        "--out", default="splitinfer-demo", metavar="DIR", help="report directory (default splitinfer-demo)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="bundle cache (default $XDG_CACHE_HOME/splitinfer/demo)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small CNN and 8 s: a smoke test (the tests use it)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitinfer._units import parse_duration
    from splitinfer.lab._demo import DEFAULT_TRACE, DemoConfig, run_demo

    config = DemoConfig(
        model="democnn" if args.quick else "efficientnet-lite0",
        scenario=args.scenario,
        trace=args.trace or DEFAULT_TRACE,
        offset_s=args.offset,
        duration_s=args.duration or (8.0 if args.quick else None),
        slowdown=args.slowdown,
        budget=args.budget,
        delay_s=parse_duration(args.delay),
        interval_s=0.1 if args.quick else 0.25,
        out_dir=Path(args.out),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        progress=not args.no_progress,
    )
    return run_demo(config)


def _add_loadtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "loadtest",
        help="prepare locust load tests of split policies (loadtests/README.md)",
        description=(
            "Tools for the locust load tests in loadtests/. `prepare` runs real inputs through a "
            "bundle's heads and records the encoded frontiers every policy may send, with the "
            "bundle's cuts, fidelity table and profile, into one file that locust workers read "
            "without torch."
        ),
    )
    tools = p.add_subparsers(dest="tool", metavar="TOOL")
    tools.required = True
    prep = tools.add_parser(
        "prepare",
        help="record real frontiers of a bundle for the load tests",
        description=(
            "Record, for every (cut, codec) some policy may choose, the encoded frontiers of "
            "--samples real inputs (photos for an image model), into --out. The bundle needs a "
            "profile (`splitinfer profile BUNDLE`)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("bundle", metavar="BUNDLE", help="bundle directory (with a profile)")
    prep.add_argument("--out", required=True, metavar="FILE", help="recording to write")
    prep.add_argument("--samples", type=int, default=4, help="real inputs recorded per (cut, codec)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    prep.add_argument(
        "--explore-mib",
        type=float,
        default=32.0,
        help="MiB of extra pairs that adaptive's exploration may take (one input each, smallest first)",
    )
    prep.add_argument("--budget", type=float, default=0.99, help="fidelity budget of adaptive and cloud")
    prep.add_argument(
        "--static",
        metavar="CUT:CODEC",
        default=None,
        help="the static policy's split (default: the best split between the ends for a typical 3G device)",
    )
    prep.set_defaults(func=_loadtest_prepare)


def _loadtest_prepare(args: argparse.Namespace) -> int:
    from splitinfer.lab._recording import format_summary, prepare

    static = None
    if args.static:
        cut, _, codec = args.static.partition(":")
        if not cut.isdigit() or not codec:
            raise ConfigError(f"--static takes CUT:CODEC such as 12:q8+zstd1, got {args.static!r}")
        static = (int(cut), codec)
    summary = prepare(
        args.bundle,
        args.out,
        samples=args.samples,
        seed=args.seed,
        fidelity_budget=args.budget,
        static=static,
        explore_mib=args.explore_mib,
        progress=True,
    )
    print(format_summary(summary))
    return 0
