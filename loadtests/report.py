"""Turn one load-test run's files into a Markdown summary and a latency plot.

Reads, from the run's folder: locust's ``locust_stats.csv`` (one row per policy: throughput,
percentiles, failures), ``locust_stats_history.csv`` (``--csv-full-history``: percentiles over
time), ``mix.json`` (the locustfile's ``--splitload-out``: per policy, cut and codec, the
requests, failures, bytes and ``Server-Timing`` stages) and ``run.json`` (what run.py
recorded about the run). Writes ``summary.md`` and ``latency.png`` (needs the plot extra).

    python loadtests/report.py loadtests/results
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["policy_rows", "write_plot", "write_summary"]

ORDER = ("adaptive", "neurosurgeon", "cloud", "static", "local")


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _order(policy: str) -> tuple[int, str]:
    return (ORDER.index(policy) if policy in ORDER else len(ORDER), policy)


def policy_rows(folder: Path) -> list[dict[str, Any]]:
    """One dict per policy: locust's numbers joined with the mix's sums."""
    stats = {}
    with (folder / "locust_stats.csv").open() as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                stats[row["Name"]] = row
    mix = json.loads((folder / "mix.json").read_text())
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in mix["rows"]:
        for key in ("requests", "failures", "sent", "compute_s", "queue_s", "server_s", "bytes_up"):
            sums[r["policy"]][key] += r.get(key, 0.0)
        sums[r["policy"]]["latency_s"] += r.get("latency_s", 0.0)
        sums[r["policy"]]["predicted_s"] += r.get("predicted_s", 0.0)
    rows = []
    for policy in sorted(set(stats) | set(sums), key=_order):
        s, m = stats.get(policy, {}), sums.get(policy, {})
        requests = int(_float(s.get("Request Count", "0")) or m.get("requests", 0))
        failures = int(_float(s.get("Failure Count", "0")) or 0)
        # Ratios from the mix's own counts (it may hold a few requests that ended after locust's
        # last CSV write).
        sent, tallied = m.get("sent", 0.0), m.get("requests", 0.0)
        rows.append(
            {
                "policy": policy,
                "requests": requests,
                "failures": failures,
                "rps": _float(s.get("Requests/s", "nan")),
                "p50": _float(s.get("50%", "nan")),
                "p95": _float(s.get("95%", "nan")),
                "p99": _float(s.get("99%", "nan")),
                "mean": _float(s.get("Average Response Time", "nan")),
                "sent_share": sent / tallied if tallied else math.nan,
                "compute_ms": 1000 * m.get("compute_s", 0.0) / tallied if tallied else math.nan,
                "compute_sent_ms": 1000 * m.get("compute_s", 0.0) / sent if sent else math.nan,
                "queue_sent_ms": 1000 * m.get("queue_s", 0.0) / sent if sent else math.nan,
                "kib_up": m.get("bytes_up", 0.0) / 1024 / tallied if tallied else math.nan,
                "predicted_ratio": m.get("predicted_s", 0.0) / m["latency_s"]
                if m.get("latency_s")
                else math.nan,
            }
        )
    return rows


def mix_lines(folder: Path, cut_names: dict[int, str] | None = None, top: int = 4) -> list[str]:
    """Per policy, its most frequent (cut, codec) pairs with their shares."""
    mix = json.loads((folder / "mix.json").read_text())
    by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in mix["rows"]:
        by_policy[r["policy"]].append(r)
    lines = []
    for policy in sorted(by_policy, key=_order):
        rows = sorted(by_policy[policy], key=lambda r: -r["requests"])
        total = sum(r["requests"] for r in rows) or 1
        parts = []
        for r in rows[:top]:
            if r["codec"] == "-":
                what = f"cut {r['cut']} (all on the device)"
            else:
                name = (cut_names or {}).get(r["cut"])
                what = f"cut {r['cut']}{f' ({name})' if name else ''} {r['codec']}"
            parts.append(f"{what} {100 * r['requests'] / total:.0f}%")
        if len(rows) > top:
            rest = sum(r["requests"] for r in rows[top:])
            parts.append(f"{len(rows) - top} other pairs {100 * rest / total:.0f}%")
        lines.append(f"- **{policy}**: " + ", ".join(parts))
    return lines


def _fmt(x: float, digits: int = 0) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def write_summary(folder: Path, cut_names: dict[int, str] | None = None) -> Path:
    """``summary.md`` in ``folder``: the policy table, the mix and how the run was made."""
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    rows = policy_rows(folder)
    mix = json.loads((folder / "mix.json").read_text())
    settings = mix.get("settings", {})
    lines = ["# Load test: split policies against a real server", ""]
    if run:
        lines += [
            f"Model **{run.get('model')}** ({run.get('cuts')} cuts, "
            f"codecs {', '.join(run.get('codecs', []))}); "
            f"{run.get('started')} for {run.get('run_time_s')} s, shape `{run.get('shape')}` peaking at "
            f"{run.get('users')} devices, one request per device every {run.get('interval_s')} s.",
            f"Fleet (network:slowdown, round-robin per policy): `{settings.get('fleet')}`. "
            f"Static policy: cut {run.get('static')}.",
            f"Machine: {run.get('machine')}. {run.get('note', '')}",
            "",
        ]
    lines += [
        "Latency is end to end per request: emulated device compute and link time plus the real "
        "server's answer (ms). Cloud compute is the `compute` stage of `Server-Timing` (the tail "
        "of the batch the request ran in) per request served, and per request sent.",
        "",
        "| policy | requests | req/s | p50 ms | p95 ms | p99 ms | mean ms | failures | sent to cloud "
        "| cloud compute ms/req | ms/sent req | queue ms/sent req | KiB up/req | predicted/measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fail = 100 * r["failures"] / r["requests"] if r["requests"] else math.nan
        lines.append(
            f"| {r['policy']} | {r['requests']} | {_fmt(r['rps'], 2)} | {_fmt(r['p50'])} | {_fmt(r['p95'])} "
            f"| {_fmt(r['p99'])} | {_fmt(r['mean'])} | {_fmt(fail, 2)}% | {_fmt(100 * r['sent_share'])}% "
            f"| {_fmt(r['compute_ms'], 2)} | {_fmt(r['compute_sent_ms'], 2)} | {_fmt(r['queue_sent_ms'], 2)} "
            f"| {_fmt(r['kib_up'], 1)} | {_fmt(r['predicted_ratio'], 2)} |"
        )
    lines += ["", "Cut and codec mix (share of each policy's requests):", "", *mix_lines(folder, cut_names)]
    events = mix.get("events", {})
    probes = {k.split("|", 1)[1]: v for k, v in events.items() if k.startswith("probes|")}
    if probes:
        lines += [
            "",
            "Link probes (emulated) the estimators asked for: "
            + ", ".join(f"{p} {n}" for p, n in sorted(probes.items(), key=lambda kv: _order(kv[0])))
            + ".",
        ]
    unrecorded = {k.split("|", 1)[1]: v for k, v in events.items() if k.startswith("explore_unrecorded|")}
    if unrecorded:
        lines += [
            "",
            "Explorations into pairs too large to record, replaced by the policy's exact winner: "
            + ", ".join(f"{p} {n}" for p, n in unrecorded.items())
            + ".",
        ]
    process = mix.get("process", {})
    if process:
        lines += [
            "",
            f"Locust process: torch imported: {process.get('torch')}.",
        ]
    lines += [
        "",
        "Files: `locust_stats.csv` and the rest of locust's CSVs, `report.html` (locust's "
        "report), `mix.json`, `latency.png`, `run.json`.",
        "",
    ]
    out = folder / "summary.md"
    out.write_text("\n".join(lines))
    return out


def write_plot(folder: Path) -> Path | None:
    """``latency.png``: p50/p95/p99 per policy, and each policy's p95 over time with the load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (pip install -e '.[plot]'): latency.png not drawn")
        return None
    rows = policy_rows(folder)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.26
    xs = range(len(rows))
    for i, (key, label) in enumerate((("p50", "p50"), ("p95", "p95"), ("p99", "p99"))):
        ax1.bar([x + (i - 1) * width for x in xs], [r[key] for r in rows], width, label=label)
    ax1.set_xticks(list(xs), [r["policy"] for r in rows])
    ax1.set_ylabel("end-to-end latency (ms)")
    ax1.set_title("latency percentiles per policy")
    ax1.legend()
    history = folder / "locust_stats_history.csv"
    if history.exists():
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        users: list[tuple[float, float]] = []
        with history.open() as f:
            for row in csv.DictReader(f):
                t = _float(row["Timestamp"])
                if row["Name"] == "Aggregated":
                    users.append((t, _float(row["User Count"])))
                else:
                    series[row["Name"]].append((t, _float(row["95%"])))
        t0 = min((t for t, _ in users), default=0.0)
        for name in sorted(series, key=_order):
            pts = [(t - t0, v) for t, v in series[name] if math.isfinite(v)]
            if pts:
                ax2.plot(*zip(*pts), label=name)
        ax2.set_xlabel("seconds")
        ax2.set_ylabel("p95 of the last 10 s (ms)")
        ax2.set_title("p95 over time, and the load")
        if series:
            ax2.legend(fontsize=8)
        if users:
            twin = ax2.twinx()
            twin.plot([t - t0 for t, _ in users], [u for _, u in users], "k:", label="devices")
            twin.set_ylabel("active devices (dotted)")
    fig.tight_layout()
    out = folder / "latency.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print(write_summary(args.folder))
    write_plot(args.folder)


if __name__ == "__main__":
    main()
