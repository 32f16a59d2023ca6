"""A profile wrong per segment, replayed: what it costs adaptive after 50 requests (issue 28 item 5).

Appends a section to benchmarks/results/profile.md. Run:
`.venv/bin/python benchmarks/bench_profile_correction.py --bundle DIR [--wrong-profile 3]`.

The replay is bench_policy.py's (its Runner and events: a request every 200 ms, the link the
trace, an 80 ms round trip, the edge's warm-up at the last cut, probes when the estimator asks),
for the ``adaptive`` policy alone (hedged, as the edge is) at the device slowdown where local and
cloud tie. The world runs at the bundle's true profile; the edge's policy and estimator are
given a profile whose batch-1 segment times are scaled by ``X`` and ``1 / X`` alternately
(segment 0 by ``1 / X``), so no single device factor can fix it. Three edges per trace:

- ``correct``: the true profile;
- ``per-cut``: the wrong profile, the estimator correcting each cut's head (the product);
- ``scalar``: the wrong profile, every head priced at the device scalar alone (the estimator
  before issue 28: ``Estimates.head_slowdown`` emptied before each decision);
- ``no-optimism``: the true profile, cuts never observed priced by interpolation alone
  (``head_optimism=0``): what trying unobserved cuts once costs when the profile is right.

Reported: mean latency of the requests after the first ``--after`` (50), per trace set and
traces counted equally, and each wrong edge's cost over ``correct``. The target: ``per-cut``
costs at most 5 %.

``--live`` runs the same comparison live instead (its own section of the results file): a real
``splitinfer serve`` of the bundle's repository on 127.0.0.1 (one compute thread), and per edge
and round a fresh ``LinkEmulator`` (a fixed rate, ``--live-rate`` Mbit/s, 40 ms each way) and a fresh
``EdgeClient`` (adaptive, hedged) on a device ``--live-slowdown`` times slower than this
machine, warmed up as the edge is (``awarm_up``), sending ``--live-requests`` real photos one at
a time (at most one every 200 ms, at most ``--live-seconds`` per run). Two edges: ``correct``
(the bundle as it is) and ``wrong`` (its profile scaled as above). The device's time is this
machine's time for the work times the slowdown (``emulate="measured"``, not the profile's: the
truth must not be the profile either edge is given), so the machine's load enters it: the two
edges run side by side (warmed up one at a time), each round with fresh clients, so that the
load enters both alike.
Reported: the mean of each run's requests after the first ``--after``, averaged over rounds,
wrong / correct, per-round ratios, and the cuts each edge chose.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_TRACES, RESULTS, load_average, machine, trace_sets, write_section
from bench_policy import BUDGET, INTERVAL_S, QUEUE_S, RTT_JITTER, RTT_S, Runner

from splitinfer.lab.evaluation import Link, World, tie_slowdown
from splitinfer.manifest import Manifest
from splitinfer.partitioner import Estimator, hedge_after, make_policy

EDGES = ("correct", "per-cut", "scalar", "no-optimism")


def wrong_profile(bundle: Manifest, factor: float) -> Manifest:
    """``bundle`` with every profile's batch-1 segment times scaled by ``1/factor``, ``factor``,
    ``1/factor``, ... (segment 0 first)."""
    profiles = copy.deepcopy(bundle.profiles)
    for prof in profiles.values():
        seg = prof["segments"]["1"]
        for key in ("median_s", "p90_s"):
            if key in seg:
                seg[key] = [s * (factor if i % 2 else 1.0 / factor) for i, s in enumerate(seg[key])]
    return replace(bundle, profiles=profiles)


def replay(true: Manifest, wrong: Manifest, link: Link, ds: float, seed: int) -> dict[str, list[float]]:
    """Latency of every request of ``link`` for each edge of :data:`EDGES`."""
    rng = np.random.default_rng(seed)
    world = World(
        make_policy("adaptive", true, fidelity_budget=BUDGET, explore=0.0), link, ds, rng, queue_s=QUEUE_S
    )
    edges = (
        ("correct", true, 0.5),
        ("per-cut", wrong, 0.5),
        ("scalar", wrong, 0.5),
        ("no-optimism", true, 0.0),
    )
    runners = {
        name: Runner(
            make_policy("adaptive", b, fidelity_budget=BUDGET, seed=seed),
            Estimator(b, head_optimism=optimism),
        )
        for name, b, optimism in edges
    }
    n = true.last_cut
    for r in runners.values():  # the edge's warm-up inference at the last cut
        assert r.estimator is not None
        r.estimator.observe_head(n, float(world.head[world.local]), now=0.0)
    for t in np.arange(0.0, link.duration, INTERVAL_S):
        t = float(t)
        rtt = RTT_S * math.exp(RTT_JITTER * rng.standard_normal())
        for name, r in runners.items():
            est_obj = r.estimator
            assert est_obj is not None
            r.catch_up(t, None)
            est = est_obj.estimates(now=t)
            if name == "scalar":
                est = replace(est, head_slowdown=())
            d = r.policy.decide(est)
            row = world.row(d.cut, d.codec)
            head_s = float(world.head[row]) if d.cut < n else float(world.device_s[row])
            r.push(t + head_s, "head", (d.cut, head_s))
            if d.cut == n:
                r.latencies.append(head_s)
            else:
                start, first, end = (float(x) for x in world.realize(row, t, rtt))
                latency = end - t
                # hedged, as the edge is: the device finishes once the answer is overdue
                local = float(world.device_s[row]) + hedge_after(d, est)
                latency = min(latency, local + float(world.head[world.local] - world.head[row]))
                r.latencies.append(latency)
                timing = (
                    f"queue;dur={QUEUE_S * 1000:.3f}, compute;dur={world.cloud_s[row] * 1000:.3f}, "
                    f"total;dur={(QUEUE_S + float(world.cloud_s[row])) * 1000:.3f}"
                )
                up, down = float(world.bits[row] / 8), world.response_bits / 8
                tid = est_obj.start_transfer(up, start, cut=d.cut)
                r.push(end, "transfer", (up, down, start, first, end, timing, d.cut, tid))
            if est_obj.needs_probe(now=t) and t >= r.probe_until:
                size = est_obj.probe_bytes()
                rtt_seen = RTT_S * math.exp(RTT_JITTER * rng.standard_normal())
                up_done = float(link.done(t + rtt_seen, size * 8))
                r.push(t + rtt_seen, "rtt", (rtt_seen,))
                r.push(
                    up_done + RTT_S,
                    "transfer",
                    (size, 0, t + rtt_seen, up_done + RTT_S, up_done + RTT_S, None, None, None),
                )
                r.probe_until = up_done + RTT_S
    return {name: r.latencies for name, r in runners.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="a profiled bundle's folder (its manifest); default: the demo's EfficientNet-Lite0 "
        "bundle, compiled and profiled once (cached as `make demo` caches it)",
    )
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="a folder of trace sets")
    parser.add_argument("--limit", type=int, default=12, help="traces per set")
    parser.add_argument("--wrong-profile", type=float, default=3.0, help="X: segments scaled by 1/X, X, ...")
    parser.add_argument("--after", type=int, default=50, help="requests not counted at the start")
    parser.add_argument(
        "--speeds",
        default="0.25,0.5,1",
        help="device slowdowns as multiples of the one where local and cloud tie (comma-separated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "profile.md", help="the file a section is appended to"
    )
    live = parser.add_argument_group("live (--live: a real server, link emulator and EdgeClient)")
    live.add_argument("--live", action="store_true", help="run the live comparison instead of the replay")
    live.add_argument("--live-rounds", type=int, default=5, help="rounds of one run per edge (default 5)")
    live.add_argument("--live-requests", type=int, default=100, help="requests per run (default 100)")
    live.add_argument("--live-seconds", type=float, default=75.0, help="at most this long per run")
    live.add_argument("--live-rate", type=float, default=2.0, help="the link's fixed rate, Mbit/s")
    live.add_argument(
        "--live-slowdown",
        type=float,
        help="device slowdown (default: half the one where local and cloud tie on the link)",
    )
    args = parser.parse_args()
    if args.wrong_profile <= 0:
        parser.error("--wrong-profile must be > 0")
    if args.bundle is None:  # `make bench` runs every benchmark without arguments
        from bench_policy import demo_bundle

        args.bundle = demo_bundle([])
    if args.live:
        if args.live_requests <= args.after:
            parser.error(f"--live-requests must be above --after ({args.after}): those are not counted")
        if args.live_rounds < 1 or args.live_rate <= 0:
            parser.error("--live-rounds must be >= 1 and --live-rate > 0")
        return live_main(args)
    true = Manifest.load(args.bundle)
    wrong = wrong_profile(true, args.wrong_profile)
    load_before = load_average()
    sets = {
        name: [Link.read(p) for p in files] for name, files in trace_sets(args.traces, args.limit).items()
    }
    rows = []
    speeds = [float(x) for x in args.speeds.split(",")]
    for set_name, links in sets.items():
        tie = tie_slowdown(true, [(link, link.duration, "") for link in links])
        for speed in speeds:
            ds = max(1.0, round(tie * speed))
            means: dict[str, list[float]] = {e: [] for e in EDGES}
            for i, link in enumerate(links):
                lat = replay(true, wrong, link, ds, args.seed + i)
                for e in EDGES:
                    if len(lat[e]) > args.after:
                        means[e].append(statistics.fmean(lat[e][args.after :]))
            m = {e: statistics.fmean(v) for e, v in means.items()}
            rows.append((set_name, len(means["correct"]), ds, m))
            print(set_name, ds, {e: round(v * 1000, 1) for e, v in m.items()}, file=sys.stderr)
    write(args, rows, load_before, load_average())
    return 0


def write(
    args: argparse.Namespace, rows: list[tuple[str, int, float, dict[str, float]]], before: str, after: str
) -> None:
    x = args.wrong_profile
    lines = [
        "",
        f"## A profile {x:g}x wrong per segment, corrected on the edge (replay)",
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_profile_correction.py --bundle DIR "
        f"--wrong-profile {x:g} --limit {args.limit} --speeds {args.speeds}` (bundle: {args.bundle}). "
        "How: the script's docstring. "
        f"Segment times given to the edge: x{1 / x:.3g}, x{x:g}, x{1 / x:.3g}, ... of the true profile; "
        f"mean latency of the requests after the first {args.after}, traces counted equally. "
        f"{machine()}; load {before} at the start, {after} at the end.",
        "",
        "| trace set | traces | device slowdown | correct profile ms | wrong, per-cut correction ms | cost "
        "| wrong, device scalar only ms | cost | correct, no optimism ms | cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = -math.inf
    for name, n, ds, m in rows:
        c, p, s, o = m["correct"], m["per-cut"], m["scalar"], m["no-optimism"]
        worst = max(worst, p / c - 1)
        lines.append(
            f"| {name} | {n} | {ds:g} | {c * 1000:.1f} | {p * 1000:.1f} | {(p / c - 1) * 100:+.1f} % | "
            f"{s * 1000:.1f} | {(s / c - 1) * 100:+.1f} % | {o * 1000:.1f} | {(o / c - 1) * 100:+.1f} % |"
        )
    verdict = "**met**" if worst <= 0.05 else "**missed**"
    lines += [
        "",
        f"Target (issue 28): the wrong profile costs adaptive <= 5 % of mean latency after {args.after} "
        f"requests, in replay: {verdict} (worst {worst * 100:+.1f} %). "
        "Live (a real server, link emulator and EdgeClient): `--live`, its own section.",
    ]
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")


# -- live: a real server, a link emulator and an EdgeClient per run ---------------------------------

LIVE_EDGES = ("correct", "wrong")
LIVE_DELAY_S = 0.04


@dataclass(frozen=True)
class LiveRun:
    """One edge's run: per request its latency, cut and codec, and whether it finished locally
    although sent (a fallback or hedge)."""

    edge: str
    round: int
    latencies: list[float]
    cuts: list[int]
    codecs: list[str]
    fallbacks: int
    seconds: float


def live_main(args: argparse.Namespace) -> int:
    """The live comparison (module docstring): runs, then its section of ``--out``."""
    import torch

    import splitinfer as si
    from splitinfer.lab import ServerProcess, photo_batch
    from splitinfer.netem import BandwidthTrace

    torch.set_num_threads(1)
    load_before = load_average()
    started = time.perf_counter()
    edges = {e: si.Bundle.load(args.bundle) for e in LIVE_EDGES}
    edges["wrong"].profiles = wrong_profile(edges["wrong"], args.wrong_profile).profiles
    true = edges["correct"]
    rate = BandwidthTrace.constant(args.live_rate * 1e6)
    if args.live_slowdown:
        ds = float(args.live_slowdown)
    else:
        link = Link.from_trace(rate, 60.0)
        ds = max(1.0, round(tie_slowdown(true, [link], rtt_s=2 * LIVE_DELAY_S, budget=BUDGET) / 2))
    size = int(true.inputs[0].shape[-1])
    images = photo_batch(16, size=size, seed=2)
    runs: list[LiveRun] = []
    options = ("--compute-threads", "1", "--torch-threads", "1", "--drain-timeout-s", "2")
    with ServerProcess(args.bundle.resolve().parent, *options) as server:
        for r in range(args.live_rounds):
            order = LIVE_EDGES if r % 2 == 0 else LIVE_EDGES[::-1]
            for run in asyncio.run(live_round(server.url, edges, order, r, images, rate, ds, args)):
                runs.append(run)
                edge = run.edge
                counted = run.latencies[args.after :]
                mean = statistics.fmean(counted) * 1000 if counted else math.nan
                print(
                    f"round {r + 1} {edge}: {len(run.latencies)} requests in {run.seconds:.0f} s, "
                    f"mean after {args.after}: {mean:.1f} ms, cuts {dict(Counter(run.cuts[args.after :]))}",
                    file=sys.stderr,
                    flush=True,
                )
    about = (
        f"`{args.bundle.name}` ({len(true.cuts)} cuts; codecs {', '.join(true.codecs)}; fidelity on "
        f"{true.fidelity.get('samples')} inputs)"
    )
    write_live(args, runs, about, ds, load_before, load_average(), time.perf_counter() - started)
    return 0


async def live_round(
    url: str,
    edges: dict[str, Any],
    order: tuple[str, ...],
    round_: int,
    images: Any,
    rate: Any,
    ds: float,
    args: argparse.Namespace,
) -> list[LiveRun]:
    """One round: per edge a fresh link emulator to the server at ``url`` and a fresh client,
    warmed up one at a time (in ``order``), then every edge's requests side by side."""
    from splitinfer.edge import EdgeClient
    from splitinfer.netem import LinkEmulator

    host, port = url.removeprefix("http://").rsplit(":", 1)
    emulators = {e: LinkEmulator((host, int(port)), uplink=rate, delay_s=LIVE_DELAY_S) for e in order}
    clients: dict[str, Any] = {}
    try:
        for e in order:
            await emulators[e].start()
            clients[e] = EdgeClient(
                f"http://127.0.0.1:{emulators[e].port}",
                bundle=edges[e],
                policy="adaptive",
                device_slowdown=ds,
                emulate="measured",
                fidelity_budget=BUDGET,
                deadline_s=10.0,
                seed=args.seed + round_,
            )
        for e in order:  # one at a time: the device's speed measured without the other's work
            await clients[e].awarm_up(images[:1])
        return list(await asyncio.gather(*(drive(clients[e], e, round_, images, args) for e in order)))
    finally:
        for client in clients.values():
            await client.aclose()
        for em in emulators.values():
            em.disconnect_all()
        await asyncio.sleep(0.2)
        for em in emulators.values():
            await em.stop()


