"""`make demo`, run several times: does adaptive have the lowest mean and p95 in most runs?

Writes benchmarks/results/demo.md. Run: `.venv/bin/python benchmarks/bench_demo.py [--runs 5]
[-- DEMO ARGS]`: every run is the real `splitinfer demo` in a subprocess (server, link emulators,
edge clients, the tenant), with its defaults unless arguments for it follow `--` (for example
`-- --scenario single`). The bundle is compiled on the first run if it is not cached; that run
is then a warm-up, not counted (a run that compiled is shorter, docs in `splitinfer demo --help`).

The issue's target (18): adaptive has the lowest mean and p95 in at least 4 of 5 runs. A p95
within 0.5 % of the lowest counts as a tie (the requests differ in number between policies:
a few hundred per run).

``--fresh`` (issue 28): every run compiles, in a cache of its own (``XDG_CACHE_HOME`` set to an
empty folder), as a new user's first `make demo` does, and every run counts. ``--busy N``: N
CPU-bound processes (``python -c "while True: pass"``) run beside each run, compile included, as
on a laptop busy with other work. The load average is recorded at the start and end of each run.
Each policy's measured agreement is checked against the budget: a run fails it where the Wilson
95 % interval of the agreement over its requests lies wholly below the budget.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: One line of the demo's table (splitinfer.lab._report.format_table).
ROW = re.compile(
    r"^(?P<policy>[\w-]+)\s+(?P<n>\d+)\s+(?P<mean>\d+)\s+(?P<p95>\d+)\s+(?P<ratio>[\d.na]+)\s+(?P<kib>[\d.]+)\s+"
    r"(?P<agree>[\d.]+)%\s+(?P<fallbacks>\d+)\s+(?P<shares>\d+%/\d+%/\d+%)\s+(?P<mix>.+)$"
)
TIE = 1.005
#: Rows that are not a deployable policy (the demo's hindsight-tuned static): shown, not competed with.
EXTRA = {"static-hindsight"}


def run_once(
    demo_args: list[str], out: Path, timeout_s: float, cache: Path | None = None, busy: int = 0
) -> tuple[dict[str, dict[str, str]], str, float]:
    """One `splitinfer demo`: its table rows by policy, its stdout and its wall time. ``cache``:
    the XDG cache folder it runs with (an empty one: it compiles); ``busy``: CPU-bound processes
    spinning beside it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)} if cache is not None else None
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "splitinfer", "demo", "--no-progress", "--out", str(out), *demo_args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:  # say what it had printed: which step was slow
        raise SystemExit(
            f"splitinfer demo took more than {timeout_s:.0f} s (--timeout); it had printed:\n"
            + (exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or "")
        ) from None
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"splitinfer demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    rows = {m["policy"]: m.groupdict() for m in map(ROW.match, proc.stdout.splitlines()) if m}
    if "adaptive" not in rows:
        raise SystemExit(f"no adaptive row in the demo's output:\n{proc.stdout}")
    return rows, proc.stdout, took


def verdict(rows: dict[str, dict[str, str]]) -> tuple[bool, bool, str, str]:
    """Whether adaptive has the lowest mean, and the lowest p95 (ties within TIE), against the
    deployable policies; and which policy has each lowest."""
    rivals = {p: r for p, r in rows.items() if p not in EXTRA}
    best_mean = min(rivals, key=lambda p: int(rivals[p]["mean"]))
    best_p95 = min(rivals, key=lambda p: int(rivals[p]["p95"]))
    a = rivals["adaptive"]
    mean_ok = all(int(a["mean"]) <= int(r["mean"]) for p, r in rivals.items() if p != "adaptive")
    p95_ok = all(int(a["p95"]) <= TIE * int(r["p95"]) for p, r in rivals.items() if p != "adaptive")
    return mean_ok, p95_ok, best_mean, best_p95


def wilson_upper(hits: float, n: int, z: float = 1.96) -> float:
    """The upper end of the Wilson interval of ``hits`` successes in ``n`` trials."""
    if n <= 0:
        return 1.0
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


def below_budget(rows: dict[str, dict[str, str]], budget: float) -> list[str]:
    """Policies whose measured agreement is below ``budget`` beyond doubt (the Wilson 95 %
    interval over their requests wholly below it)."""
    out = []
    for p, r in rows.items():
        n = int(r["n"])
        if wilson_upper(float(r["agree"]) / 100 * n, n) < budget:
            out.append(f"{p} {r['agree']}%")
    return out


def budget_of(demo_args: list[str]) -> float:
    """The demo's fidelity budget: ``--budget`` among its arguments, else its default (0.99)."""
    for i, a in enumerate(demo_args):
        if a == "--budget" and i + 1 < len(demo_args):
            return float(demo_args[i + 1])
        if a.startswith("--budget="):
            return float(a.split("=", 1)[1])
    return 0.99


