"""Policies replayed over real network traces, with EfficientNet-Lite0's real profile and fidelity.

Writes benchmarks/results/policy.md. Run: `.venv/bin/python benchmarks/bench_policy.py [--quick]`.

The first run compiles EfficientNet-Lite0 with calibration on real photos (the fidelity table:
about 20 minutes on a shared 2-core machine), profiles it (30 s) and caches the bundle under
--cache; later runs read only its manifest and take about a minute and a half (--quick: under
half a minute). --reprofile measures the cached bundle again, --fresh rebuilds it.

What is simulated (docs/decision.md, "How the policies were evaluated"):

- a request arrives every 200 ms; each policy decides from its *own* estimator, fed only by
  the transfers its past decisions made (observations arrive when a transfer ends) and by the
  probes the estimator asks for;
- the link is the trace (uplink and downlink alike, the trace's rate over time: a transfer of
  B bits started at t ends when the trace's cumulative capacity from t reaches B), plus a round
  trip of 80 ms with 10% log-normal jitter;
- device and cloud compute are the profile's times, scaled by the device slowdown (and 1 for
  the cloud); the cloud adds 2 ms of queueing; the edge runs one warm-up inference at start,
  so its estimator knows the device's speed from the first request on;
- requests do not contend with each other or with probes for the link (each sees the trace);
- the oracle picks, per request and in hindsight, the allowed candidate with the least
  realized latency;
- the causal reference (``World.causal``) is adaptive told the truth at the instant of each
  decision and nothing after it (the trace's rate then, the round trip, the device's speed),
  hedged like adaptive: adaptive / causal is what the estimator's lag and error cost,
  causal / oracle what nobody can know when deciding (the link changing during the transfer);
- a bundle with early exits (docs/learning.md) has each request whose decision passes an exit
  answered there on the device when its exit answers it (``World.exits``; the same requests
  for every policy and the oracle), counted as exited; the demo's bundle has none.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_TRACES,
    RESULTS,
    add_deployment_args,
    fleet_speeds,
    load_average,
    machine,
    trace_sets,
)

from splitinfer.lab.evaluation import Link, World, choose_static, kind_of, tie_slowdown
from splitinfer.manifest import Cut, Manifest, update_manifest
from splitinfer.partitioner import Estimates, Estimator, TablePolicy, hedge_after, make_policy
from splitinfer.tensors import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
TRACES = DEFAULT_TRACES
CACHE = Path.home() / ".cache" / "splitinfer-bench" / "efficientnet-lite0"
CODECS = [
    "f32",
    "f32+zstd1",
    "f16+zstd1",
    "q8+zstd1",
    "q8c+zstd1",
    "q6c+zstd1",
    "q6+ans",  # issue 22: the rANS stage, 8-13 % under +zstd1 at 6 bits
    "q6c+ans",
    "q4c+zstd1",
    "jpeg90",
]
#: Held-out crops (colour-jittered, lab/_images.py EVALUATION_PHOTOS) the fidelity table is measured on.
EVALUATION = 30
BUDGET = 0.99
INTERVAL_S = 0.2
RTT_S = 0.08
RTT_JITTER = 0.1
QUEUE_S = 0.002
#: Device slowdowns swept; by default the runs use the one where the two fixed ends (all on the
#: device, all in the cloud) tie in mean latency: neither wins outright (tie_slowdown).
SLOWDOWNS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
#: ``adaptive`` hedges its requests (EdgeClient does by default) and chooses on the mean at the
#: expected rate; ``adaptive-priced`` also prices the hedge into its choice (``hedge=True``);
#: ``adaptive-nohedge`` neither hedges nor prices it; ``adaptive-p95`` minimizes the p95
#: objective (hedged too). ``static`` is tuned at deploy time on another folder of traces
#: (--static-from) at the median device;
#: ``static-hindsight`` is tuned the same way on the very traces it is scored on (no deployment has
#: it). The classic baselines (neurosurgeon, cloud, static) do not hedge.
POLICIES = (
    "adaptive",
    "adaptive-priced",
    "adaptive-nohedge",
    "adaptive-p95",
    "neurosurgeon",
    "cloud",
    "local",
    "static",
    "static-hindsight",
)
HEDGED = ("adaptive", "adaptive-priced", "adaptive-p95")
#: Not policies a deployment can run: the causal reference (the truth at each decision) and the
#: hindsight oracle (the truth after it too).
REFERENCES = ("causal", "oracle")


@dataclass(frozen=True)
class Budget:
    """What the policies may send: rows whose agreement meets :data:`BUDGET`, or with
    ``accuracy_drop``, rows whose accuracy drop does (the table's labelled rows, ``--images``);
    either at make_policy's default confidence, on the row's interval."""

    accuracy_drop: float | None = None

    def policy(self) -> dict[str, Any]:
        """make_policy's keywords for the policies that have a budget."""
        return {"fidelity_budget": BUDGET, "accuracy_drop": self.accuracy_drop}

    def tuning(self) -> dict[str, Any]:
        """choose_static's and tie_slowdown's keywords."""
        return {"budget": BUDGET, "accuracy_drop": self.accuracy_drop}

    def words(self) -> str:
        if self.accuracy_drop is None:
            return f"fidelity budget {BUDGET}"
        return f"accuracy-drop budget {self.accuracy_drop:g}"


# -- the bundle: compile with calibration on real photos, profile, cache ---------------------------


def calibration_images() -> list[tuple[Any, ...]]:
    """30 inputs: 10 real colour photos, 3 crops each, resized to 224, ImageNet-normalized."""
    import skimage.data
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"]
    names += ["immunohistochemistry", "retina", "colorwheel"]
    photos = [getattr(skimage.data, n)() for n in names] + list(load_sample_images().images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = []
    for a in photos:
        t = torch.from_numpy(np.array(a[..., :3])).permute(2, 0, 1).float()[None] / 255
        h, w = t.shape[2:]
        for j in range(3):
            s = int(min(h, w) * (1.0 if j == 0 else 0.6))
            y0 = int(torch.randint(0, h - s + 1, (1,), generator=g))
            x0 = int(torch.randint(0, w - s + 1, (1,), generator=g))
            crop = F.interpolate(
                t[:, :, y0 : y0 + s, x0 : x0 + s], size=(224, 224), mode="bilinear", antialias=True
            )
            if j == 2:
                crop = crop.flip(3)
            out.append(((crop - mean) / std,))
    return out


def build_bundle(cache: Path, repeats: int) -> dict[str, Any]:
    """Compile, measure fidelity, profile; save to ``cache``; return build facts."""
    from splitinfer.lab import compile_on_photos, efficientnet_lite0
    from splitinfer.partitioner import profile_bundle

    inputs = calibration_images()
    t0 = time.perf_counter()
    bundle = compile_on_photos(
        efficientnet_lite0(),
        name="efficientnet-lite0",
        calibration=inputs,
        evaluation=EVALUATION,
        codecs=CODECS,
    )
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle.profiles["host"] = profile_bundle(bundle, repeats=repeats, threads=1)
    profile_s = time.perf_counter() - t0
    facts = {
        "compile_s": compile_s,
        "profile_s": profile_s,
        "calibration_inputs": len(inputs),
        "evaluation_inputs": EVALUATION,
    }
    if cache.exists():
        shutil.rmtree(cache)
    bundle.save(cache)
    (cache.parent / "facts.json").write_text(json.dumps(facts))
    return facts


def demo_bundle(extra: list[str]) -> Path:
    """The demo's bundle compiled with ``extra`` codecs beside its own (built once, cached)."""
    from dataclasses import replace

    from splitinfer.lab.evaluation import MODELS, cache_root, prepare_bundle

    spec = MODELS["efficientnet-lite0"]
    spec = replace(spec, codecs=(*spec.codecs, *(c for c in extra if c not in spec.codecs)))
    return prepare_bundle(spec, cache_root(), lambda m: print(m, file=sys.stderr), progress=True) / spec.name


def restrict(bundle: Manifest, codecs: list[str]) -> Manifest:
    """``bundle`` offering only ``codecs`` (its fidelity rows and profiled costs of the others
    dropped): the policies cannot pick the others."""
    from dataclasses import replace

    if unknown := [c for c in codecs if c not in bundle.codecs]:
        raise SystemExit(
            f"--codecs: the bundle has no {', '.join(unknown)}; it has {', '.join(bundle.codecs)}"
        )
    table = [r for r in bundle.fidelity["table"] if r["codec"] in codecs]
    profiles = {
        name: {**p, "codecs": [r for r in p.get("codecs", []) if r["codec"] in codecs]}
        for name, p in bundle.profiles.items()
    }
    return replace(
        bundle, codecs=list(codecs), fidelity={**bundle.fidelity, "table": table}, profiles=profiles
    )


def load_bundle(
    cache: Path, *, fresh: bool, reprofile: bool, repeats: int
) -> tuple[Manifest, dict[str, Any]]:
    if fresh or not (cache / "manifest.json").exists():
        build_bundle(cache, repeats)
    bundle = Manifest.load(cache)
    if reprofile or "host" not in bundle.profiles:
        import splitinfer as si
        from splitinfer.partitioner import profile_bundle

        t0 = time.perf_counter()
        profile = profile_bundle(si.Bundle.load(cache), repeats=repeats, threads=1)
        update_manifest(cache, profiles={"host": profile})
        facts_path = cache.parent / "facts.json"
        facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
        facts["profile_s"] = time.perf_counter() - t0
        facts_path.write_text(json.dumps(facts))
        bundle = Manifest.load(cache)
    facts_path = cache.parent / "facts.json"
    return bundle, json.loads(facts_path.read_text()) if facts_path.exists() else {}


# -- labelled photos: the demo's bundle with its table measured on them (issue 28 items 1, 6) ------


def labelled_bundle(images: Path, n_eval: int, seed: int, extra: list[str]) -> tuple[Path, dict[str, Any]]:
    """The demo's bundle (its cuts, codecs and ``extra``, calibrated and profiled as
    ``make demo`` does) whose fidelity table ``si.compile(evaluation=, labels=)`` measured on
    ``n_eval`` labelled photos of ``images``, of classes other than the 128 photos that calibrate
    in bench_codecs' split: agreement, top-1 accuracy and its drop from the float model per row,
    each with its interval (docs/fidelity.md). Built once, then cached beside the benchmark's
    own bundle; returns its folder and the build facts."""
    from dataclasses import replace

    import torch
    from bench_codecs import labelled_photos, split_by_class

    from splitinfer.lab import compile_on_photos
    from splitinfer.lab.evaluation import MODELS
    from splitinfer.partitioner import profile_bundle

    spec = MODELS["efficientnet-lite0"]
    spec = replace(spec, codecs=(*spec.codecs, *(c for c in extra if c not in spec.codecs)))
    key = json.dumps([str(images.resolve()), n_eval, seed, spec.codecs, spec.calibration], sort_keys=True)
    folder = CACHE.parent / f"labelled-{hashlib.sha256(key.encode()).hexdigest()[:12]}" / spec.name
    facts_path = folder.parent / "facts.json"
    if (folder / "manifest.json").is_file() and facts_path.is_file():
        return folder, json.loads(facts_path.read_text())
    photos, labels = labelled_photos(images)
    _, ev = split_by_class(labels, 128, n_eval, seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (photos[ev] - mean) / std
    t0 = time.perf_counter()
    bundle = compile_on_photos(
        spec.factory(),
        name=spec.name,
        image_size=spec.image_size,
        calibration=spec.calibration,
        evaluation=[(x[i : i + 1],) for i in range(len(ev))],
        labels=[int(labels[i]) for i in ev],
        max_frontier_bytes=spec.max_frontier_bytes,
        calibration_method=spec.calibration_method,
        codecs=list(spec.codecs),
    )
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle.profiles["host"] = profile_bundle(
        bundle, batch_sizes=(1,), repeats=spec.profile_repeats, threads=1, progress=True
    )
    facts = {
        "compile_s": compile_s,
        "profile_s": time.perf_counter() - t0,
        "folder": images.name,
        "photos": len(ev),
        "calibration_inputs": spec.calibration,
    }
    if folder.exists():
        shutil.rmtree(folder)
    bundle.save(folder)
    facts_path.write_text(json.dumps(facts))
    return folder, facts


# -- traces ------------------------------------------------------------------------------------------


def trace_links(folder: Path, limit: int | None) -> dict[str, list[Link]]:
    """Every set of ``folder`` (_common.trace_sets: each sub-folder a set) as Links."""
    return {name: [Link.read(p) for p in files] for name, files in trace_sets(folder, limit).items()}


# -- the simulation ----------------------------------------------------------------------------------


@dataclass
class Runner:
    """One policy with its own estimator and the observations still in flight."""

    policy: TablePolicy
    estimator: Estimator | None
    events: list[tuple[float, int, str, tuple[Any, ...]]] = field(default_factory=list)
    probe_until: float = -1.0
    hedges: int = 0
    latencies: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    probes: int = 0
    explored: int = 0
    #: Requests answered by an early exit on the device (docs/learning.md).
    exited: int = 0
    seq: int = 0

    def push(self, t: float, kind: str, args: tuple[Any, ...]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, args))

    def catch_up(self, now: float, log: list[tuple[float, str, tuple[Any, ...]]] | None) -> None:
        est = self.estimator
        while self.events and self.events[0][0] <= now:
            t, _, kind, args = heapq.heappop(self.events)
            if est is None:
                continue
            if log is not None:
                log.append((t, kind, args))
            apply_event(est, t, kind, args)


def apply_event(est: Estimator, t: float, kind: str, args: tuple[Any, ...]) -> None:
    if kind == "transfer":
        up, down, start, first, end, timing, cut, tid = args
        est.observe_transfer(
            up_bytes=up,
            down_bytes=down,
            start=start,
            first_byte=first,
            end=end,
            server_timing=timing,
            cut=cut,
            transfer_id=tid,
        )
    elif kind == "start":
        est.start_transfer(args[0], args[1], cut=args[2])
    elif kind == "head":
        est.observe_head(args[0], args[1], now=t)
    elif kind == "rtt":
        est.observe_rtt(args[0], now=t)


def simulate(
    bundle: Manifest,
    link: Link,
    ds: float,
    static_choice: tuple[int, str],
    seed: int,
    log: list[tuple[float, str, tuple[Any, ...]]] | None = None,
    estimator: dict[str, Any] | None = None,
    hindsight_choice: tuple[int, str] | None = None,
    budget: Budget = Budget(),
    exit_outcomes: dict[int, list[bool]] | None = None,
) -> tuple[dict[str, Runner], list[float], Counter[str]]:
    """Replay ``link`` for every policy and the oracle; returns runners, oracle latencies and kinds.

    ``estimator``: settings of every policy's Estimator (default: the product's defaults).
    ``static_choice``: the deploy-time static's (cut, codec); ``hindsight_choice``: the static
    tuned on the evaluated traces (default: the same). A hedged policy's sent request ends at
    the first of the cloud's answer and ``device work + hedge_after + the device's tail``.
    Where the bundle has early exits, a request whose decision has one on its way is answered
    there when its exit answers it (``World.exits``: ``exit_outcomes``, per exit cut real
    held-out inputs' outcomes, replayed in turn, else a seeded draw at the exit's rate; the
    same requests for every policy), and counted in ``Runner.exited``.
    """
    settings = estimator or {}
    rng = np.random.default_rng(seed)
    hindsight = hindsight_choice or static_choice

    def adaptive(**kw: Any) -> Runner:
        return Runner(
            make_policy("adaptive", bundle, seed=seed, **budget.policy(), **kw),
            Estimator(bundle, **settings),
        )

    runners = {
        "adaptive": adaptive(),
        "adaptive-priced": adaptive(hedge=True),
        "adaptive-nohedge": adaptive(),
        "adaptive-p95": adaptive(objective="p95"),
        "neurosurgeon": Runner(make_policy("neurosurgeon", bundle), Estimator(bundle, **settings)),
        "cloud": Runner(make_policy("cloud", bundle, **budget.policy()), Estimator(bundle, **settings)),
        "local": Runner(make_policy("local", bundle), None),
        "static": Runner(make_policy("static", bundle, cut=static_choice[0], codec=static_choice[1]), None),
        "static-hindsight": Runner(make_policy("static", bundle, cut=hindsight[0], codec=hindsight[1]), None),
    }
    oracle_policy = make_policy("adaptive", bundle, explore=0.0, **budget.policy())
    world = World(oracle_policy, link, ds, rng, queue_s=QUEUE_S, exit_outcomes=exit_outcomes, exit_seed=seed)
    causal = Runner(make_policy("adaptive", bundle, explore=0.0, **budget.policy()), None)
    for r in runners.values():  # the edge's warm-up inference at start: the device's speed
        if r.estimator is not None:
            r.estimator.observe_head(bundle.last_cut, float(world.head[world.local]), now=0.0)
    allowed = oracle_policy.rows
    oracle: list[float] = []
    oracle_kinds: Counter[str] = Counter()
    n = bundle.last_cut
    for request, t in enumerate(np.arange(0.0, link.duration, INTERVAL_S).tolist()):
        rtt = RTT_S * math.exp(RTT_JITTER * rng.standard_normal())
        realized = world.latencies(allowed, t, rtt, request)
        best = int(np.argmin(realized))
        oracle.append(float(realized[best]))
        oracle_kinds[kind_of(int(world.model.cut[allowed[best]]), n)] += 1
        latency, row = world.causal(causal.policy, t, rtt, hedged=True, request=request)
        causal.latencies.append(latency)
        causal.kinds[kind_of(int(world.model.cut[row]), n)] += 1
        causal.exited += world.exited(request, row)
        for name, r in runners.items():
            r.catch_up(t, log if name == "adaptive" else None)
            est = r.estimator.estimates(now=t) if r.estimator is not None else DUMMY
            d = r.policy.decide(est)
            r.explored += d.explored
            row = world.row(d.cut, d.codec)
            r.kinds[kind_of(d.cut, n)] += 1
            if world.exited(request, row):  # answered on the device: nothing sent, nothing observed
                r.latencies.append(float(world.exit_s[row]))
                r.exited += 1
            elif d.cut == n:
                r.latencies.append(float(world.device_s[row]))
                if r.estimator is not None:
                    r.push(t + float(world.device_s[row]), "head", (n, float(world.device_s[row])))
            else:
                start, first, end = world.realize(row, t, rtt)
                start, first, end = float(start), float(first), float(end)
                latency = end - t
                if name in HEDGED:  # the device finishes once the answer is overdue
                    local = float(world.device_s[row]) + hedge_after(d, est)
                    local += float(world.head[world.local] - world.head[row])
                    if local < latency:
                        latency = local
                        r.hedges += 1
                r.latencies.append(latency)
                if r.estimator is not None:
                    server = QUEUE_S + float(world.cloud_s[row])
                    timing = (
                        f"queue;dur={QUEUE_S * 1000:.3f}, compute;dur={world.cloud_s[row] * 1000:.3f}, "
                        f"total;dur={server * 1000:.3f}"
                    )
                    up, down = float(world.bits[row] / 8), world.response_bits / 8
                    r.push(t + float(world.head[row]), "head", (d.cut, float(world.head[row])))
                    tid = r.estimator.start_transfer(up, start, cut=d.cut)
                    if name == "adaptive" and log is not None:
                        log.append((t, "start", (up, start, d.cut)))
                    r.push(end, "transfer", (up, down, start, first, end, timing, d.cut, tid))
            if r.estimator is not None and r.estimator.needs_probe(now=t) and t >= r.probe_until:
                # A probe: a tiny request for the round trip, then an upload of probe_bytes().
                size = r.estimator.probe_bytes()
                rtt_seen = RTT_S * math.exp(RTT_JITTER * rng.standard_normal())
                up_start = t + rtt_seen
                up_done = float(link.done(up_start, size * 8))
                r.push(up_start, "rtt", (rtt_seen,))
                r.push(
                    up_done + RTT_S,
                    "transfer",
                    (size, 0, up_start, up_done + RTT_S, up_done + RTT_S, None, None, None),
                )
                r.probe_until = up_done + RTT_S
                r.probes += 1
    runners["causal"] = causal
    return runners, oracle, oracle_kinds


DUMMY = Estimates(uplink_bps=1e6, downlink_bps=1e6, rtt_s=RTT_S)


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


# -- experiments -------------------------------------------------------------------------------------


def sweep(
    bundle: Manifest, links: list[Link], slowdowns: list[float], budget: Budget = Budget()
) -> list[dict[str, Any]]:
    """Oracle choices and the fixed ends' latency at several device slowdowns."""
    oracle_policy = make_policy("adaptive", bundle, explore=0.0, **budget.policy())
    cloud_policy = make_policy("cloud", bundle, **budget.policy())
    rows = []
    for ds in slowdowns:
        kinds: Counter[str] = Counter()
        oracle, local, cloud = [], [], []
        for i, link in enumerate(links):
            world = World(oracle_policy, link, ds, np.random.default_rng(i))
            allowed = oracle_policy.rows
            cloud_rows = cloud_policy.rows
            for t in np.arange(0.0, link.duration, INTERVAL_S):
                _, _, ends = world.realize(allowed, float(t), RTT_S)
                realized = np.where(allowed == world.local, world.device_s[world.local], ends - t)
                best = int(np.argmin(realized))
                oracle.append(float(realized[best]))
                kinds[kind_of(int(world.model.cut[allowed[best]]), bundle.last_cut)] += 1
                local.append(float(world.device_s[world.local]))
                _, _, cends = world.realize(cloud_rows, float(t), RTT_S)
                cloud.append(float(np.min(cends - t)))
        total = sum(kinds.values())
        rows.append(
            {
                "ds": ds,
                "local": statistics.mean(local),
                "cloud": statistics.mean(cloud),
                "oracle": statistics.mean(oracle),
                "share": {k: kinds[k] / total for k in ("local", "split", "cloud")},
            }
        )
    return rows


#: Estimator variants the adaptive run's observations are replayed into: (label, settings).
ESTIMATOR_VARIANTS = (
    ("tau_s 0.1", {"tau_s": 0.1}),
    ("tau_s 0.25", {"tau_s": 0.25}),
    ("tau_s 0.5 (default)", {}),
    ("tau_s 0.5, change detection", {"jump_after": 2}),
    ("tau_s 1", {"tau_s": 1.0}),
    ("tau_s 2", {"tau_s": 2.0}),
)
#: A stretch is volatile where the trace's rate over the last VOLATILE_WINDOW_S spans more than
#: VOLATILE_SPAN times (max / min); a jump is a change of the median rate by more than
#: VOLATILE_SPAN between the JUMP_WINDOW_S before and after a trace sample.
VOLATILE_WINDOW_S = 2.0
VOLATILE_SPAN = 2.0
JUMP_WINDOW_S = 2.0
#: A reaction not seen within this many seconds of a jump counts as this long.
REACTION_CAP_S = 5.0


def _lag(t_arr: list[np.ndarray], v: list[np.ndarray], links: list[Link], masks: list[np.ndarray]) -> float:
    """The shift of the trace (0 to 10 s) that best matches the estimates where ``masks`` hold."""
    shifts = np.arange(0.0, 10.01, INTERVAL_S)
    medians = []
    for s in shifts:
        errs = [
            np.abs(np.log(vi[keep] / link.rates_at(ti[keep] - s)))
            for ti, vi, link, m in zip(t_arr, v, links, masks)
            if (keep := m & (ti >= s)).any()
        ]
        medians.append(float(np.median(np.concatenate(errs))) if errs else math.inf)
    return float(shifts[int(np.argmin(medians))])


def volatile_mask(link: Link, t: np.ndarray) -> np.ndarray:
    """Where the trace's rate over the last VOLATILE_WINDOW_S spans more than VOLATILE_SPAN times."""
    grid = np.arange(0.0, VOLATILE_WINDOW_S + 1e-9, 0.1)
    rates = np.stack([link.rates_at(np.maximum(t - g, 0.0)) for g in grid])
    return rates.max(axis=0) > VOLATILE_SPAN * rates.min(axis=0)


def jumps(link: Link) -> list[tuple[float, float, float]]:
    """(time, rate before, rate after) of the trace's lasting jumps (see VOLATILE_SPAN)."""
    out = []
    last = -math.inf
    for t in link.times.tolist():
        if t < JUMP_WINDOW_S or t > link.duration - JUMP_WINDOW_S or t - last < JUMP_WINDOW_S:
            continue
        before = float(np.median(link.rates_at(np.arange(t - JUMP_WINDOW_S, t, 0.1))))
        after = float(np.median(link.rates_at(np.arange(t, t + JUMP_WINDOW_S, 0.1))))
        if max(before, after) > VOLATILE_SPAN * min(before, after):
            out.append((t, before, after))
            last = t
    return out


def reaction_time(ts: np.ndarray, v: np.ndarray, jump: tuple[float, float, float]) -> float:
    """Seconds from a jump until the estimate crosses the geometric midpoint of the two levels."""
    t, before, after = jump
    mid = math.sqrt(before * after)
    later = ts >= t
    crossed = (v[later] <= mid) if after < before else (v[later] >= mid)
    hits = np.flatnonzero(crossed & (ts[later] <= t + REACTION_CAP_S))
    return float(ts[later][hits[0]] - t) if hits.size else REACTION_CAP_S


def estimator_accuracy(
    logs: list[tuple[Link, list[tuple[float, str, tuple[Any, ...]]]]], bundle: Manifest
) -> list[dict[str, Any]]:
    """Replay the adaptive policy's observations into estimators of several settings: error,
    lag over whole traces and on their volatile stretches, and the reaction to jumps."""
    out = []
    for label, settings in ESTIMATOR_VARIANTS:
        errors: list[np.ndarray] = []
        ratios: list[np.ndarray] = []
        series: list[tuple[Link, np.ndarray, np.ndarray]] = []
        reactions: list[float] = []
        for link, log in logs:
            est = Estimator(bundle, **settings)
            i = 0
            ts, values = [], []
            for t in np.arange(0.0, link.duration, INTERVAL_S):
                while i < len(log) and log[i][0] <= t:
                    apply_event(est, *log[i])
                    i += 1
                if est.uplink.count:
                    ts.append(float(t))
                    values.append(est.estimates(now=float(t)).uplink_bps)
            t_arr, v = np.array(ts), np.array(values)
            if not len(t_arr):
                continue
            errors.append(np.abs(v - link.rates_at(t_arr)) / link.rates_at(t_arr))
            ratios.append(v / link.rates_at(t_arr))
            series.append((link, t_arr, v))
            reactions += [reaction_time(t_arr, v, j) for j in jumps(link) if j[0] >= t_arr[0]]
        links = [x[0] for x in series]
        t_all, v_all = [x[1] for x in series], [x[2] for x in series]
        whole = [np.ones(len(t), dtype=bool) for t in t_all]
        volatile = [volatile_mask(link, t) for link, t in zip(links, t_all)]
        out.append(
            {
                "label": label,
                "median_rel_err": float(np.median(np.concatenate(errors))),
                "median_ratio": float(np.median(np.concatenate(ratios))),
                "lag_s": _lag(t_all, v_all, links, whole),
                "volatile_share": float(np.mean(np.concatenate(volatile))),
                "volatile_lag_s": _lag(t_all, v_all, links, volatile),
                "volatile_err": float(np.median(np.concatenate([e[m] for e, m in zip(errors, volatile)]))),
                "jumps": len(reactions),
                "reaction_s": float(np.median(reactions)) if reactions else math.nan,
            }
        )
    return out


def decide_speed(n_cuts: int = 100, n_codecs: int = 10, calls: int = 20000) -> dict[str, Any]:
    """Microseconds per decide() for a synthetic bundle of n_cuts x n_codecs candidates."""
    rng = np.random.default_rng(0)
    spec = (TensorSpec((None, 4), "float32"),)
    specs = ["f32", "f32+zstd1", "f16", "f16+zstd1", "bf16+zstd1", "q8+zstd1", "q8c+zstd1", "q6c+zstd1"]
    codecs = [*specs, "q4c+zstd1", "q2c+zstd1"][:n_codecs]
    seg = rng.uniform(1e-4, 1e-3, n_cuts).tolist()
    nbytes = rng.integers(1000, 1_000_000, n_cuts + 1).tolist()
    table = [
        {"cut": k, "codec": c, "fidelity": float(rng.uniform(0.98, 1.0)), "bytes": float(nbytes[k] / (1 + j))}
        for k in range(n_cuts)
        for j, c in enumerate(codecs)
    ]
    costs = [
        {"cut": k, "codec": c, "encode_s": 1e-4, "decode_s": 1e-4, "bytes": float(nbytes[k])}
        for k in range(n_cuts)
        for c in codecs
    ]
    bundle = Manifest(
        name="speed",
        cuts=[Cut(k, f"c{k}", spec, int(nbytes[k])) for k in range(n_cuts + 1)],
        inputs=spec,
        in_spec="",
        out_spec="",
        graph_hash="x",
        codecs=codecs,
        fidelity={"metric": "top1", "samples": 1, "table": table},
        profiles={
            "host": {
                "segments": {"1": {"median_s": seg, "p90_s": seg}},
                "codecs": costs,
                "response_bytes": 4000,
            }
        },
    )
    ests = [
        Estimates(
            uplink_bps=float(u),
            downlink_bps=8e6,
            rtt_s=0.05,
            cloud_queue_s=0.001,
            device_slowdown=float(s),
            uplink_sd=float(sd),
        )
        for u, s, sd in zip(
            rng.uniform(1e5, 1e8, 1000), rng.uniform(1, 30, 1000), rng.uniform(0.0, 0.8, 1000)
        )
    ]
    variants = {
        "adaptive (the default)": make_policy("adaptive", bundle, fidelity_budget=0.0, seed=0),
        "adaptive, hedge priced": make_policy("adaptive", bundle, fidelity_budget=0.0, seed=0, hedge=True),
        "adaptive-p95": make_policy("adaptive", bundle, fidelity_budget=0.0, seed=0, objective="p95"),
    }
    out: dict[str, Any] = {
        "candidates": float(len(variants["adaptive (the default)"].model)),
        "load": load_average(),
    }
    best = {name: math.inf for name in variants}
    for policy in variants.values():
        for e in ests[:200]:
            policy.decide(e)
    for _ in range(5):  # interleaved, best of 5: the machine is shared
        for name, policy in variants.items():
            t0 = time.perf_counter()
            for i in range(calls):
                policy.decide(ests[i % 1000])
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    out["us"] = best["adaptive (the default)"] * 1e6
    out["variants"] = {name: b * 1e6 for name, b in best.items()}
    out["load_after"] = load_average()
    return out


def write_speed(path: Path, speed: dict[str, Any]) -> None:
    """benchmarks/results/decide.md: decide()'s cost for 100 cuts x 10 codecs."""
    lines = [
        "# decide() speed: 100 cuts x 10 codecs",
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_policy.py --decide-only`. A synthetic bundle of 100 "
        f"cuts x 10 codecs ({speed['candidates']:.0f} candidates, all feasible); 1000 random estimates "
        "(uplink 0.1-100 Mbit/s, device 1-30x, uplink log-sd 0-0.8) cycled; 20000 calls per variant, the "
        "variants interleaved, best of 5 rounds.",
        f"Machine: {machine()}; load average {speed['load']} before, {speed['load_after']} after (`uptime`; "
        "the machine is shared, so a loaded run reads high).",
        "",
        "| policy | us per decide() | target <= 10 us |",
        "|---|---:|---|",
        *[
            f"| {name} | {us:.1f} | {'met' if us <= 10 else 'missed'} |"
            for name, us in speed["variants"].items()
        ],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# -- the report ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="12 traces per set and a short sweep")
    add_deployment_args(parser, TRACES)
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the compiled bundle is cached")
    parser.add_argument("--fresh", action="store_true", help="recompile and reprofile the bundle")
    parser.add_argument("--reprofile", action="store_true", help="profile the cached bundle again")
    parser.add_argument(
        "--device-slowdown",
        type=float,
        help="the median device's time / profiled time (default: where local and cloud tie on --static-from)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="profile repeats when (re)building")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, help="the estimators' tau_s (default: Estimator's)")
    parser.add_argument("--risk", type=float, help="the estimators' risk (default: Estimator's)")
    parser.add_argument(
        "--probe-after", type=float, help="the estimators' probe_after_s (default: Estimator's)"
    )
    parser.add_argument(
        "--jump-after",
        type=int,
        help="the estimators' jump_after: change detection after that many samples (default: Estimator's)",
    )
    parser.add_argument(
        "--decide-only", action="store_true", help="only time decide() (writes results/decide.md)"
    )
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the half/double slowdown runs")
    parser.add_argument(
        "--extra-codecs",
        help="comma-separated codecs: replay on the demo's bundle (lab/_demo.py: compiled, calibrated, "
        "held out and profiled as `make demo` does, cached beside it) compiled with these codecs beside "
        "the demo's (replaces --cache)",
    )
    parser.add_argument(
        "--codecs",
        help="comma-separated codecs the policies may use, a subset of the bundle's (default: all of "
        "them); the same bundle and profile with and without some codecs say what those buy",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of labelled photos (the label: the integer a file name starts with, e.g. "
        "../shared/imagenet-samples): the demo's bundle (with --extra-codecs) compiled with its fidelity "
        "table measured on them, `si.compile(evaluation=, labels=)`: agreement, and accuracy for "
        "--accuracy-drop (built once, cached); default: the bundle's own table, measured on the shipped "
        "sample photos",
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        default=320,
        help="labelled photos to measure on (default 320; all of those of other classes: 600)",
    )
    parser.add_argument(
        "--accuracy-drop",
        type=float,
        help="budget as an accuracy drop (0.01: within 1 point of the float model's top-1) instead of "
        f"the {BUDGET} agreement; needs --images",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "policy.md")
    args = parser.parse_args()
    if args.accuracy_drop is not None and args.images is None:
        parser.error("--accuracy-drop needs --images DIR (labelled photos)")

    args.load_start = load_average()
    if args.decide_only:
        write_speed(RESULTS / "decide.md", decide_speed())
        print((RESULTS / "decide.md").read_text())
        return 0
    limit = 12 if args.quick else None
    sets = trace_links(args.traces, limit)
    tuning = [link for links in trace_links(args.static_from, None).values() for link in links]
    extra = [c for c in (args.extra_codecs or "").split(",") if c]
    args.labelled = None
    if args.images is not None:
        args.cache, args.labelled = labelled_bundle(args.images, args.eval_images, args.seed, extra)
    elif extra:
        args.cache = demo_bundle(extra)
    bundle, facts = load_bundle(args.cache, fresh=args.fresh, reprofile=args.reprofile, repeats=args.repeats)
    budget = Budget(args.accuracy_drop)
    if args.codecs:
        bundle = restrict(bundle, [c for c in args.codecs.split(",") if c])
    started = time.perf_counter()
    sweep_links = tuning[:: max(1, len(tuning) // 12)][:12]
    sweep_rows = sweep(bundle, sweep_links, list(SLOWDOWNS), budget)
    ds = args.device_slowdown or tie_slowdown(bundle, sweep_links, **budget.tuning())
    if not args.device_slowdown:
        sweep_rows = sorted([*sweep_rows, *sweep(bundle, sweep_links, [ds], budget)], key=lambda r: r["ds"])
    deploy_static = choose_static(bundle, tuning, ds, **budget.tuning())
    print(f"sweep and deploy-time static done in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    results: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, list[dict[str, Any]]] = {}
    settings = estimator_settings(args)
    for set_name, links in sets.items():
        results[set_name] = run_set(bundle, links, ds, args.seed, settings, deploy_static, args.fleet, budget)
        accuracy[set_name] = estimator_accuracy(results[set_name]["logs"], bundle)
        print(f"{set_name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sensitivity = []
    for factor in () if args.no_sensitivity or args.fleet else (0.5, 2.0):
        for set_name, links in sets.items():
            subset = links[:: max(1, len(links) // 12)][:12]
            res = run_set(
                bundle, subset, round(ds * factor), args.seed, settings, deploy_static, None, budget
            )
            sensitivity.append({"set": set_name, "ds": round(ds * factor), **verdict(res)})
    print(f"sensitivity done in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    speed = decide_speed()
    write_speed(RESULTS / "decide.md", speed)
    eff_policy = make_policy("adaptive", bundle, **budget.policy())
    eff_speed = time_decide(eff_policy)
    write_report(
        args, bundle, facts, ds, sweep_rows, results, accuracy, sensitivity, speed, eff_speed, eff_policy
    )
    if args.json:
        write_json(args, bundle, ds, results)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def run_set(
    bundle: Manifest,
    links: list[Link],
    ds: float,
    seed: int,
    settings: dict[str, Any],
    deploy_static: tuple[int, str],
    fleet: list[float] | None = None,
    budget: Budget = Budget(),
) -> dict[str, Any]:
    """Every policy and the oracle over ``links``: latencies, choices, and adaptive's logs.

    ``ds`` is the median device's slowdown; with ``fleet``, trace ``i``'s device is
    ``fleet[j]`` times as fast, ``j`` drawn uniformly (seeded by ``seed``).
    """
    hindsight = choose_static(bundle, links, ds, **budget.tuning())
    speeds = fleet_speeds(fleet, len(links), seed)
    lat: dict[str, list[float]] = {p: [] for p in (*POLICIES, *REFERENCES)}
    kinds: dict[str, Counter[str]] = {p: Counter() for p in (*POLICIES, *REFERENCES)}
    ratios: dict[str, list[float]] = {p: [] for p in (*POLICIES, "causal")}
    hedges: dict[str, int] = {p: 0 for p in HEDGED}
    exited: Counter[str] = Counter()
    probes = explored = 0
    logs = []
    at_local: dict[str, list[bool]] = {"adaptive": [], "oracle": []}
    by_speed: dict[float, dict[str, list[float]]] = {}
    local_s = float(make_policy("local", bundle).model.head[-1])
    for i, link in enumerate(links):
        log: list[tuple[float, str, tuple[Any, ...]]] = []
        trace_ds = ds / speeds[i]
        runners, oracle, oracle_kinds = simulate(
            bundle, link, trace_ds, deploy_static, seed + i, log, settings, hindsight, budget
        )
        logs.append((link, log))
        lat["oracle"] += oracle
        kinds["oracle"] += oracle_kinds
        group = by_speed.setdefault(speeds[i], {p: [] for p in (*POLICIES, *REFERENCES)})
        group["oracle"] += oracle
        for name, r in runners.items():
            group[name] += r.latencies
        for name, r in runners.items():
            lat[name] += r.latencies
            kinds[name] += r.kinds
            exited[name] += r.exited
            ratios[name].append(statistics.mean(r.latencies) / statistics.mean(oracle))
        for name in HEDGED:
            hedges[name] += runners[name].hedges
        probes += runners["adaptive"].probes
        explored += runners["adaptive"].explored
        floor = local_s * trace_ds * (1 - 1e-9)
        at_local["adaptive"] += [x >= floor for x in runners["adaptive"].latencies]
        at_local["oracle"] += [x >= floor for x in oracle]
    return {
        "static": deploy_static,
        "hindsight": hindsight,
        "speeds": speeds,
        "lat": lat,
        "kinds": kinds,
        "per_trace": ratios,
        "hedges": hedges,
        #: Per policy, the share of its requests an early exit answered (0 without exits).
        "exited": {name: exited[name] / len(lat[name]) for name in exited},
        "probes": probes,
        "explored": explored,
        "n_traces": len(links),
        "logs": logs,
        "at_local": {p: float(np.mean(v)) for p, v in at_local.items()},
        "by_speed": dict(sorted(by_speed.items())),
    }


#: What adaptive is judged against (the other rows are variants of it or a hindsight baseline).
BASELINES = ("neurosurgeon", "cloud", "local", "static")


def verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Adaptive against the oracle and every baseline (p95: lower, or a tie within 0.5%)."""
    lat = res["lat"]
    a_mean, a_p95 = statistics.mean(lat["adaptive"]), p95(lat["adaptive"])
    return {
        "ratio": a_mean / statistics.mean(lat["oracle"]),
        "vs_causal": a_mean / statistics.mean(lat["causal"]),
        "causal_vs_oracle": statistics.mean(lat["causal"]) / statistics.mean(lat["oracle"]),
        "beats_mean": all(a_mean < statistics.mean(lat[p]) for p in BASELINES),
        "beats_p95": all(a_p95 <= p95(lat[p]) * 1.005 for p in BASELINES),
        "worst_mean": min(statistics.mean(lat[p]) / a_mean for p in BASELINES),
        "worst_p95": min(p95(lat[p]) / a_p95 for p in BASELINES),
        "vs_static": statistics.mean(lat["static"]) / a_mean,
        # No policy can do better against static than the per-request hindsight oracle does.
        "oracle_vs_static": statistics.mean(lat["static"]) / statistics.mean(lat["oracle"]),
    }


def write_json(
    args: argparse.Namespace, bundle: Manifest, ds: float, results: dict[str, dict[str, Any]]
) -> None:
    """Per set and policy: mean, p95 (seconds), mean / oracle, requests; and how the run was set up."""
    out: dict[str, Any] = {
        "bundle": bundle.name,
        "median_device_slowdown": ds,
        "fleet": args.fleet,
        "static_from": str(args.static_from),
        "traces": str(args.traces),
        "fidelity_budget": BUDGET,
        "accuracy_drop": args.accuracy_drop,
        "labelled": args.labelled,
        "load_average": load_average(),
        "sets": {},
    }
    for set_name, res in results.items():
        lat = res["lat"]
        oracle = statistics.mean(lat["oracle"])
        out["sets"][set_name] = {
            "traces": res["n_traces"],
            "static": {"cut": res["static"][0], "codec": res["static"][1]},
            "static_hindsight": {"cut": res["hindsight"][0], "codec": res["hindsight"][1]},
            "hedges": res["hedges"],
            "policies": {
                name: {
                    "mean_s": statistics.mean(xs),
                    "p95_s": p95(xs),
                    "mean_over_oracle": statistics.mean(xs) / oracle,
                    "requests": len(xs),
                }
                for name, xs in lat.items()
            },
            "verdict": verdict(res),
            "by_device_speed": {
                f"{speed:g}": {
                    name: {"mean_s": statistics.mean(xs), "requests": len(xs)} for name, xs in g.items()
                }
                for speed, g in res["by_speed"].items()
            },
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


def estimator_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.tau:
        settings["tau_s"] = args.tau
    if args.probe_after:
        settings["probe_after_s"] = args.probe_after
    if args.risk is not None:
        settings["risk"] = args.risk
    if args.jump_after is not None:
        settings["jump_after"] = args.jump_after
    return settings


def time_decide(policy: TablePolicy, calls: int = 20000) -> float:
    est = Estimates(uplink_bps=1.5e6, downlink_bps=1.5e6, rtt_s=RTT_S, device_slowdown=8.0)
    for _ in range(200):
        policy.decide(est)
    t0 = time.perf_counter()
    for _ in range(calls):
        policy.decide(est)
    return (time.perf_counter() - t0) / calls * 1e6


def fleet_table(res: dict[str, Any], ds: float) -> list[str]:
    """Per fleet multiple: static, adaptive, oracle and local, and where static's excess comes from."""
    groups = res["by_speed"]
    total = sum(sum(g["static"]) - sum(g["oracle"]) for g in groups.values())
    counts = Counter(res["speeds"])
    lines = [
        "Per device speed (the fleet's multiples of the median device): where static loses, and where "
        "adaptive loses to the oracle or to `cloud` (the input uploaded with the cheapest admitted codec: "
        "a JPEG upload where the budget admits one). `static / oracle` is the most any policy can gain "
        "over static; "
        "`share of static's excess`: this group's part of static's total latency above the oracle's.",
        "",
        "| device speed | slowdown | traces | local ms | cloud ms | static ms | adaptive ms | oracle ms "
        "| static / adaptive | static / oracle | adaptive / oracle | adaptive / cloud "
        "| share of static's excess |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for speed, g in groups.items():
        m = {p: statistics.mean(g[p]) for p in ("local", "cloud", "static", "adaptive", "oracle")}
        excess = sum(g["static"]) - sum(g["oracle"])
        lines.append(
            f"| {speed:g}x | {ds / speed:g} | {counts[speed]} | {m['local'] * 1000:.0f} "
            f"| {m['cloud'] * 1000:.0f} | {m['static'] * 1000:.0f} | {m['adaptive'] * 1000:.0f} "
            f"| {m['oracle'] * 1000:.0f} | "
            f"{m['static'] / m['adaptive']:.2f} | "
            f"{m['static'] / m['oracle']:.2f} | {m['adaptive'] / m['oracle']:.3f} | "
            f"{m['adaptive'] / m['cloud']:.3f} | "
            f"{excess / total if total else 0:.0%} |"
        )
    return [*lines, ""]


def fidelity_line(args: argparse.Namespace, bundle: Manifest, rows: int) -> str:
    """The report's line on how the fidelity table was measured."""
    f = bundle.fidelity
    if args.labelled:
        return (
            f"- fidelity table: `si.compile(..., calibration=..., evaluation=..., labels=..., codecs=...)` "
            f"(the demo's cuts and calibration: {f.get('calibration_samples')} crops of lab/_images.py's "
            f"CALIBRATION_PHOTOS), measured on {f.get('samples')} labelled photos of "
            f"`{args.labelled['folder']}/` (`--images {args.images}`; classes other than the 128 photos "
            "that calibrate in bench_codecs' split; float model top-1 "
            f"{f.get('float_accuracy', math.nan):.1%}): "
            f"per row top-1 agreement, accuracy and its drop, each with its interval; {rows} rows. Bytes: "
            "mean encoded bytes of those photos at batch 1."
        )
    if f.get("labels"):  # a labelled bundle given by --cache
        return (
            "- fidelity table: `si.compile(..., evaluation=..., labels=...)`, measured on "
            f"{f.get('samples')} "
            f"labelled inputs (float model top-1 {f.get('float_accuracy', math.nan):.1%}), clip ranges "
            f"calibrated on {f.get('calibration_samples')} others; {rows} rows."
        )
    if f.get("held_out"):
        return (
            f"- fidelity table: `si.compile(..., calibration=..., evaluation=..., codecs=...)`, "
            f"{f.get('metric')} agreement with the uncompressed model on {f.get('samples')} held-out "
            "colour-jittered crops of lab/_images.py's EVALUATION_PHOTOS, clip ranges calibrated on "
            f"{f.get('calibration_samples')} real photos (10 colour images from skimage.data and sklearn's "
            "sample images, 3 crops each, resized to 224, ImageNet normalisation; the two sets share "
            f"photos, not crops); {rows} rows. Bytes: mean encoded bytes of the held-out crops at batch 1."
        )
    return (
        f"- fidelity table: `si.compile(..., calibration=..., codecs=...)`, {f.get('metric')} agreement "
        f"with the uncompressed model on {f.get('samples')} real photos (10 colour images from "
        "skimage.data and sklearn's sample images, 3 crops each, resized to 224, ImageNet normalisation); "
        f"{rows} rows. Bytes: mean encoded bytes of those photos at batch 1."
    )


def write_report(
    args: argparse.Namespace,
    bundle: Manifest,
    facts: dict[str, Any],
    ds: float,
    sweep_rows: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    accuracy: dict[str, list[dict[str, Any]]],
    sensitivity: list[dict[str, Any]],
    speed: dict[str, float],
    eff_speed: float,
    eff_policy: TablePolicy,
) -> None:
    """args.out: the run's inputs, the slowdown sweep, each trace set, the targets, the
    sensitivity, the uplink estimator and decide()'s speed, one section each."""
    lines = [
        *report_head(args),
        *inputs_section(args, bundle, facts, ds),
        *sweep_section(args, sweep_rows, ds),
    ]
    for set_name, res in results.items():
        lines += trace_set_section(args, bundle, set_name, res, ds)
    lines += targets_section(args, results)
    lines += sensitivity_section(sensitivity)
    lines += estimator_section(accuracy)
    lines += decide_section(args, speed, eff_speed, eff_policy)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


def report_head(args: argparse.Namespace) -> list[str]:
    """The title, how to reproduce the run and the machine it ran on."""
    return [
        "# Policy benchmark: EfficientNet-Lite0 over real network traces",
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_policy.py "
        + " ".join(a for a in sys.argv[1:])
        + "` (`--quick`: 12 traces per set; `--traces DIR`, `--static-from DIR`, `--fleet`, `--json FILE`). "
        "How it simulates: docs/decision.md and the script's docstring.",
        f"Machine: {machine()}; load average {args.load_start} when it started, {load_average()} when it "
        "ended (`uptime`; the machine is shared).",
    ]


def inputs_section(args: argparse.Namespace, bundle: Manifest, facts: dict[str, Any], ds: float) -> list[str]:
    """## Inputs: the bundle, its fidelity table and profile, the world, the labels."""
    return [
        "",
        "## Inputs",
        "",
        f"- bundle: EfficientNet-Lite0 (ImageNet weights), {len(bundle.cuts)} cuts, "
        f"codecs {', '.join(bundle.codecs)}.",
        fidelity_line(args, bundle, len(bundle.fidelity.get("table", []))),
        profile_line(bundle, facts),
        f"- world: a request every {INTERVAL_S * 1000:.0f} ms; round trip {RTT_S * 1000:.0f} ms with "
        f"{RTT_JITTER:.0%} log-normal jitter; cloud queue {QUEUE_S * 1000:.0f} ms; cloud as fast as this "
        f"machine; device {ds:g}x slower than this machine; uplink and downlink both follow the trace.",
        f"- {Budget(args.accuracy_drop).words()} (a row admitted where its interval at make_policy's default "
        "confidence supports it); adaptive explores 5% of decisions within 10% of the winner (seeded).",
        "",
    ]


def profile_line(bundle: Manifest, facts: dict[str, Any]) -> str:
    """The host profile: whole-model time per batch size, and how long profiling and compiling took."""
    prof = bundle.profiles["host"]
    whole = {b: sum(s["median_s"]) * 1000 for b, s in prof["segments"].items()}
    return (
        f"- profile: `profile_bundle` on this machine ({prof.get('repeats')} repeats; "
        f"{prof.get('machine')}): whole model "
        + ", ".join(f"{ms:.1f} ms at batch {b}" for b, ms in whole.items())
        + (f"; profiling took {facts['profile_s']:.0f} s" if "profile_s" in facts else "")
        + (f" (compile with fidelity: {facts['compile_s'] / 60:.0f} min)" if "compile_s" in facts else "")
        + "."
    )


def sweep_section(args: argparse.Namespace, sweep_rows: list[dict[str, Any]], ds: float) -> list[str]:
    """The oracle and the two fixed ends over device slowdowns, and the slowdown the runs use."""
    lines = [
        "## Device slowdown: where neither end wins outright",
        "",
        "Hindsight-oracle choices and mean latency of the two fixed ends, on a few traces of each set:",
        "",
        "| device slowdown | local ms | cloud ms | oracle ms | oracle: local / split / cloud |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in sweep_rows:
        s = r["share"]
        lines.append(
            f"| {r['ds']:g} | {r['local'] * 1000:.0f} | {r['cloud'] * 1000:.0f} | {r['oracle'] * 1000:.0f} | "
            f"{s['local']:.0%} / {s['split']:.0%} / {s['cloud']:.0%} |"
        )
    why = (
        " (given with --device-slowdown)."
        if args.device_slowdown
        else ": the slowdown at which running everything on the device takes as long, on average, as "
        "sending the input to the cloud (`tie_slowdown`), so neither end wins outright."
    )
    return [*lines, "", f"The runs below use **{ds:g}x**" + why, ""]


def trace_set_section(
    args: argparse.Namespace, bundle: Manifest, set_name: str, res: dict[str, Any], ds: float
) -> list[str]:
    """One trace set: the statics, every policy's latency against the oracle's and adaptive's, the
    gap to the oracle split into lag and unpredictability, and the fleet's table."""
    lat = res["lat"]
    k, c = res["static"]
    hk, hc = res["hindsight"]
    fleet = (
        f" Fleet: each trace's device {', '.join(f'{x:g}' for x in args.fleet)}x the median device's "
        f"speed (drawn: {dict(sorted(Counter(res['speeds']).items()))})."
        if args.fleet
        else ""
    )
    lines = [
        f"## {set_name}: {res['n_traces']} traces, {len(lat['oracle'])} requests",
        "",
        f"static = cut {k} ({bundle.cuts[k].name}) with {c}: tuned at deploy time (least mean latency "
        f"on the traces of {args.static_from.name}/ at the median device). static-hindsight = cut {hk} "
        f"with {hc}: tuned the same way on this very set (no deployment has it).{fleet} Hedged requests: "
        + ", ".join(f"{p} {n} ({n / len(lat[p]):.1%})" for p, n in res["hedges"].items())
        + "."
        + (
            " Answered by an early exit on the device: "
            + ", ".join(f"{p} {x:.1%}" for p, x in res["exited"].items())
            + "."
            if any(res["exited"].values())
            else ""
        ),
        "",
        "| policy | mean ms | p95 ms | mean / oracle | adaptive mean / this | adaptive p95 / this | "
        "local / split / cloud |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(policy_row(res, name) for name in (*POLICIES, *REFERENCES)),
        *gap_lines(res),
    ]
    return lines + fleet_table(res, ds) if args.fleet else lines


def policy_row(res: dict[str, Any], name: str) -> str:
    """One policy's mean and p95, against the oracle's mean and adaptive's, and where it ran."""
    lat, kinds = res["lat"], res["kinds"][name]
    oracle_mean = statistics.mean(lat["oracle"])
    a_mean, a_p95 = statistics.mean(lat["adaptive"]), p95(lat["adaptive"])
    m, q = statistics.mean(lat[name]), p95(lat[name])
    total = sum(kinds.values())
    share = " / ".join(f"{kinds[x] / total:.0%}" for x in ("local", "split", "cloud"))
    return (
        f"| {name} | {m * 1000:.0f} | {q * 1000:.0f} | {m / oracle_mean:.3f} | {a_mean / m:.3f} | "
        f"{a_p95 / q:.3f} | {share} |"
    )


def gap_lines(res: dict[str, Any]) -> list[str]:
    """Adaptive / oracle as lag (adaptive / causal) times unpredictability (causal / oracle), and
    adaptive's per-trace ratios, probes, exploration and requests at the all-on-device latency."""
    v = verdict(res)
    per_trace = res["per_trace"]["adaptive"]
    return [
        "",
        f"The gap to the hindsight oracle, split: adaptive / oracle {v['ratio']:.3f} = adaptive / causal "
        f"{v['vs_causal']:.3f} (the estimator's lag and error: ours to close) x causal / oracle "
        f"{v['causal_vs_oracle']:.3f} (the link changing after the decision: nobody's). "
        f"Causal per trace, mean / oracle: median {statistics.median(res['per_trace']['causal']):.3f}.",
        "",
        f"Adaptive per trace, mean / oracle: median {statistics.median(per_trace):.3f}, worst "
        f"{max(per_trace):.3f}. Probes sent by adaptive's estimator: {res['probes']}; "
        f"explored decisions: {res['explored']} ({res['explored'] / len(res['lat']['adaptive']):.1%}). "
        f"Requests at or above the all-on-device latency: adaptive {res['at_local']['adaptive']:.1%}, "
        f"oracle {res['at_local']['oracle']:.1%}.",
        "",
    ]


def targets_section(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    """Per trace set, adaptive against the targets, and why a missed one could not be met."""
    lines = [f"## Targets ({Budget(args.accuracy_drop).words()}; baselines: {', '.join(BASELINES)})", ""]
    for set_name, res in results.items():
        lines += set_targets(args, set_name, verdict(res), res["at_local"])
    return lines


def set_targets(
    args: argparse.Namespace, set_name: str, v: dict[str, Any], at_local: dict[str, float]
) -> list[str]:
    """One set's verdict line, with the bound on static's gain (fleet) and on the p95 where they bind."""
    lines = [
        f"- {set_name}: adaptive mean / oracle = {v['ratio']:.3f} (target <= 1.05: "
        f"**{'met' if v['ratio'] <= 1.05 else 'missed'}**); adaptive mean / causal reference = "
        f"{v['vs_causal']:.3f} (target <= 1.05: **{'met' if v['vs_causal'] <= 1.05 else 'missed'}**; "
        f"causal / oracle {v['causal_vs_oracle']:.3f}); lower mean than every baseline: "
        f"**{'met' if v['beats_mean'] else 'missed'}** (the closest: {v['worst_mean']:.3f}x adaptive's); "
        f"p95 no higher (0.5% tie): **{'met' if v['beats_p95'] else 'missed'}** (closest "
        f"{v['worst_p95']:.3f}x); deploy-time static's mean / adaptive's: {v['vs_static']:.2f}"
        + (
            f" (fleet target >= 1.5: **{'met' if v['vs_static'] >= 1.5 else 'missed'}**)"
            if args.fleet
            else ""
        )
        + "."
    ]
    if args.fleet and v["vs_static"] < 1.5:
        lines.append(
            f"  The bound: the hindsight oracle's own mean is {v['oracle_vs_static']:.2f}x better than "
            f"deploy-time static's on this set, and no policy beats the oracle; adaptive gets "
            f"{(v['vs_static'] - 1) / max(v['oracle_vs_static'] - 1, 1e-9):.0%} of that headroom"
            + (
                " (1.5x is out of reach for any policy here: the bound is below it)."
                if v["oracle_vs_static"] < 1.5
                else "."
            )
        )
    if not v["beats_p95"] and at_local["adaptive"] >= 0.05:
        lines.append(
            f"  The p95 of every policy that can keep a request on the device is at most the "
            f"all-on-device latency; {at_local['adaptive']:.1%} of adaptive's requests end at or above "
            f"it (the hindsight oracle's: {at_local['oracle']:.1%}), so its p95 equals `local`'s "
            "rather than beating it."
        )
    return lines


def sensitivity_section(sensitivity: list[dict[str, Any]]) -> list[str]:
    """The comparison again at half and twice the device slowdown."""
    return [
        "",
        "Sensitivity: the same comparison at half and twice the device slowdown, on up to 12 traces per set.",
        "",
        "| trace set | device slowdown | adaptive mean / oracle | lower mean than all | lower p95 than all |",
        "|---|---:|---:|---|---|",
        *[
            f"| {r['set']} | {r['ds']:g} | {r['ratio']:.3f} | {'yes' if r['beats_mean'] else 'no'} "
            f"({r['worst_mean']:.3f}) | {'yes' if r['beats_p95'] else 'no'} ({r['worst_p95']:.3f}) |"
            for r in sensitivity
        ],
        "",
        "(In parentheses: the best other policy's mean or p95 over adaptive's; above 1 means adaptive "
        "is lower.)",
        "",
    ]


def estimator_section(accuracy: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Adaptive's own observations replayed into estimators of several settings: error, lag, reaction."""
    lines = [
        "## Uplink estimator on the traces",
        "",
        "The adaptive run's own observations (its transfers and probes, in the order they ended) replayed "
        "into estimators of several settings (`tau_s`: the time constant in seconds of transfer; change "
        "detection: after two consecutive samples beyond the outlier clip on one side, the estimate "
        "follows unclipped at a quarter of `tau_s`). Error: |estimate - trace rate| / trace rate at each "
        "request (median). Lag: the shift of the trace that best matches the estimate (median absolute "
        f"log error), 0 to 10 s, over whole traces and over their volatile stretches (the rate over the "
        f"last {VOLATILE_WINDOW_S:g} s spans more than {VOLATILE_SPAN:g}x). Reaction: per lasting jump "
        f"(the median rate over {JUMP_WINDOW_S:g} s before and after a trace sample differ more than "
        f"{VOLATILE_SPAN:g}x), the seconds until the estimate crosses the geometric midpoint of the two "
        f"levels (median; {REACTION_CAP_S:g} s when it does not within that).",
        "",
        "| trace set | estimator | median relative error | median estimate / rate | lag s | volatile "
        "share | volatile lag s | volatile error | jumps | reaction s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for set_name, rows in accuracy.items():
        for r in rows:
            lines.append(
                f"| {set_name} | {r['label']} | {r['median_rel_err']:.2f} | {r['median_ratio']:.2f} | "
                f"{r['lag_s']:.1f} | {r['volatile_share']:.0%} | {r['volatile_lag_s']:.1f} | "
                f"{r['volatile_err']:.2f} | {r['jumps']} | {r['reaction_s']:.2f} |"
            )
    return lines


def decide_section(
    args: argparse.Namespace, speed: dict[str, float], eff_speed: float, eff_policy: TablePolicy
) -> list[str]:
    """decide()'s cost on the synthetic table (and its variants) and on EfficientNet-Lite0's."""
    return [
        "",
        "## decide() speed",
        "",
        f"- synthetic 100 cuts x 10 codecs ({speed['candidates']:.0f} candidates, all feasible): "
        f"**{speed['us']:.1f} us** per decision "
        f"(target <= 10 us: **{'met' if speed['us'] <= 10 else 'missed'}**; load {speed['load']}); "
        + ", ".join(f"{name}: {us:.1f} us" for name, us in speed["variants"].items())
        + " (decide.md).",
        f"- EfficientNet-Lite0 ({len(eff_policy.model)} candidates, {len(eff_policy.rows)} feasible at "
        f"{Budget(args.accuracy_drop).words()}): {eff_speed:.1f} us.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
