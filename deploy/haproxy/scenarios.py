"""What a local cluster (``cluster.py``: replicas, HAProxy, Prometheus) is put through: edge
clients sending continuously through the balancer, and the scenarios (kill -9, SIGTERM, a
replica added, a bundle updated on one replica) with their figures.

tests/integration/deploy/test_scale.py runs each scenario short and asserts on counts;
benchmarks/bench_scale.py runs them longer and records the figures (durations included) in
``benchmarks/results/scale.md``. Nothing here asserts a duration. deploy/ is no package: both
load this file by its path (as this file loads ``cluster.py``).

The replicas are ``splitinfer.lab``'s ServerProcess on fixed loopback ports (``cluster.Replica``),
so that one can be started later, or again, where HAProxy expects it.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from splitinfer.bundle import Bundle
from splitinfer.edge import EdgeClient

HERE = Path(__file__).resolve().parent
CLUSTER_SCRIPT = HERE / "cluster.py"
#: The Prometheus adapter's rules (the autoscaler's metric), read by the offered-load scenario.
ADAPTER_VALUES = HERE.parent / "k8s" / "prometheus-adapter" / "values.yaml"


def _load_cluster() -> ModuleType:
    spec = importlib.util.spec_from_file_location("splitinfer_haproxy_cluster", CLUSTER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cluster = _load_cluster()
Cluster = cluster.Cluster
Replica = cluster.Replica
free_port = cluster.free_port
http_get = cluster.http_get
wait_until = cluster.wait_until

#: Options of every replica: one compute thread and one torch thread (2 shared cores).
REPLICA_OPTIONS = ("--compute-threads", "1", "--torch-threads", "1", "--drain-timeout-s", "20")
#: The edge's request: after the second pooling, float32 (8 KiB a row): the cloud runs the rest.
CUT, CODEC = 6, "f32"
#: HAProxy's health-check interval and fall count (haproxy.cfg, ``default-server``).
CHECK_INTERVAL_S, CHECK_FALL = 1.0, 2


def replica_repositories(source: Path, root: Path, slots: int = 3) -> list[Path]:
    """A copy of the bundle repository ``source`` per replica, so one can be updated alone."""
    copies = []
    for i in range(1, slots + 1):
        target = root / f"repo-r{i}"
        shutil.copytree(source, target)
        copies.append(target)
    return copies


def install_bundle(repository: Path, bundle_dir: Path, name: str = "democnn") -> None:
    """Replace the bundle ``name`` in a (stopped) replica's repository by ``bundle_dir``."""
    shutil.rmtree(repository / name)
    shutil.copytree(bundle_dir, repository / name)


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_query(rule: dict[str, Any], series: str, matchers: str, group_by: str) -> str:
    """The adapter's metricsQuery with its Go-template fields filled in as the adapter does."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


# --- Traffic -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (time.monotonic), how long it took, and how it ended."""

    started: float
    latency_s: float
    #: Why the edge finished it on the device (None: the cloud answered).
    fallback: str | None
    #: Whether the outputs equal the model's own (within float tolerance).
    correct: bool
    #: An exception raised to the caller (None: the request was answered).
    error: str | None = None
    client: int = 0


