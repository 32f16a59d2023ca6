"""The cloud's subcommand: ``splitinfer serve``.

:func:`register` adds it to the ``splitinfer`` dispatcher (splitinfer/cli.py). Only argparse
and the standard library load with this module; the command imports the server when it runs.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``splitinfer`` command."""
    _add_serve(subparsers)


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
        "runtime",
        "where tails run: torch, onnxruntime (the bundle's ONNX graph) or auto (default torch)",
        choices=["torch", "onnxruntime", "auto"],
    )
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
    option("device", "where tails run: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    option(
        "share-weights",
        "keep segments equal across models (a shared backbone) once in memory (default: on)",
        action=argparse.BooleanOptionalAction,
    )
    option("max-versions", "serve the newest N versions of each model (default 0: all)", type=int)
    option(
        "poll-repository-s",
        "rescan the repository every S seconds, hot-reloading changes (default 0: SIGHUP or a load request)",
        type=float,
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
