"""Scale-out for real: `splitinfer serve` replicas behind a real HAProxy (the shipped
deploy/haproxy/haproxy.cfg, addresses from the environment), real EdgeClients sending
continuously through it, and faults: kill -9 of a replica, SIGTERM of another, a replica added,
a bundle updated on one replica only. The autoscaling signal (the prometheus-adapter rule's
query) is evaluated by a real Prometheus scraping three replicas under two offered loads.

Everything runs on 127.0.0.1 with ephemeral ports, a bounded number of requests and bounded
waits; nothing asserts a duration (the figures with durations are benchmarks/bench_scale.py's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import splitinfer as si
from splitinfer.bundle import Bundle
from splitinfer.lab import demo_model
from tests.support.deploy import scenarios, tool

pytestmark = pytest.mark.slow

#: Requests before and after each fault (the benchmark sends ten times as many).
SCALE = scenarios.Scale(before=15, after=45)
CLIENTS = 3


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    tool("haproxy", "apt-get install haproxy (make test does it)")
    tool("prometheus", "apt-get install prometheus (make test does it)")


@pytest.fixture
def repositories(repository: Path, tmp_path: Path) -> list[Path]:
    return scenarios.replica_repositories(repository, tmp_path)


@pytest.fixture(scope="module")
def bundle(repository: Path) -> Bundle:
    return Bundle.load(repository / "democnn")


# Typically about 25 s.
@pytest.mark.timeout(240)
def test_a_replica_added_killed_and_drained_under_load(
    repositories: list[Path], tmp_path: Path, bundle: Bundle, cnn: torch.nn.Module
) -> None:
    with scenarios.running(repositories, tmp_path, running_=2) as c:
        # The balancer exposes each replica's own /metrics on its private listener, and keeps
        # the replicas' probes and metrics off the public one.
        status, text = scenarios.replica_metrics_through_balancer(c, 1)
        assert status == 200 and "splitinfer_inflight_requests" in text

        assert scenarios.http_get(f"{c.lb.url}/metrics")[0] == 404
        assert scenarios.http_get(f"{c.lb.url}/v2/health/ready")[0] == 404

        # A replica added (r3: declared to HAProxy, started now) gets traffic.
        added = scenarios.add_one(c, bundle, cnn, SCALE, CLIENTS)
        _assert_all_answered_by_the_cloud(added, "replica added")
        assert added.extra["answered_by_new"] > 0

        # kill -9 of r2: every request answered, by another replica after HAProxy's retry
        # (or on the device), none wrong; r2 leaves the rotation and gets nothing more.
        killed = scenarios.kill_one(c, bundle, cnn, SCALE, CLIENTS)
        assert killed.errors == 0, killed.error_samples
        assert killed.wrong == 0
        assert set(killed.fallbacks) <= {"unreachable", "cloud_error", "circuit_open", "timeout"}
        assert killed.extra["sent_to_dead_after_down"] == 0
        assert killed.extra["victim_exit"] == -9

        # SIGTERM of r1: it drains (in-flight requests finish, new ones go elsewhere) and
        # exits cleanly; no request fails or falls back.
        drained = scenarios.drain_one(c, bundle, cnn, SCALE, CLIENTS)
        assert drained.extra["exit_code"] == 0, drained.extra["log_tail"]
        _assert_all_answered_by_the_cloud(drained, "SIGTERM")
        assert c.lb.status("r3") == "UP"


def _assert_all_answered_by_the_cloud(figures: scenarios.Figures, what: str) -> None:
    assert figures.requests >= SCALE.after, what
    assert figures.errors == 0, (what, figures.error_samples)
    assert figures.wrong == 0, what
    assert figures.fell_back == 0, (what, figures.fallbacks)


@pytest.fixture(scope="module")
def new_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, torch.nn.Module, Path]:
    """The same model name with other weights: another graph hash (version 2 of democnn)."""
    model = demo_model(seed=1)
    bundle = si.compile(model, (torch.rand(1, 3, 32, 32),), name="democnn")
    path = tmp_path_factory.mktemp("v2") / "democnn"
    bundle.save(path)
    return bundle, model, path


# Typically about 30 s.
@pytest.mark.timeout(300)
def test_version_skew_falls_back_on_the_device_then_reloaded_edges_are_served(
    repositories: list[Path],
    tmp_path: Path,
    bundle: Bundle,
    cnn: torch.nn.Module,
    new_bundle: tuple[Bundle, torch.nn.Module, Path],
) -> None:
    assert new_bundle[0].graph_hash != bundle.graph_hash
    scenarios.install_bundle(repositories[2], new_bundle[2])  # r3 is updated first
    with scenarios.running(repositories, tmp_path) as c:
        # r1 and r2 are retired rather than updated and restarted (the benchmark restarts them):
        # the same balancer behaviour, two torch imports fewer.
        figures = scenarios.version_skew(
            c, repositories, (bundle, cnn), new_bundle, SCALE, CLIENTS, restart=False
        )
    skew, rollout, reloaded = figures.skew, figures.rollout, figures.reloaded
    for phase in (skew, rollout, reloaded):
        assert phase.errors == 0, phase.error_samples
        assert phase.wrong == 0  # every answer is the model the edge holds
    # During the skew the old edges' requests that reach r3 get 409 and finish on the device;
    # the others are served.
    assert skew.fallbacks["graph_mismatch"] > 0
    assert set(skew.fallbacks) == {"graph_mismatch"}
    assert skew.fell_back < skew.requests
    # Once every replica in rotation holds the new bundle, edges that reload it are all served.
    assert reloaded.requests >= SCALE.after
    assert reloaded.fell_back == 0, reloaded.fallbacks


# Typically about 40 s.
@pytest.mark.timeout(300)
def test_autoscaling_signal_tracks_the_offered_load(
    repositories: list[Path], tmp_path: Path, bundle: Bundle, cnn: torch.nn.Module
) -> None:
    """The adapter's query over three replicas, evaluated by Prometheus, rises with the load:
    idle, one sending edge, four. The window is shortened from the rule's 1m to 8s so each
    load step takes seconds (benchmarks/bench_scale.py runs the rule's own window)."""
    (rule,) = scenarios.adapter_rules()
    window = "8s"
    query = scenarios.adapter_query(rule, "splitinfer_inflight_requests", 'job="splitinfer"', "replica")
    assert "[1m]" in query
    query = query.replace("[1m]", f"[{window}]")
    with scenarios.running(repositories, tmp_path, prometheus=True) as c:
        prom = c.prometheus

        def scraped() -> bool:
            up = prom.query('up{job="splitinfer"}')
            return len(up) == 3 and all(s["value"][1] == "1" for s in up)

        scenarios.wait_until(scraped, "three replicas scraped", timeout=60)
        steps = scenarios.offered_load_steps(c, bundle, cnn, query, window, (0, 1, 4), step_s=8.0, rows=8)
    idle, low, high = (sum(s["per_replica"].values()) for s in steps)
    assert set(steps[2]["per_replica"]) == {"r1", "r2", "r3"}  # one value per pod, as the HPA reads
    assert idle == 0
    # The gauge is sampled at each scrape: one client's short requests may be between scrapes
    # every time (the sampled mean is then 0), so only four clients' load must show, and above one's.
    assert 0 <= low < high, steps
    for step in steps[1:]:
        assert step["figures"].errors == 0 and step["figures"].wrong == 0
    # The gauge's average agrees in kind with Little's law from the duration histograms.
    assert steps[2]["littles_law"] > steps[1]["littles_law"] > 0