class Traffic:
    """``clients`` EdgeClients, a thread each, sending one request after another through
    ``url`` until stopped; every outcome is kept. ``model`` computes the expected outputs.

    Use it as a context manager; :meth:`restart_clients` builds new clients (with another
    bundle: edges that reload) without stopping the flow.
    """

    def __init__(
        self,
        url: str,
        bundle: Bundle,
        model: torch.nn.Module,
        *,
        clients: int = 3,
        rows: int = 1,
        cut: int = CUT,
        codec: str = CODEC,
        pool: int = 8,
    ):
        self.url, self.cut, self.codec, self.clients = url, cut, codec, clients
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._set_model(bundle, model, rows, pool)

    def _set_model(self, bundle: Bundle, model: torch.nn.Module, rows: int, pool: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        inputs = [torch.rand(rows, 3, 32, 32, generator=gen) for _ in range(pool)]
        with torch.no_grad():
            self._cases = [(x, model(x)) for x in inputs]
        self.bundle = bundle

    def _client(self, index: int, generation: int) -> None:
        bundle, cases = self.bundle, self._cases
        with EdgeClient(
            self.url,
            bundle=bundle,
            policy="static",
            cut=self.cut,
            codec=self.codec,
            deadline_s=None,
            hedge=False,  # what the balancer does is counted here: no race with the device
        ) as client:
            i = index
            while not self._stop.is_set() and self._generation == generation:
                x, expected = cases[i % len(cases)]
                i += 1
                t0 = time.monotonic()
                try:
                    y = client.infer(x)
                except Exception as exc:  # an unanswered request: what the scenarios count
                    outcome = Outcome(t0, time.monotonic() - t0, None, False, repr(exc)[:300], index)
                else:
                    trace = client.last_trace
                    assert trace is not None
                    correct = bool(torch.allclose(y, expected, rtol=1e-4, atol=1e-5))
                    outcome = Outcome(t0, time.monotonic() - t0, trace.fallback, correct, None, index)
                with self._lock:
                    self.outcomes.append(outcome)

    def _start_clients(self) -> None:
        generation = self._generation
        threads = [
            threading.Thread(target=self._client, args=(i, generation), daemon=True, name=f"edge-{i}")
            for i in range(self.clients)
        ]
        for thread in threads:
            thread.start()
        self._threads.extend(threads)

    def restart_clients(self, bundle: Bundle, model: torch.nn.Module, rows: int = 1) -> None:
        """Edges that reload: the running clients finish their request and close; new ones,
        holding ``bundle``, take over."""
        self._generation += 1
        self._join()
        self._set_model(bundle, model, rows, len(self._cases))
        self._start_clients()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=60)
        alive = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        assert not alive, f"edge clients still sending after 60 s: {alive}"

    def since(self, t: float, until: float | None = None) -> list[Outcome]:
        """The requests started at or after ``t`` (and finished before ``until``)."""
        with self._lock:
            return [
                o
                for o in self.outcomes
                if o.started >= t and (until is None or o.started + o.latency_s < until)
            ]

    def wait_for(self, n: int, since: float, timeout: float = 60.0) -> None:
        """Until ``n`` requests have started since ``since`` (bounded)."""
        wait_until(lambda: len(self.since(since)) >= n, f"{n} requests", timeout, every=0.02)

    def __enter__(self) -> Traffic:
        self._start_clients()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._join()


# --- Figures -------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Counts (and, for the benchmark, latencies) of the requests of one phase."""

    requests: int
    errors: int
    wrong: int
    fallbacks: Counter[str]
    p50_ms: float
    p99_ms: float
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Figures:
        latencies = sorted(o.latency_s for o in outcomes if o.error is None)
        errors = [o.error for o in outcomes if o.error is not None]
        return cls(
            requests=len(outcomes),
            errors=len(errors),
            wrong=sum(1 for o in outcomes if o.error is None and not o.correct),
            fallbacks=Counter(o.fallback for o in outcomes if o.fallback),
            p50_ms=1000 * _quantile(latencies, 0.50),
            p99_ms=1000 * _quantile(latencies, 0.99),
            error_samples=errors[:3],
        )

    @property
    def fell_back(self) -> int:
        return sum(self.fallbacks.values())


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


# --- Scenarios -----------------------------------------------------------------------------------


@dataclass
class Scale:
    """How long each scenario runs: requests before the fault and after it."""

    before: int = 40
    after: int = 120


@contextmanager
def running(
    repositories: list[Path], workdir: Path, *, running_: int | None = None, prometheus: bool = False
) -> Iterator[Any]:
    with Cluster(
        repositories,
        slots=len(repositories),
        running=running_,
        prometheus=prometheus,
        workdir=workdir,
        options=REPLICA_OPTIONS,
    ) as c:
        yield c


