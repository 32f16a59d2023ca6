"""Helpers shared by the deployment tests (the files under deploy/, the tools that check them,
the metric names the code exports, processes started and always stopped); no tests here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.edge._metrics import EdgeMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "splitinfer.json"
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"

#: The Kubernetes version the rendered manifests are validated against (kubernetes-validate).
KUBERNETES_VERSION = "1.33.0"

_METRIC = re.compile(r"\bsplitinfer_[a-z0-9_]+\b")


def tool(name: str, install: str) -> str:
    """Path of a command-line tool (the venv's bin first), or skip, or fail under CI."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {install}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kw)


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The ENV of the final stage (``K=V`` form)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage(instructions):
        if keyword == "ENV":
            for token in shlex.split(arguments):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """The JSON (exec form) arguments of the last ``keyword`` instruction (HEALTHCHECK: of CMD)."""
    (arguments,) = [args for kw, args in instructions if kw == keyword][-1:]
    if keyword == "HEALTHCHECK":
        arguments = arguments[arguments.index("CMD ") + 4 :]
    value = json.loads(arguments)
    assert isinstance(value, list), f"{keyword} must be in exec form (a JSON array), got {arguments}"
    return value


# --- Metric names --------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the server and the edge export (counters with ``_total``, histograms with
    ``_bucket``, ``_sum``, ``_count``), read from the real metric classes, not from a list."""
    names: set[str] = set()
    registry = CollectorRegistry()
    ServerMetrics(registry, version="test")
    EdgeMetrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("_sum", "_count", "_created"),
    }
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metrics_in(expression: str) -> set[str]:
    return set(_METRIC.findall(expression))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, variables included."""
    found = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        found.append((f"variable {variable['name']}", variable["definition"]))
    return found


def as_promql(grafana_expression: str) -> str:
    """A dashboard query as Prometheus itself would get it: Grafana's variables filled in."""
    text = grafana_expression.replace("$__rate_interval", "1m").replace('"$model"', '".*"')
    label_values = re.fullmatch(r"label_values\((\w+), *\w+\)", text)
    return label_values.group(1) if label_values else text


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def deploy_script(relative: str) -> ModuleType:
    """The Python file ``deploy/<relative>``, loaded by its path once (deploy/ is no package)."""
    name = "splitinfer_deploy_" + Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / relative)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: deploy/haproxy/scenarios.py: the cluster's scenarios (test_scale.py runs them short,
#: benchmarks/bench_scale.py long), and the readers of the adapter's rules they share.
scenarios = deploy_script("haproxy/scenarios.py")
adapter_rules, adapter_query = scenarios.adapter_rules, scenarios.adapter_query
