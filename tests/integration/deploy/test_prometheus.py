"""A real Prometheus scrapes a real `splitinfer serve` and an edge app, with the shipped scrape
config and alerting rules; the test then reads what Prometheus stored through its HTTP API.

The server is started the way the container starts it (the Dockerfile's ENTRYPOINT and ENV, on
127.0.0.1 with ephemeral ports), Prometheus (Debian's package; `make test` installs it) on
127.0.0.1 with a 1 s scrape interval and its own storage directory. Every process is stopped in
a ``finally``, whatever fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from splitinfer.edge import EdgeClient
from splitinfer.lab import ServerProcess
from tests.support.deploy import (
    ALERTS,
    PROMETHEUS_CONFIG,
    adapter_query,
    adapter_rules,
    alert_rules,
    as_promql,
    dashboard_expressions,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    tool,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")
#: Bounds on waiting (the machine is shared and slow); nothing is asserted about durations.
START_S = 90.0
SCRAPE_S = 60.0
REQUESTS = 12
#: Bodies above this get 413 from the server: the edge then finishes on the device.
MAX_BODY = 16384
CUT, CODEC = 6, "f32"  # after the second pooling: 8 KiB per row in float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` with its output in ``log``; terminated (killed if it must be) on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _eventually(check: Callable[[], T], what: str, timeout: float = SCRAPE_S) -> T:
    """Call ``check`` until it returns without an AssertionError, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout} s: {exc}") from exc
            time.sleep(0.5)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400 on a bad query: say why
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=promql)["result"]

    def series(self, promql: str) -> list[dict[str, Any]]:
        result = self.query(promql)
        assert result, f"no series for {promql}"
        return result


def _prometheus_config(tmp_path: Path, server_metrics: int, edge_metrics: int) -> Path:
    """The shipped prometheus.yml, pointed at the local processes and scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(ALERTS)]
    targets = {"splitinfer": server_metrics, "splitinfer-edge": edge_metrics}
    for job in config["scrape_configs"]:
        job.pop("file_sd_configs", None)
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets.pop(job['job_name'])}"]}]
    assert not targets, f"prometheus.yml has no job for {targets}"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _server_env(repository: Path) -> dict[str, str]:
    """The container's environment (the Dockerfile's ENV), on 127.0.0.1 with free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_")}
    image_env = dockerfile_env(dockerfile_instructions())
    env.update({k: v for k, v in image_env.items() if k != "PATH"})
    # SPLITINFER_RUNTIME is the build's VARIANT: the default variant's, ONNX Runtime
    assert image_env["SPLITINFER_RUNTIME"] == "${VARIANT}"
    env["SPLITINFER_RUNTIME"] = "onnxruntime"
    env.pop("XDG_CACHE_HOME", None)
    env.update(
        HOME="/nonexistent",  # the image's user has no home: nothing may need one
        SPLITINFER_REPOSITORY=str(repository),
        SPLITINFER_HOST="127.0.0.1",
        SPLITINFER_PORT="0",
        SPLITINFER_METRICS_PORT="0",
        SPLITINFER_COMPUTE_THREADS="1",
        SPLITINFER_TORCH_THREADS="1",
        SPLITINFER_MAX_BODY_BYTES=str(MAX_BODY),
        SPLITINFER_DRAIN_TIMEOUT_S="5",
    )
    return env


def _healthcheck(port: int) -> int:
    """Run the Dockerfile's HEALTHCHECK command against ``port``; its exit status."""
    command = exec_form(dockerfile_instructions(), "HEALTHCHECK")
    assert command[0] == "/opt/venv/bin/python"  # the image's venv; its python here
    env = dict(os.environ, SPLITINFER_METRICS_PORT=str(port))
    result = subprocess.run(
        [sys.executable, *command[1:]], env=env, timeout=30, check=False, capture_output=True
    )
    return result.returncode


# Typically about 20 s; the bounded waits above allow for a machine far busier than usual.
@pytest.mark.timeout(240)
def test_prometheus_scrapes_server_and_edge(onnx_repository: Path, tmp_path: Path) -> None:
    repository = onnx_repository  # the default image runs ONNX Runtime tails
    prometheus = Path(tool("prometheus", "apt-get install prometheus (make test does it)"))
    entrypoint = exec_form(dockerfile_instructions(), "ENTRYPOINT")
    assert entrypoint[0] == "splitinfer"
    command = [str(Path(sys.executable).parent / "splitinfer"), *entrypoint[1:]]
    server_log, prom_log = tmp_path / "server.log", tmp_path / "prometheus.log"
    with ExitStack() as stack:
        server = stack.enter_context(
            ServerProcess(
                None, command=command, port=None, log_level=None, env=_server_env(repository), log=server_log
            )
        )
        api_port, metrics_port = server.port, server.metrics_port

        # The edge app exposes its EdgeClient registry the way docs/deploy.md says.
        registry = CollectorRegistry()
        httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        stack.callback(thread.join, 10)
        stack.callback(httpd.server_close)
        stack.callback(httpd.shutdown)

        port = _free_port()
        config = _prometheus_config(tmp_path, metrics_port, httpd.server_port)
        args = [
            str(prometheus),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        prom_proc = stack.enter_context(_process(args, prom_log))
        prom = Prometheus(f"http://127.0.0.1:{port}")

        def scraped() -> None:
            assert prom_proc.poll() is None, f"prometheus exited:\n{prom_log.read_text()}"
            up = {s["metric"]["job"]: s["value"][1] for s in prom.series("up")}
            assert up == {"splitinfer": "1", "splitinfer-edge": "1"}, up

        _eventually(scraped, "both targets up", timeout=START_S)

        # Real traffic: requests the cloud serves, then one too large for it (413, the edge
        # finishes on the device).
        client = stack.enter_context(
            EdgeClient(
                f"http://127.0.0.1:{api_port}",
                bundle=repository / "democnn",
                policy="static",
                cut=CUT,
                codec=CODEC,
                deadline_s=None,
                registry=registry,
                hedge=False,  # the fallbacks here are the cloud's refusals
            )
        )
        for i in range(REQUESTS):
            client.infer(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)))
            assert client.last_trace.fallback is None
        client.infer(torch.rand(4, 3, 32, 32))
        assert client.last_trace.fallback, "a body over the server's limit must fall back to the device"

        _assert_server_series(prom)
        _assert_edge_series(prom, client.last_trace.fallback)
        _assert_rules_evaluate(prom)
        _assert_dashboard_and_adapter_queries_answer(prom)

        # The image's HEALTHCHECK, run as Docker would, against this server and a closed port.
        assert _healthcheck(metrics_port) == 0
        assert _healthcheck(_free_port()) != 0
    assert server.returncode == 0, f"the server did not drain cleanly:\n{server.output}"


