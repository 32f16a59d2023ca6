"""The link emulator's subcommand: ``splitinfer netem``.

:func:`register` adds it to the ``splitinfer`` dispatcher (splitinfer/cli.py). Only argparse
and the standard library load with this module (and the names of the shipped traces, for the
help text); the command imports the emulator when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from splitinfer.errors import ConfigError

if TYPE_CHECKING:
    from splitinfer.netem._trace import BandwidthTrace

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``netem`` to the ``splitinfer`` command."""
    _add_netem(subparsers)


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
    from splitinfer.netem._trace import shipped_traces

    return list(shipped_traces())


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _describe_link(uplink: BandwidthTrace, delay_s: float) -> str:
    """What ``splitinfer netem`` says about its link: the uplink's time-weighted mean
    (:meth:`BandwidthTrace.mean_bps`, the one definition docs/netem.md uses) and the delay."""
    return (
        f"uplink {uplink.name}, time-weighted mean {uplink.mean_bps() / 1e6:.2f} Mbit/s; "
        f"delay {delay_s * 1000:.0f} ms"
    )


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
                f"({_describe_link(uplink, delay)})",
                flush=True,
            )
            await asyncio.sleep(args.duration if args.duration else float("inf"))

    asyncio.run(run())
    return 0