def baseline(c: Any, bundle: Bundle, model: torch.nn.Module, scale: Scale, clients: int) -> Figures:
    """No fault: the same traffic for as many requests as a fault scenario sends."""
    with Traffic(c.lb.url, bundle, model, clients=clients) as traffic:
        t0 = time.monotonic()
        traffic.wait_for(scale.before + scale.after, t0)
    return Figures.of(traffic.since(t0))


def kill_one(c: Any, bundle: Bundle, model: torch.nn.Module, scale: Scale, clients: int) -> Figures:
    """kill -9 of replica r2 under load; the figures of the requests from the kill on."""
    victim = c.replica("r2")
    with Traffic(c.lb.url, bundle, model, clients=clients) as traffic:
        traffic.wait_for(scale.before, time.monotonic())
        served_before = float(c.lb.servers()["r2"]["stot"])
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        out_after_s = c.wait_status("r2", "DOWN")
        sent_while_down = float(c.lb.servers()["r2"]["stot"])
        traffic.wait_for(scale.after, killed)
        figures = Figures.of(traffic.since(killed))
    stats = c.lb.servers()
    figures.extra.update(
        out_of_rotation_s=out_after_s,
        sent_to_dead_after_down=float(stats["r2"]["stot"]) - sent_while_down,
        sent_to_dead_before_down=sent_while_down - served_before,
        lb_retries=sum(float(s.get("wretr") or 0) for s in stats.values()),
        lb_redispatches=sum(float(s.get("wredis") or 0) for s in stats.values()),
        victim_exit=victim.wait(10),
    )
    return figures


def drain_one(c: Any, bundle: Bundle, model: torch.nn.Module, scale: Scale, clients: int) -> Figures:
    """SIGTERM of replica r1 under load: it drains and exits; the figures from the signal on."""
    victim = c.replica("r1")
    with Traffic(c.lb.url, bundle, model, clients=clients) as traffic:
        traffic.wait_for(scale.before, time.monotonic())
        signalled = time.monotonic()
        victim.signal(signal.SIGTERM)
        exit_code = victim.wait(60)
        exited_s = time.monotonic() - signalled
        out_after_s = c.wait_status("r1", "DOWN")
        traffic.wait_for(scale.after, signalled)
        figures = Figures.of(traffic.since(signalled))
    figures.extra.update(
        exit_code=exit_code,
        drained_in_s=exited_s,
        out_of_rotation_s=out_after_s,
        log_tail=victim.output()[-2000:],
    )
    return figures


def add_one(c: Any, bundle: Bundle, model: torch.nn.Module, scale: Scale, clients: int) -> Figures:
    """Replica r3, declared to HAProxy but not running, starts under load: how soon it serves."""
    newcomer = c.replica("r3")
    c.wait_status("r3", "DOWN")  # declared, not running: the health check says so
    with Traffic(c.lb.url, bundle, model, clients=clients) as traffic:
        traffic.wait_for(scale.before, time.monotonic())
        started = time.monotonic()
        newcomer.start()
        newcomer.wait_ready()
        ready_s = time.monotonic() - started
        up_s = c.wait_status("r3", "UP") + ready_s
        wait_until(lambda: newcomer.answered() > 0, "r3 answers a request", timeout=60, every=0.05)
        serving_s = time.monotonic() - started
        answered_before = [r.answered() for r in c.replicas]
        serving = time.monotonic()
        traffic.wait_for(scale.after, serving)  # all three in rotation
        figures = Figures.of(traffic.since(started))
    shares = [r.answered() - before for r, before in zip(c.replicas, answered_before)]
    figures.extra.update(
        ready_s=ready_s,
        in_rotation_s=up_s,
        first_answer_s=serving_s,
        first_answer_after_up_s=serving_s - up_s,
        answered_by_new=newcomer.answered(),
        #: Share of the requests each replica answered once all three were in rotation.
        shares=[x / max(1.0, sum(shares)) for x in shares],
    )
    return figures


@dataclass
class SkewFigures:
    skew: Figures
    rollout: Figures
    reloaded: Figures