async def drive(client: Any, edge: str, round_: int, images: Any, args: argparse.Namespace) -> LiveRun:
    """``--live-requests`` requests of ``client``, one at a time, at most one every 200 ms and
    for at most ``--live-seconds``."""
    lat: list[float] = []
    cuts: list[int] = []
    codecs: list[str] = []
    fallbacks = 0
    t0 = time.monotonic()
    for i in range(args.live_requests):
        next_at = t0 + i * INTERVAL_S
        if (now := time.monotonic()) < next_at:
            await asyncio.sleep(next_at - now)
        if time.monotonic() - t0 >= args.live_seconds:
            break
        j = i % len(images)
        await client.ainfer(images[j : j + 1])
        trace = client.last_trace
        assert trace is not None
        lat.append(trace.stages["total"])
        cuts.append(trace.cut)
        codecs.append(trace.codec)
        fallbacks += bool(trace.fallback)
    return LiveRun(edge, round_, lat, cuts, codecs, fallbacks, time.monotonic() - t0)


def live_summary(runs: list[LiveRun], after: int) -> dict[str, Any]:
    """Per edge: the mean over rounds of each run's mean after ``after`` requests, the counted
    requests, the cuts chosen; and per round wrong / correct."""
    out: dict[str, Any] = {"edges": {}, "rounds": []}
    for edge in LIVE_EDGES:
        mine = [r for r in runs if r.edge == edge and len(r.latencies) > after]
        chosen = Counter(f"{c} {k}" for r in mine for c, k in zip(r.cuts[after:], r.codecs[after:]))
        out["edges"][edge] = {
            "mean_s": statistics.fmean(statistics.fmean(r.latencies[after:]) for r in mine)
            if mine
            else math.nan,
            "requests": sum(len(r.latencies) - after for r in mine),
            "runs": len(mine),
            "fallbacks": sum(r.fallbacks for r in mine),
            "chosen": chosen.most_common(),
        }
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if len(r.latencies) > after:
            by_round.setdefault(r.round, {})[r.edge] = statistics.fmean(r.latencies[after:])
    out["rounds"] = [m["wrong"] / m["correct"] for _, m in sorted(by_round.items()) if len(m) == 2]
    e = out["edges"]
    out["ratio"] = e["wrong"]["mean_s"] / e["correct"]["mean_s"]
    return out


