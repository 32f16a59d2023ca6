"""What a live policy comparison measured: per-request records, summaries, the table and the report.

Used by ``splitinfer demo`` and ``benchmarks/bench_e2e.py``. A :class:`Record` is one real
request (its start on the trace's clock, measured latency, cut, codec, bytes, fallback and
whether its top-1 class matches the uncompressed model's); :func:`price` prices every
request in hindsight (:mod:`splitinfer.lab._hindsight`); :func:`summarize` turns them
into a :class:`Summary` per policy; :func:`format_table` prints them; :func:`write_report`
writes ``report.md``, ``requests.csv`` and two PNG plots (needs matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.bundle import Bundle
from splitinfer.lab._hindsight import Link, World, kind_of
from splitinfer.netem import BandwidthTrace
from splitinfer.partitioner import make_policy

__all__ = ["Record", "Summary", "format_table", "price", "summarize", "write_report"]

#: Fallbacks decided before anything was sent: the request ran entirely on the device.
_LOCAL_FALLBACKS = ("deadline", "circuit_open")


@dataclass(frozen=True)
class Record:
    """One request as the edge saw it."""

    policy: str
    #: Seconds since the policy's link emulator started (the trace's clock) when it was issued.
    t: float
    latency_s: float
    cut: int
    codec: str
    bytes_up: int
    bytes_down: int
    fallback: str
    #: Top-1 class equals the uncompressed model's on the same input.
    agree: bool
    predicted_s: float
    #: Hindsight: the best allowed candidate's latency at ``t`` on the true trace (NaN if unknown).
    oracle_s: float = math.nan
    #: Hindsight: what the cost model and the true trace say this request's choice costs.
    world_s: float = math.nan
    #: The edge's uplink estimate when it decided (bit/s).
    uplink_est_bps: float = math.nan
    #: The same estimator's running geometric mean of the uplink, before the discount for its
    #: spread that the estimate carries (``Estimator`` ``risk``), when it decided (bit/s).
    uplink_mean_bps: float = math.nan
    #: The trace's true uplink rate when the request was issued (bit/s).
    uplink_true_bps: float = math.nan
    #: Hindsight: the cut the oracle would have taken (-1 if unknown).
    oracle_cut: int = -1
    #: Which device of the run sent it (0 when the run has one).
    device: int = 0

    def ran_cut(self, last_cut: int) -> int:
        """The cut that really ran: the last one when the request stayed on the device."""
        return last_cut if self.fallback in _LOCAL_FALLBACKS else self.cut


@dataclass(frozen=True)
class Summary:
    """One policy over one run."""

    policy: str
    requests: int
    mean_s: float
    p95_s: float
    bytes_per_request: float
    agreement: float
    fallbacks: int
    #: Shares of requests run all on the device, split, all in the cloud.
    local: float
    split: float
    cloud: float
    #: The most frequent (cut, codec) choices with their shares, most frequent first.
    mix: tuple[tuple[str, float], ...]
    oracle_mean_s: float
    #: Mean latency the cost model predicts on the true trace for this policy's own choices.
    world_mean_s: float

    @property
    def vs_oracle(self) -> float:
        return self.mean_s / self.oracle_mean_s if self.oracle_mean_s > 0 else math.nan


def p95(xs: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """The 95th percentile; with ``weights``, of the weighted distribution (inverted CDF)."""
    if not len(xs):
        return math.nan
    if weights is None or len(set(weights)) == 1:
        return float(np.percentile(xs, 95))
    return float(np.percentile(xs, 95, weights=weights, method="inverted_cdf"))


def device_weights(rs: Sequence[Record]) -> list[float]:
    """A weight per record that counts every device of the run equally (each device's requests
    share 1 / devices). A live run is closed-loop (a device sends its next request when the last
    one ended), so a policy that is slow on one device sends fewer requests there; pooled with
    equal weights, its slowest device would count least. One device: every weight is equal."""
    per = Counter(r.device for r in rs)
    return [1.0 / (per[r.device] * len(per)) for r in rs]


def _wmean(xs: Sequence[float], ws: Sequence[float]) -> float:
    total = sum(ws)
    return sum(x * w for x, w in zip(xs, ws)) / total if total > 0 else math.nan


def price(
    records: Sequence[Record],
    bundle: Bundle,
    trace: BandwidthTrace,
    *,
    device_slowdown: float,
    rtt_s: float,
    budget: float,
    queue_s: float = 0.002,
) -> tuple[list[Record], float]:
    """Each record priced in hindsight, and the device slowdown the run really had.

    The emulated device runs on a host shared with the other policies, the server and the
    emulators, so it is slower than the profile (measured alone) says, and an oracle priced
    with the profile alone would be no lower bound, or too low a one. So the device is priced
    at ``device_slowdown`` times the median measured / modelled latency of the ``local``
    policy's requests (device time and nothing else; ``device_slowdown`` without any), and
    every record gets its oracle latency, its choice's latency in that model world and the
    trace's true rate at its start. Returns the records and that slowdown.
    """
    oracle_policy = make_policy("adaptive", bundle, fidelity_budget=budget, explore=0.0)
    horizon = max((r.t + r.latency_s for r in records), default=0.0) + 60.0
    link = Link.from_trace(trace, horizon)
    allowed = oracle_policy.rows
    last = bundle.last_cut

    def priced(rs: Sequence[Record], slowdown: float) -> list[Record]:
        world = World(oracle_policy, link, slowdown, queue_s=queue_s)
        out = []
        for r in rs:
            oracle_s, best = world.oracle(allowed, r.t, rtt_s)
            oracle_cut = last if best == world.local else int(world.model.cut[best])
            try:
                row = world.row(r.ran_cut(last), r.codec)
                world_s = float(world.latencies(np.array([row]), r.t, rtt_s)[0])
            except KeyError:
                world_s = math.nan
            rate = trace.rate_at(r.t)
            out.append(
                replace(r, oracle_s=oracle_s, world_s=world_s, uplink_true_bps=rate, oracle_cut=oracle_cut)
            )
        return out

    local = priced([r for r in records if r.policy == "local" and not r.fallback], device_slowdown)
    ratios = [r.latency_s / r.world_s for r in local if r.world_s > 0]
    as_run = device_slowdown * float(np.median(ratios)) if ratios else device_slowdown
    return priced(records, as_run), as_run


def summarize(records: Sequence[Record], last_cut: int, policies: Sequence[str]) -> dict[str, Summary]:
    """A :class:`Summary` per policy, in the order of ``policies`` (those with records).

    Latencies (mean, p95, the oracle's and the model's means) count every device equally
    (:func:`device_weights`); requests, bytes, agreement and shares are per request."""
    out: dict[str, Summary] = {}
    for name in policies:
        rs = [r for r in records if r.policy == name]
        if not rs:
            continue
        lat = [r.latency_s for r in rs]
        ws = device_weights(rs)
        kinds = Counter(kind_of(r.ran_cut(last_cut), last_cut) for r in rs)
        mix = Counter(_choice(r, last_cut) for r in rs)
        oracle = [(r.oracle_s, w) for r, w in zip(rs, ws) if not math.isnan(r.oracle_s)]
        world = [(r.world_s, w) for r, w in zip(rs, ws) if not math.isnan(r.world_s)]
        out[name] = Summary(
            policy=name,
            requests=len(rs),
            mean_s=_wmean(lat, ws),
            p95_s=p95(lat, ws),
            bytes_per_request=statistics.mean(r.bytes_up for r in rs),
            agreement=sum(r.agree for r in rs) / len(rs),
            fallbacks=sum(bool(r.fallback) for r in rs),
            local=kinds["local"] / len(rs),
            split=kinds["split"] / len(rs),
            cloud=kinds["cloud"] / len(rs),
            mix=tuple((c, n / len(rs)) for c, n in mix.most_common()),
            oracle_mean_s=_wmean(*zip(*oracle)) if oracle else math.nan,
            world_mean_s=_wmean(*zip(*world)) if world else math.nan,
        )
    return out


def _choice(r: Record, last_cut: int) -> str:
    cut = r.ran_cut(last_cut)
    return "device" if cut == last_cut else f"{cut}:{r.codec}"


def _mix_text(mix: Sequence[tuple[str, float]], top: int = 3) -> str:
    text = ", ".join(f"{c} {share:.0%}" for c, share in mix[:top])
    return text + (f", +{len(mix) - top} more" if len(mix) > top else "")


def format_table(summaries: dict[str, Summary]) -> str:
    """A fixed-width table, one line per policy."""
    head = (
        f"{'policy':<17}{'requests':>9}{'mean ms':>9}{'p95 ms':>9}{'/oracle':>9}{'KiB/req':>9}"
        f"{'agree':>8}{'fallbacks':>10}  {'device/split/cloud':<19} cut:codec mix"
    )
    lines = [head, "-" * len(head)]
    for s in summaries.values():
        shares = f"{s.local:.0%}/{s.split:.0%}/{s.cloud:.0%}"
        lines.append(
            f"{s.policy:<17}{s.requests:>9}{s.mean_s * 1000:>9.0f}{s.p95_s * 1000:>9.0f}{s.vs_oracle:>9.2f}"
            f"{s.bytes_per_request / 1024:>9.1f}{s.agreement:>8.1%}{s.fallbacks:>10}  {shares:<19} "
            f"{_mix_text(s.mix)}"
        )
    return "\n".join(lines)


def markdown_table(summaries: dict[str, Summary]) -> list[str]:
    lines = [
        "| policy | requests | mean ms | p95 ms | mean / oracle | KiB / request | top-1 agreement | "
        "fallbacks | device / split / cloud | cut:codec mix |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries.values():
        lines.append(
            f"| {s.policy} | {s.requests} | {s.mean_s * 1000:.0f} | {s.p95_s * 1000:.0f} | "
            f"{s.vs_oracle:.2f} | "
            f"{s.bytes_per_request / 1024:.1f} | {s.agreement:.1%} | {s.fallbacks} | "
            f"{s.local:.0%} / {s.split:.0%} / {s.cloud:.0%} | {_mix_text(s.mix, 4)} |"
        )
    return lines


def write_csv(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Record)])
        writer.writeheader()
        for r in records:
            writer.writerow(asdict(r))


def write_report(
    out_dir: Path,
    *,
    title: str,
    facts: Sequence[str],
    records: Sequence[Record],
    summaries: dict[str, Summary],
    trace: BandwidthTrace,
    duration_s: float,
    bundle: Bundle,
    device_traces: Sequence[BandwidthTrace] | None = None,
) -> Path:
    """``report.md``, ``requests.csv``, ``latency.png`` and ``cuts.png`` in ``out_dir``.
    ``device_traces`` are each device's link (default: ``trace`` for every device); the latency
    plot shades each device's own in its panel."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "requests.csv", records)
    plots = _plots(out_dir, records, list(summaries), trace, duration_s, bundle, device_traces)
    lines = [f"# {title}", "", *[f"- {f}" for f in facts], "", *markdown_table(summaries), ""]
    lines += [
        "`mean / oracle`: the policy's mean latency over the hindsight oracle's for the same request "
        "times (the best allowed cut and codec under the trace's true rate at that moment and the "
        "measured profile). Cut `device` means everything ran on the device.",
        "",
    ]
    if plots:
        lines += [f"![{name}]({name})" for name in plots] + [""]
    else:
        lines += ["(No plots: install matplotlib, `pip install 'splitinfer[plot]'`.)", ""]
    devices = sorted({r.device for r in records})
    if len(devices) > 1:
        lines += [
            "Per device (mean / p95 ms, requests): the table above counts every device equally, so "
            "a policy that is slow on one device, and so sends fewer requests there, is not let off.",
            "",
            "| policy | " + " | ".join(f"device {d + 1}" for d in devices) + " |",
            "|---|" + "---:|" * len(devices),
        ]
        for name in summaries:
            cells = []
            for d in devices:
                lat = [r.latency_s for r in records if r.policy == name and r.device == d]
                cells.append(
                    f"{statistics.mean(lat) * 1000:.0f} / {p95(lat) * 1000:.0f} ({len(lat)})" if lat else ""
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Every request: [`requests.csv`](requests.csv).", ""]
    cut_lines = sorted({r.ran_cut(bundle.last_cut) for r in records})
    lines += ["Cuts chosen:", ""] + [f"- {k}: {bundle.cuts[k].name}" for k in cut_lines] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def rolling_median(ts: Sequence[float], values: Sequence[float], window_s: float) -> list[float]:
    """At each time in ``ts`` (sorted), the median of ``values`` whose time is within
    ``window_s / 2`` of it: a trend that a few slow requests do not drag along."""
    times = np.asarray(ts, dtype=float)
    lo = np.searchsorted(times, times - window_s / 2, side="left")
    hi = np.searchsorted(times, times + window_s / 2, side="right")
    vs = np.asarray(values, dtype=float)
    return [float(np.median(vs[a:b])) for a, b in zip(lo, hi)]


def latency_figure(
    records: Sequence[Record],
    policies: Sequence[str],
    traces: Sequence[BandwidthTrace],
    duration_s: float,
) -> Any:
    """The latency plot: one panel per device (its link's trace shaded behind), and in each, per
    policy, a point per request and a line of the rolling median (:func:`rolling_median` over a
    twentieth of the run, at least 2 s), one colour per policy in every panel. ``traces`` holds
    each device's trace, or one for all. Needs matplotlib; the caller closes the figure."""
    import matplotlib.pyplot as plt

    devices = sorted({r.device for r in records}) or [0]
    window_s = max(duration_s / 20, 2.0)
    colours = {name: f"C{i % 10}" for i, name in enumerate(policies)}
    ts = np.arange(0.0, duration_s, 0.1)
    fig, axes = plt.subplots(
        len(devices), 1, figsize=(11, 1.0 + 3.2 * len(devices)), sharex=True, squeeze=False
    )
    for ax, device in zip(axes[:, 0], devices):
        trace = traces[device] if device < len(traces) else traces[0]
        rate = np.array([trace.rate_at(t) for t in ts]) / 1e6
        bw = ax.twinx()
        bw.fill_between(ts, rate, step="post", color="0.88", label="uplink (trace)")
        bw.set_ylabel("uplink, Mbit/s", fontsize=8)
        bw.set_ylim(0, max(rate.max(), 1e-3) * 1.1)
        ax.set_zorder(bw.get_zorder() + 1)
        ax.patch.set_visible(False)
        for name in policies:
            rs = sorted((r for r in records if r.policy == name and r.device == device), key=lambda r: r.t)
            if not rs:
                continue
            t = [r.t for r in rs]
            ms = [r.latency_s * 1000 for r in rs]
            ax.scatter(t, ms, s=8, alpha=0.45, color=colours[name], linewidths=0)
            ax.plot(t, rolling_median(t, ms, window_s), lw=1.8, color=colours[name], label=name)
        ax.set_ylabel("latency, ms")
        ax.set_ylim(bottom=0)
        title = f"device {device + 1}" if len(devices) > 1 else "the device"
        ax.set_title(f"{title}: link {trace.name}", fontsize=10, loc="left")
    top = axes[0, 0]
    top.legend(
        loc="upper left",
        fontsize=8,
        ncols=min(len(policies), 5),
        title=(f"rolling median over {window_s:g} s; points: requests"),
        title_fontsize=8,
    )
    axes[-1, 0].set_xlabel("seconds into the trace stretch (request issued)")
    fig.suptitle("Latency per request, by device and policy")
    fig.tight_layout()
    return fig


def _plots(
    out_dir: Path,
    records: Sequence[Record],
    policies: list[str],
    trace: BandwidthTrace,
    duration_s: float,
    bundle: Bundle,
    device_traces: Sequence[BandwidthTrace] | None = None,
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    last = bundle.last_cut
    ts = np.arange(0.0, duration_s, 0.1)
    rate = np.array([trace.rate_at(t) for t in ts]) / 1e6
    fig = latency_figure(records, policies, device_traces or [trace], duration_s)
    fig.savefig(out_dir / "latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 5))
    bw = ax.twinx()
    bw.fill_between(ts, rate, step="post", color="0.85")
    bw.set_ylabel("trace bandwidth, Mbit/s")
    ax.set_zorder(bw.get_zorder() + 1)
    ax.patch.set_visible(False)
    for i, name in enumerate(policies):
        rs = sorted((r for r in records if r.policy == name), key=lambda r: r.t)
        jitter = (i - len(policies) / 2) * 0.12
        ax.step(
            [r.t for r in rs],
            [r.ran_cut(last) + jitter for r in rs],
            where="post",
            marker=".",
            lw=1,
            label=name,
        )
    ax.set_ylim(-1, last + 1)
    ax.set_xlabel("seconds into the trace stretch (request issued)")
    ax.set_ylabel(f"cut (0: all in the cloud, {last}: all on the device)")
    ax.legend(loc="center left", fontsize=8)
    ax.set_title("Chosen cut over time")
    fig.tight_layout()
    fig.savefig(out_dir / "cuts.png", dpi=110)
    plt.close(fig)
    return ["latency.png", "cuts.png"]