def _assert_server_series(prom: Prometheus) -> None:
    def requests_counted() -> list[dict[str, Any]]:
        ok = prom.series('splitinfer_requests_total{job="splitinfer",model="democnn",code="ok"}')
        assert float(ok[0]["value"][1]) == REQUESTS
        rejected = prom.series('splitinfer_rejections_total{job="splitinfer",reason="too_large"}')
        assert float(rejected[0]["value"][1]) >= 1
        return ok

    requests_counted_ = _eventually(requests_counted, "request counter scraped")
    assert requests_counted_[0]["metric"]["instance"].startswith("127.0.0.1:")

    stages = prom.series('count by (stage) (splitinfer_request_duration_seconds_bucket{model="democnn"})')
    assert {s["metric"]["stage"] for s in stages} >= {"queue", "decode", "compute", "encode", "total"}
    totals = prom.series('splitinfer_request_duration_seconds_count{model="democnn",stage="total"}')
    assert float(totals[0]["value"][1]) == REQUESTS
    buckets = prom.series('splitinfer_request_duration_seconds_bucket{model="democnn",stage="compute"}')
    assert "+Inf" in {s["metric"]["le"] for s in buckets} and len(buckets) > 2

    batches = prom.series('splitinfer_batch_size_bucket{job="splitinfer",model="democnn"}')
    assert {"1.0", "+Inf"} <= {s["metric"]["le"] for s in batches}
    (rows,) = prom.series('splitinfer_batch_size_sum{model="democnn"}')
    assert float(rows["value"][1]) == REQUESTS  # one row per request, however they were batched

    payload = prom.series('splitinfer_request_payload_bytes_count{model="democnn"}')
    assert {(s["metric"]["cut"], s["metric"]["codec"]) for s in payload} == {(str(CUT), CODEC)}
    (build,) = prom.series("splitinfer_build_info")
    assert {"version", "torch", "python"} <= set(build["metric"])
    for gauge in ("splitinfer_inflight_requests", "splitinfer_queue_depth"):
        (value,) = prom.series(gauge)
        assert float(value["value"][1]) == 0  # nothing in flight between requests
    (ready,) = prom.series("splitinfer_ready")
    assert float(ready["value"][1]) == 1


def _assert_edge_series(prom: Prometheus, reason: str) -> None:
    def decisions() -> None:
        (made,) = prom.series(
            f'splitinfer_edge_decisions_total{{job="splitinfer-edge",model="democnn",cut="{CUT}",codec="{CODEC}"}}'
        )
        assert float(made["value"][1]) == REQUESTS + 1
        (fell,) = prom.series(f'splitinfer_edge_fallbacks_total{{model="democnn",reason="{reason}"}}')
        assert float(fell["value"][1]) == 1

    _eventually(decisions, "edge metrics scraped")


def _assert_rules_evaluate(prom: Prometheus) -> None:
    """Prometheus loaded every shipped alert and evaluates it without error on real data."""
    expected = {rule["alert"] for rule in alert_rules()}

    def evaluated() -> None:
        groups = prom.get("/api/v1/rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == expected
        for name, rule in rules.items():
            assert rule["health"] == "ok", f"{name}: {rule['health']} {rule.get('lastError')}"
        for name in ("SplitinferTargetDown", "SplitinferNotReady"):  # every target is up and ready
            assert rules[name]["state"] == "inactive", f"{name} is {rules[name]['state']}"

    _eventually(evaluated, "alerting rules evaluated")


def _assert_dashboard_and_adapter_queries_answer(prom: Prometheus) -> None:
    """Every dashboard query is valid PromQL and shows data from this server and edge app."""
    for title, expression in dashboard_expressions():
        promql = as_promql(expression)
        _eventually(lambda promql=promql: prom.series(promql), f"dashboard panel {title!r}: {promql}")
    (rule,) = adapter_rules()
    promql = adapter_query(rule, "splitinfer_inflight_requests", 'job="splitinfer",instance!=""', "instance")
    (value,) = prom.series(promql)
    # the minute's average of the in-flight gauge: 0 unless a scrape caught one of the requests
    # in flight, and never above 1 (one edge client, one request at a time)
    assert 0 <= float(value["value"][1]) <= 1, value