def write_live(
    args: argparse.Namespace,
    runs: list[LiveRun],
    about: str,
    ds: float,
    before: str,
    after: str,
    wall_s: float,
) -> None:
    x = args.wrong_profile
    summary = live_summary(runs, args.after)
    heading = f"## A profile {x:g}x wrong per segment, corrected on the edge (live)"
    e = summary["edges"]
    ratio = summary["ratio"]
    verdict = "**met**" if ratio <= 1.05 else "**missed**"
    lines = [
        heading,
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_profile_correction.py --live --bundle DIR "
        f"--wrong-profile {x:g} --live-rounds {args.live_rounds} --live-requests {args.live_requests} "
        f"--live-seconds {args.live_seconds:g} --live-rate {args.live_rate:g} --live-slowdown {ds:g}`, "
        f"DIR {about}. How: the script's docstring (`--live`). "
        f"Link: a fixed {args.live_rate:g} Mbit/s each way, 80 ms round trip (`LinkEmulator`); device "
        f"{ds:g}x slower than this machine (measured, not profiled, time); `splitinfer serve`, one compute "
        "thread; the two edges side by side (each on its own emulator), "
        f"{args.live_rounds} rounds of fresh clients; mean latency of the requests after the "
        f"first {args.after} of each run, rounds counted equally. {machine()}; load {before} at the start, "
        f"{after} at the end; {wall_s / 60:.1f} min in all.",
        "",
        "| edge's profile | runs | requests counted | mean ms | sent with fallback or hedge | cuts chosen "
        "(counted requests) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for edge, words in (("correct", "correct"), ("wrong", f"{x:g}x wrong per segment")):
        m = e[edge]
        chosen = ", ".join(f"{c}: {n}" for c, n in m["chosen"][:6])
        lines.append(
            f"| {words} | {m['runs']} | {m['requests']} | {m['mean_s'] * 1000:.1f} | {m['fallbacks']} "
            f"| {chosen} |"
        )
    rounds = ", ".join(f"{q:.3f}" for q in summary["rounds"])
    lines += [
        "",
        f"Wrong / correct: **{ratio:.3f}** (per round: {rounds}). Target (issue 28): the wrong profile "
        f"costs adaptive <= 5 % of mean latency after {args.after} requests, live: {verdict} "
        f"({(ratio - 1) * 100:+.1f} %).",
        "",
    ]
    write_section(args.out, heading, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
