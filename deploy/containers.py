"""Containers of the server image (deploy/Dockerfile, built by ``make image``) for the image tests
(tests/integration/deploy/test_image.py) and benchmarks/bench_image.py, which load this file by
its path (deploy/ is no package): start one with a bundle repository mounted read-only, wait for
readiness, signal it, read its exit status and output. No tests here.

podman runs with ``--runtime runc``, explicit ulimits and ``--network=host`` (deploy/image.py
``run_options``): each container listens on its own loopback ports, given in SPLITINFER_*.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    """``path`` as module ``name``, once per process (the tests and benchmarks load these files
    by the same names: ``splitinfer_deploy_<stem>``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


image = _load("splitinfer_deploy_image", ROOT / "deploy" / "image.py")
VARIANTS = image.VARIANTS


def engine() -> str | None:
    """podman, or docker where its daemon answers (deploy/image.py), or None."""
    return image.find_engine()


def image_exists(eng: str, name: str) -> bool:
    done = subprocess.run([eng, "image", "inspect", name], capture_output=True, check=False)
    return done.returncode == 0


def readable_copy(source: Path, target: Path) -> Path:
    """A copy of a bundle repository that the image's user (uid 10001) can read."""
    shutil.copytree(source, target)
    for root, dirs, files in os.walk(target):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    os.chmod(target, 0o755)
    return target


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Container:
    """``<engine> run`` of the server image in the foreground (its exit status is the server's),
    the repository mounted read-only at /models, listening on free loopback ports."""

    def __init__(self, eng: str, image_name: str, repository: Path, workdir: Path, name: str, *env: str):
        self.eng, self.image, self.repository, self.name = eng, image_name, repository, name
        self.port, self.metrics_port = free_port(), free_port()
        self.log = workdir / f"{name}.log"
        self.env = [
            "SPLITINFER_HOST=127.0.0.1",
            f"SPLITINFER_PORT={self.port}",
            f"SPLITINFER_METRICS_PORT={self.metrics_port}",
            "SPLITINFER_COMPUTE_THREADS=1",
            "SPLITINFER_TORCH_THREADS=1",
            "SPLITINFER_DRAIN_TIMEOUT_S=20",
            *env,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    # the names HAProxy (deploy/haproxy/cluster.py) reads from a replica
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        subprocess.run([self.eng, "rm", "-f", self.name], capture_output=True, check=False)
        cmd = [self.eng, "run", "--rm", "--name", self.name, *image.run_options(self.eng)]
        cmd += ["-v", f"{self.repository}:/models:ro"]
        for item in self.env:
            cmd += ["-e", item]
        cmd.append(self.image)
        self.started = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        return http_status(f"http://{self.metrics_address}/v2/health/ready") == 200

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from :meth:`start` until readiness answers 200 (AssertionError if it exits)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"container {self.name} exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"container {self.name} not ready in {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.eng, "exec", self.name, *args], capture_output=True, text=True, timeout=60, check=False
        )

    def healthcheck(self) -> int:
        """The exit status of the image's own HEALTHCHECK command, run inside the container."""
        if Path(self.eng).name == "podman":
            done = subprocess.run(
                [self.eng, "healthcheck", "run", self.name], capture_output=True, timeout=60, check=False
            )
            return done.returncode
        inspect = subprocess.run(
            [self.eng, "inspect", "--format", "{{json .Config.Healthcheck.Test}}", self.image],
            capture_output=True,
            text=True,
            check=True,
        )
        import json

        test = json.loads(inspect.stdout)
        assert test and test[0] == "CMD", test
        return self.exec(*test[1:]).returncode

    def signal(self, sig: str) -> None:
        subprocess.run([self.eng, "kill", "--signal", sig, self.name], capture_output=True, check=False)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.alive():
            subprocess.run([self.eng, "rm", "-f", "-t", "5", self.name], capture_output=True, check=False)
            assert self.proc is not None
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_once(eng: str, image_name: str, repository: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run the image on ``repository`` until it exits by itself (a bad mount); status and output."""
    cmd = [eng, "run", "--rm", *image.run_options(eng), "-v", f"{repository}:/models:ro"]
    cmd += ["-e", f"SPLITINFER_PORT={free_port()}", "-e", f"SPLITINFER_METRICS_PORT={free_port()}"]
    cmd += ["-e", "SPLITINFER_HOST=127.0.0.1", image_name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr


def faults_behind_haproxy(
    eng: str, name: str, models: Path, work: Path, bundle: Any, model: Any, before: int, per_phase: int
) -> tuple[dict[str, Any], int, str]:
    """Three containers of image ``name`` behind the shipped HAProxy config under edge traffic
    (deploy/haproxy/scenarios.py's ``Traffic``): ``before`` requests, then replica 2 killed with
    kill -9 (once HAProxy marks it DOWN, ``per_phase`` more), then replica 1 sent SIGTERM
    (``per_phase`` more). Returns each phase's ``Figures`` ("none", "kill -9 r2", "SIGTERM r1"),
    replica 1's exit status and its output."""
    scenarios = _load("splitinfer_deploy_scenarios", ROOT / "deploy" / "haproxy" / "scenarios.py")
    cluster, figures = scenarios.cluster, scenarios.Figures
    replicas = [Container(eng, name, models, work, f"si-lb-r{i}") for i in (1, 2, 3)]
    lb = cluster.HAProxy(replicas, work)
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        lb.start_ready()
        cluster.wait_until(lambda: all(lb.status(f"r{i}") == "UP" for i in (1, 2, 3)), "3 replicas UP")
        with scenarios.Traffic(lb.url, bundle, model, clients=3) as traffic:
            t0 = time.monotonic()
            traffic.wait_for(before, t0)
            killed = time.monotonic()
            replicas[1].signal("SIGKILL")
            cluster.wait_until(lambda: lb.status("r2") == "DOWN", "r2 DOWN")
            traffic.wait_for(per_phase, killed)
            drained = time.monotonic()
            replicas[0].signal("SIGTERM")
            status = replicas[0].wait(60)
            traffic.wait_for(per_phase, drained)
        phases = {
            "none": figures.of(traffic.since(t0, killed)),
            "kill -9 r2": figures.of(traffic.since(killed, drained)),
            "SIGTERM r1": figures.of(traffic.since(drained)),
        }
        return phases, status, replicas[0].output()
    finally:
        lb.stop()
        for r in replicas:
            r.stop()