def main() -> int:
    argv = sys.argv[1:]
    demo_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, demo_args = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.md")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument(
        "--fresh", action="store_true", help="every run compiles in an empty cache, and counts (a first run)"
    )
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes beside every run")
    parser.add_argument(
        "--keep-cache",
        type=Path,
        help="with --fresh: copy the first run's cache (its compiled bundle) here, for XDG_CACHE_HOME "
        "of later tools (bench_policy.py --extra-codecs replays the demo's bundle)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.busy < 0:
        parser.error("--busy must be >= 0")
    budget = budget_of(demo_args)
    load_start = os.getloadavg()
    runs: list[tuple[dict[str, dict[str, str]], float]] = []
    loads: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        while len(runs) < args.runs:
            cache = Path(tmp) / f"cache{i}" if args.fresh else None
            before = os.getloadavg()[0]
            rows, stdout, took = run_once(demo_args, Path(tmp) / f"run{i}", args.timeout, cache, args.busy)
            i += 1
            if "compiling" in stdout.lower() and i == 1 and not args.fresh:
                print(f"warm-up run (it compiled the bundle): {took:.0f} s, not counted", flush=True)
                continue
            loads.append((before, os.getloadavg()[0]))
            mean_ok, p95_ok, _, _ = verdict(rows)
            print(
                f"run {len(runs) + 1}: {took:.0f} s, adaptive lowest mean {mean_ok}, p95 {p95_ok}, "
                f"load {before:.2f} -> {loads[-1][1]:.2f}, "
                f"below budget: {below_budget(rows, budget) or 'none'}",
                flush=True,
            )
            print(stdout, file=sys.stderr, flush=True)  # the run's own report, for the record
            if cache is not None and args.keep_cache is not None and i == 1:
                shutil.copytree(cache, args.keep_cache, dirs_exist_ok=True)
            runs.append((rows, took))
            args.fidelity = next((x for x in stdout.splitlines() if x.startswith("fidelity:")), None)
            # written after every run: a long benchmark keeps what it measured if it is stopped
            write_report(args, demo_args, runs, loads, budget, load_start, os.getloadavg())
    print(f"wrote {args.out}")
    return 0


def write_report(
    args: argparse.Namespace,
    demo_args: list[str],
    runs: list[tuple[dict[str, dict[str, str]], float]],
    loads: list[tuple[float, float]],
    budget: float,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
) -> None:
    """benchmarks/results/demo.md from the runs so far."""
    policies = list(runs[0][0])
    wins = 0
    lines = [
        "# `make demo`, run several times",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_demo.py --runs {args.runs}"
        + (" --fresh" if args.fresh else "")
        + (f" --busy {args.busy}" if args.busy else "")
        + (f" -- {' '.join(demo_args)}" if demo_args else "")
        + "` (each run the real `splitinfer demo`"
        + (f" {' '.join(demo_args)}" if demo_args else ", its default scenario: a deployment")
        + f"). Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average (1 / 5 min) {load_start[0]:.2f} / {load_start[1]:.2f} at the start, "
        f"{load_end[0]:.2f} / {load_end[1]:.2f} at the end (shared with other work while it ran). "
        "What the scenario is: `splitinfer demo --help` and the report each run writes."
        + (
            " Every run compiled the bundle in an empty cache (a new user's first run: the policies then "
            "run for the first-run duration)."
            if args.fresh
            else ""
        )
        + (
            f" {args.busy} CPU-bound process(es) of ours spun beside every run, compile included."
            if args.busy
            else ""
        ),
        "",
        "Mean / p95 ms per policy and run; **bold**: the lowest of the deployable policies "
        f"(p95 within {TIE - 1:.1%} counts as a tie)"
        + (
            "; `static-hindsight` is shown, not competed with (no deployment has it)"
            if EXTRA & set(policies)
            else ""
        )
        + ".",
        "",
        "| run | "
        + " | ".join(policies)
        + " | adaptive lowest mean | adaptive lowest p95 | adaptive agreement | below the budget "
        "| load (1 min) start -> end |",
        "|---:|" + "---:|" * len(policies) + "---|---|---:|---|---|",
    ]
    for n, (rows, _) in enumerate(runs, 1):
        mean_ok, p95_ok, best_mean, best_p95 = verdict(rows)
        wins += mean_ok and p95_ok
        cells = []
        for p in policies:
            r = rows.get(p)
            if r is None:
                cells.append("")
                continue
            m = f"**{r['mean']}**" if p == best_mean else r["mean"]
            q = f"**{r['p95']}**" if p == best_p95 else r["p95"]
            cells.append(f"{m} / {q}")
        lines.append(
            f"| {n} | "
            + " | ".join(cells)
            + f" | {'yes' if mean_ok else 'no'} | {'yes' if p95_ok else 'no'} | "
            f"{rows['adaptive']['agree']}% | {', '.join(below_budget(rows, budget)) or 'none'} | "
            f"{loads[n - 1][0]:.2f} -> {loads[n - 1][1]:.2f} |"
        )
    target = (4 * len(runs) + 4) // 5  # 4 of 5
    lines += [
        "",
        (f"Stopped after {len(runs)} of {args.runs} runs. " if len(runs) < args.runs else "")
        + f"Adaptive had the lowest mean and p95 in **{wins} of {len(runs)}** runs "
        f"(target: at least {target} of {len(runs)}: **{'met' if wins >= target else 'missed'}**). "
        f"Each run took {min(t for _, t in runs):.0f}-{max(t for _, t in runs):.0f} s. Agreement "
        f"below the budget {budget} beyond doubt (Wilson 95 % interval over the policy's requests wholly "
        f"below it) in **{sum(bool(below_budget(r, budget)) for r, _ in runs)} of {len(runs)}** runs.",
        "",
        f"How the demo measured fidelity (its own words, last run): {args.fidelity}"
        if getattr(args, "fidelity", None)
        else "The demo did not say how it measured fidelity (a version before issue 28).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
