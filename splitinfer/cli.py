"""The ``splitinfer`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from splitinfer._version import __version__
from splitinfer.errors import ConfigError, SplitInferError

__all__ = ["main"]


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the cloud tail server",
        description=(
            "Serve the tails of every bundle under --repository over HTTP(S), with dynamic "
            "batching, backpressure, bearer tokens, TLS and a graceful drain on SIGTERM. Each "
            "option can also be set by an environment variable SPLITINFER_<OPTION> (e.g. "
            "SPLITINFER_PORT, SPLITINFER_MAX_BATCH_SIZE); the command line wins."
        ),
    )

    def option(name: str, help: str, **kw: object) -> None:
        env = "SPLITINFER_" + name.upper().replace("-", "_")
        if kw.get("type") in (int, float) and "metavar" not in kw:
            kw["metavar"] = "MS" if name.endswith("-ms") else "S" if name.endswith("-s") else "N"
        p.add_argument(f"--{name}", help=f"{help} [{env}]", **kw)  # type: ignore[arg-type]

    option("repository", "directory holding one bundle per subdirectory", metavar="DIR")
    option("host", "address to listen on (default 127.0.0.1)")
    option("port", "port to listen on (default 8080; 0 picks a free one)", type=int)
    option("max-batch-size", "most rows computed at once; 1 turns batching off (default 16)", type=int)
    option(
        "max-queue-delay-ms",
        "longest a request waits for others to join its batch, in ms; a lone request never waits (default 2)",
        type=float,
    )
    option(
        "max-queue-length",
        "most requests waiting for compute; beyond it: 503 with Retry-After (default 256)",
        type=int,
    )
    option("compute-threads", "threads running tails, a batch each (default 0: one per core)", type=int)
    option("torch-threads", "threads torch uses in one batch (default 0: cores / compute threads)", type=int)
    option(
        "inline-below-ms",
        "run batches predicted to take at most this long on the event loop, not a thread (default 0: never)",
        type=float,
    )
    option("max-body-bytes", "largest request body; larger ones get 413 unread (default 64 MiB)", type=int)
    option("max-decoded-bytes", "largest frontier one request may decode to (default 256 MiB)", type=int)
    option("response-codec", "codec of the outputs sent back (default f32)")
    option("token-file", "file of bearer tokens, one a line; unset: no authentication", metavar="FILE")
    option(
        "public-probes",
        "serve health and metrics without a token (default: they need one too)",
        action="store_const",
        const=True,
    )
    option("tls-cert", "PEM certificate chain: serve HTTPS (with --tls-key)", metavar="FILE")
    option("tls-key", "PEM private key of --tls-cert", metavar="FILE")
    option("tls-client-ca", "PEM CA bundle: require client certificates (mutual TLS)", metavar="FILE")
    option(
        "metrics-port",
        "serve /metrics and health on this separate plain-HTTP port instead of the API port",
        type=int,
    )
    option(
        "drain-timeout-s",
        "after SIGTERM, seconds admitted requests get to finish before the process exits (default 30)",
        type=float,
    )
    option(
        "read-timeout-s",
        "longest a client may take to send a request's headers or body; slower ones get 408 (default 60)",
        type=float,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    from splitinfer.cloud import ServerConfig, serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ServerConfig)}
    config = ServerConfig.from_env(**options)
    return 0 if serve(config) else 3  # 3: the drain timeout cut admitted requests short


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="every split policy, live, on EfficientNet-Lite0 over a real 3G trace (about 2 minutes)",
        description=(
            "Compile EfficientNet-Lite0 with its real weights (calibrated on real photos; cached, so "
            "only the first run compiles: under a minute, or a few on a busy machine), start the "
            "cloud server on 127.0.0.1, and run the edge client with each policy (adaptive, "
            "neurosurgeon, cloud, local, static) side by side through the link emulator replaying "
            "the same stretch of a real 3G trace, with a device N times slower than this machine. "
            "Prints a table per policy and writes a report (Markdown, CSV, PNG plots). Ctrl-C stops "
            "everything it started."
        ),
    )
    p.add_argument(
        "--trace",
        default=None,
        metavar="NAME|FILE",
        help="shipped trace name or a trace file (default norway-3g-train-1)",
    )
    p.add_argument(
        "--offset", type=float, default=30.0, metavar="S", help="seconds into the trace to start (default 30)"
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
        help="emulated device N times slower than this machine (default: where running all on the device "
        "ties with sending the input to the cloud on this stretch)",
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

    from splitinfer._demo import DEFAULT_TRACE, DemoConfig, run_demo
    from splitinfer.netem import parse_duration

    config = DemoConfig(
        model="democnn" if args.quick else "efficientnet-lite0",
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


def _add_compile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
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
        required=True,
        metavar="D0,D1,...",
        help="shape of one example input, batch first; repeat for several inputs",
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

    import torch

    from splitinfer.partitioner import compile
    from splitinfer.tensors import dtype_from_name

    module_name, _, attr = args.factory.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"give the model factory as MODULE:FACTORY, got {args.factory!r}")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {args.factory}: {exc}") from None
    shapes = [_parse_shape(s) for s in args.input_shape]
    dtypes = args.input_dtype or []
    if len(dtypes) not in (0, len(shapes)):
        raise ConfigError(f"give one --input-dtype per --input-shape ({len(shapes)}), or none")
    inputs = []
    for i, shape in enumerate(shapes):
        dtype = dtype_from_name(dtypes[i]) if dtypes else torch.float32
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=dtype))
        elif dtype == torch.bool:
            inputs.append(torch.ones(shape, dtype=dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype))
    model = factory()
    bundle = compile(model, tuple(inputs), name=args.name, version=args.model_version, verbose=True)
    out = bundle.save(args.out)
    print(f"wrote {out} ({len(bundle.cuts)} cuts, graph {bundle.graph_hash})")
    return 0


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
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


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitinfer.bundle import Cut, read_manifest

    root = Path(args.bundle)
    manifest = read_manifest(root)
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    print(f"bundle   {manifest['name']} version {manifest.get('version')}  ({size / 2**20:.1f} MiB on disk)")
    print(f"graph    {manifest['graph_hash']}")
    print(f"codecs   {', '.join(manifest.get('codecs', []))}")
    cuts = [Cut.from_json(c) for c in manifest["cuts"]]
    width = max(len(c.name) for c in cuts)
    print(f"{'cut':>4}  {'name':<{width}}  {'KiB@1':>9}  tensors")
    best = _best_codecs(manifest.get("fidelity", {}), args.budget)
    head = f"{'cut':>4}  {'name':<{width}}  {'KiB@1':>9}  "
    if best:
        head += f"{'smallest at fidelity >= ' + str(args.budget):<38}  "
    print(head + "tensors")
    for c in cuts:
        tensors = ", ".join(str(t) for t in c.tensors)
        line = f"{c.index:>4}  {c.name:<{width}}  {c.nbytes / 1024:>9.1f}  "
        if best:
            row = best.get(c.index)
            pick = f"{row['codec']} {row['bytes'] / 1024:.1f} KiB ({row['fidelity']:.3f})" if row else "-"
            line += f"{pick:<38}  "
        print(line + tensors)
    fidelity = manifest.get("fidelity", {})
    if fidelity.get("table"):
        print(
            f"fidelity: {fidelity.get('metric')} agreement with the uncompressed model on "
            f"{fidelity.get('samples')} calibration input(s); bytes are the mean per request at batch 1"
        )
    return 0


def _best_codecs(fidelity: dict[str, Any], budget: float) -> dict[int, dict[str, Any]]:
    """Per cut, the smallest codec whose fidelity meets ``budget``."""
    best: dict[int, dict[str, Any]] = {}
    for row in fidelity.get("table", []):
        if row["fidelity"] >= budget and (row["cut"] not in best or row["bytes"] < best[row["cut"]]["bytes"]):
            best[row["cut"]] = row
    return best


def _add_netem(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "netem",
        help="run the trace-driven link emulator (a shaping TCP proxy)",
        description=(
            "Proxy TCP connections from --listen to --upstream, shaping each direction by a "
            "bandwidth trace ('<seconds> <Mbit/s>' per line, looped), a constant rate or a named "
            "profile, plus a one-way delay. Shipped traces: "
            + ", ".join(sorted(_shipped_trace_names()))
            + ". Example: splitinfer netem --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080 "
            "--trace norway-3g-train-1 --delay 40ms"
        ),
    )
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the server to proxy to")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--trace", metavar="FILE|NAME", help="uplink bandwidth trace (file or shipped name)")
    shape.add_argument("--rate", metavar="RATE", help="constant uplink rate, e.g. 2Mbit")
    shape.add_argument("--profile", choices=["3g", "lte", "wifi", "5g"], help="a named network profile")
    p.add_argument("--downlink-trace", metavar="FILE|NAME", help="downlink trace (default: as uplink)")
    p.add_argument("--downlink-rate", metavar="RATE", help="constant downlink rate (default: as uplink)")
    p.add_argument("--delay", default=None, metavar="TIME", help="one-way delay, e.g. 40ms (default 0)")
    p.add_argument(
        "--loss-events",
        default="",
        metavar="T1,T2,...",
        help="seconds after start at which to cut all connections",
    )
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_netem)


def _shipped_trace_names() -> list[str]:
    from splitinfer.netem import shipped_traces

    return list(shipped_traces())


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _netem(args: argparse.Namespace) -> int:
    import asyncio

    from splitinfer.netem import PROFILES, BandwidthTrace, LinkEmulator, parse_duration, parse_rate

    delay = 0.0
    if args.profile:
        profile = PROFILES[args.profile]
        uplink = BandwidthTrace.constant(profile.uplink_bps)
        downlink = BandwidthTrace.constant(profile.downlink_bps)
        delay = profile.delay_s
    else:
        uplink = (
            BandwidthTrace.load(args.trace) if args.trace else BandwidthTrace.constant(parse_rate(args.rate))
        )
        downlink = uplink
    if args.downlink_trace:
        downlink = BandwidthTrace.load(args.downlink_trace)
    elif args.downlink_rate:
        downlink = BandwidthTrace.constant(parse_rate(args.downlink_rate))
    if args.delay is not None:
        delay = parse_duration(args.delay)
    try:
        losses = [float(t) for t in args.loss_events.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--loss-events takes comma-separated seconds, got {args.loss_events!r}") from None

    async def run() -> None:
        async with LinkEmulator(
            _host_port(args.upstream),
            uplink=uplink,
            downlink=downlink,
            delay_s=delay,
            listen=_host_port(args.listen),
            disconnects=losses,
        ) as emulator:
            print(
                f"netem listening on {emulator.listen[0]}:{emulator.port} -> {args.upstream} "
                f"(uplink {uplink.name}, mean {uplink.mean_bps() / 1e6:.2f} Mbit/s; "
                f"delay {delay * 1000:.0f} ms)",
                flush=True,
            )
            await asyncio.sleep(args.duration if args.duration else float("inf"))

    asyncio.run(run())
    return 0


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
    from splitinfer._loadtest import format_summary, prepare

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitinfer",
        description=(
            "Split inference for PyTorch: the edge runs a model's head, the cloud its tail, and "
            "a partitioner picks the cut and codec per request."
        ),
    )
    parser.add_argument("--version", action="version", version=f"splitinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from splitinfer.partitioner._cli import add_plan_parser, add_profile_parser

    for add in (
        _add_compile,
        _add_inspect,
        add_profile_parser,
        add_plan_parser,
        _add_serve,
        _add_netem,
        _add_demo,
        _add_loadtest,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SplitInferError as exc:
        print(f"splitinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `splitinfer inspect DIR | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"splitinfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