def version_skew(
    c: Any,
    repositories: list[Path],
    old: tuple[Bundle, torch.nn.Module],
    new: tuple[Bundle, torch.nn.Module, Path],
    scale: Scale,
    clients: int,
    restart: bool = True,
) -> SkewFigures:
    """r3 already serves the new bundle (same name, another graph hash), r1 and r2 the old one.
    Edges holding the old bundle send through the balancer (skew: r3 answers them 409, they
    finish on the device); r1 and r2 are then updated one at a time (SIGTERM, new bundle,
    start; with ``restart`` False they are only retired, leaving r3); then the edges reload the
    new bundle and are served."""
    new_bundle, new_model, new_dir = new
    with Traffic(c.lb.url, *old, clients=clients) as traffic:
        t0 = time.monotonic()
        traffic.wait_for(scale.before + scale.after, t0)
        t1 = time.monotonic()
        updated = [(c.replica("r1"), repositories[0]), (c.replica("r2"), repositories[1])]
        for replica, _ in updated:  # both at once: r3 serves meanwhile (409 to old edges)
            replica.signal(signal.SIGTERM)
        for replica, repository in updated:
            assert replica.wait(60) == 0, replica.output()
            if restart:
                install_bundle(repository, new_dir)
                replica.start()
        for replica, _ in updated:
            if restart:
                replica.wait_ready()
                c.wait_status(replica.name, "UP")
            else:
                c.wait_status(replica.name, "DOWN")
        t2 = time.monotonic()
        traffic.restart_clients(new_bundle, new_model)
        t3 = time.monotonic()
        traffic.wait_for(scale.before + scale.after, t3)
        return SkewFigures(
            skew=Figures.of(traffic.since(t0, t1)),
            rollout=Figures.of(traffic.since(t1, t2)),
            reloaded=Figures.of(traffic.since(t3)),
        )


# --- The autoscaling signal ----------------------------------------------------------------------


def inflight_per_replica(prom: Any, query: str) -> dict[str, float]:
    """The adapter query's answer, by replica."""
    return {s["metric"].get("replica", "?"): float(s["value"][1]) for s in prom.query(query)}


def littles_law(prom: Any, window: str) -> float:
    """In flight by Little's law over ``window``: seconds of server time spent per second, from
    the request-duration histograms' sums (independent of the in-flight gauge)."""
    result = prom.query(
        f'sum(rate(splitinfer_request_duration_seconds_sum{{job="splitinfer",stage="total"}}[{window}]))'
    )
    return float(result[0]["value"][1]) if result else 0.0


def offered_load_steps(
    c: Any,
    bundle: Bundle,
    model: torch.nn.Module,
    query: str,
    window: str,
    levels: tuple[int, ...],
    step_s: float,
    rows: int,
) -> list[dict[str, Any]]:
    """For each number of continuously sending clients in ``levels``, after ``step_s`` seconds of
    that load: the adapter query per replica (what the HPA averages), Little's law, the
    request rate."""
    prom = c.prometheus
    steps: list[dict[str, Any]] = []
    for clients in levels:
        if clients == 0:
            if steps:  # idle after load: wait for the window to forget it
                time.sleep(step_s)
            per = inflight_per_replica(prom, query)
            law = littles_law(prom, window)
            steps.append({"clients": 0, "per_replica": per, "littles_law": law, "rps": 0.0})
            continue
        with Traffic(c.lb.url, bundle, model, clients=clients, rows=rows, cut=0) as traffic:
            t0 = time.monotonic()
            time.sleep(step_s)
            at = time.time()
            per = inflight_per_replica(prom, query)
            law = littles_law(prom, window)
            done = len(traffic.since(t0))
        steps.append(
            {
                "clients": clients,
                "per_replica": per,
                "littles_law": law,
                "rps": done / step_s,
                "at": at,
                "figures": Figures.of(traffic.since(t0)),
            }
        )
    return steps


def replica_metrics_through_balancer(c: Any, index: int) -> tuple[int, str]:
    """``/replicas/<index>/metrics`` on the balancer's private listener."""
    status, body = http_get(f"http://127.0.0.1:{c.lb.metrics_port}/replicas/{index}/metrics")
    return status, body.decode(errors="replace")
