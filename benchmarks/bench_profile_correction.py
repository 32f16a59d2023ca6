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
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import DEFAULT_TRACES, RESULTS, load_average, machine, trace_sets
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
        "--bundle", type=Path, required=True, help="a profiled bundle's folder (its manifest)"
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
    args = parser.parse_args()
    if args.wrong_profile <= 0:
        parser.error("--wrong-profile must be > 0")
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
        "Live (edge clients on a real link) was not run.",
    ]
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
