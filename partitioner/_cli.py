"""The ``splitinfer plan`` and ``splitinfer profile`` subcommands.

``add_plan_parser(subparsers)`` and ``add_profile_parser(subparsers)`` each add one subcommand
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code and raises ConfigError
(the caller prints it) for a bad argument. Rates are written like ``2Mbit``, ``500kbit``,
``1.5Gbit`` (bits per second; ``/s`` and ``bps`` forms too, and ``kB/s``, ``MB/s`` for bytes),
times like ``80ms``, ``0.1s``, ``250us``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from splitinfer.bundle import Bundle, read_manifest, update_manifest
from splitinfer.errors import ConfigError

__all__ = ["add_plan_parser", "add_profile_parser", "parse_duration", "parse_rate"]

_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}
_BYTE_UNITS = {"B": 8.0, "kB": 8e3, "KB": 8e3, "MB": 8e6, "GB": 8e9, "KiB": 8 * 1024.0, "MiB": 8 * 2.0**20}
_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_rate(text: str, what: str = "rate") -> float:
    """Bits per second from ``2Mbit``, ``500kbit/s``, ``1.5Gbit``, ``20mbps`` or ``250kB/s``."""
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]+)(/s)?\s*", str(text))
    if m:
        value, unit, per_s = float(m.group(1)), m.group(2), m.group(3)
        factor = _BYTE_UNITS.get(unit) if per_s else None
        if factor is None and unit.lower() in _RATE_UNITS and not (per_s and unit.lower().endswith("ps")):
            factor = _RATE_UNITS[unit.lower()]
        if factor is not None and value > 0 and math.isfinite(value * factor):
            return value * factor
    raise ConfigError(
        f"{what} must be a positive rate with a unit, such as 2Mbit, 500kbit, 1.5Gbit or 250kB/s; "
        f"got {text!r}"
    )


def parse_duration(text: str, what: str = "time") -> float:
    """Seconds from ``80ms``, ``0.1s``, ``250us`` (a unit is required)."""
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]+)\s*", str(text))
    if m and m.group(2) in _TIME_UNITS:
        value = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if math.isfinite(value):
            return value
    raise ConfigError(f"{what} must be a duration with a unit, such as 80ms, 0.1s or 250us; got {text!r}")


def load_metadata(path: str | Path) -> Bundle:
    """A bundle's cuts, codecs, fidelity and profiles from its manifest, without its segments."""
    return Bundle.load(path, upto_cut=0)  # a range of no segments: only the manifest is read


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
    bundle = load_metadata(args.bundle)
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
        f"device x{e.device_slowdown:g} (best codec per cut; cut {last_cut} = all on device)"
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
    from splitinfer.partitioner._profile import profile_bundle

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
    profile = profile_bundle(
        bundle,
        batch_sizes=sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        progress=not args.quiet,
    )
    profiles = dict(read_manifest(root).get("profiles", {}))
    profiles[args.name] = profile
    update_manifest(root, profiles=profiles)
    whole = {b: sum(s["median_s"]) * 1000 for b, s in profile["segments"].items()}
    print(
        f"profile {args.name!r} of {bundle.name}: whole model "
        + ", ".join(f"{ms:.2f} ms at batch {b}" for b, ms in whole.items())
        + f"; {len(profile['codecs'])} codec measurements; stored in {root}"
    )
    return 0
