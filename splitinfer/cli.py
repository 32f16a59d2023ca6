"""The ``splitinfer`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from splitinfer._version import __version__
from splitinfer.errors import SplitInferError

__all__ = ["main"]


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the cloud tail server",
        description=(
            "Serve the tails of every bundle under --repository over HTTP. Each option can also "
            "be set by an environment variable SPLITINFER_<OPTION> (e.g. SPLITINFER_PORT); the "
            "command line wins."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repository", metavar="DIR", help="directory holding one bundle per subdirectory")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body; larger ones get 413 (default 64 MiB)",
    )
    p.add_argument("--compute-threads", type=int, help="threads running decode and tail compute (default 1)")
    p.add_argument("--torch-threads", type=int, help="threads torch uses per computation (default: torch's)")
    p.add_argument("--response-codec", help="codec of the outputs sent back (default f32)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from splitinfer.cloud import ServerConfig, create_app

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.from_env(
        repository=args.repository,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        compute_threads=args.compute_threads,
        torch_threads=args.torch_threads,
        response_codec=args.response_codec,
    )
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=lambda msg: print(msg, flush=True),
        access_log=None,
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a request from an edge client through a real cloud server on 127.0.0.1",
        description=(
            "Compile a small CNN, start the cloud server on 127.0.0.1 (a free port), send requests "
            "from the edge client at a cut, and compare the outputs with the unsplit model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=5, help="requests to send")
    p.add_argument("--cut", type=int, default=None, help="cut to split at (default: the middle)")
    p.add_argument("--codec", default="f32+zstd1", help="codec of the frontier")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from splitinfer._demo import run_demo

    return run_demo(requests=args.requests, cut=args.cut, codec=args.codec)


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
    for add in (_add_serve, _add_demo):
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
    except KeyboardInterrupt:
        print(f"splitinfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
