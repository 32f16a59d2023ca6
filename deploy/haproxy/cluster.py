"""A local cluster on 127.0.0.1: N ``splitinfer serve`` replicas, HAProxy in front of them with
the shipped ``deploy/haproxy/haproxy.cfg`` and a real Prometheus scraping every replica and the
balancer. ``make cluster`` runs it until Ctrl-C::

    python deploy/haproxy/cluster.py --repository models/ --replicas 3

The same classes start the clusters of ``tests/integration/deploy/test_scale.py`` and
``benchmarks/bench_scale.py``. The replicas are ``splitinfer serve`` subprocesses (started by
``splitinfer.lab``'s ServerProcess, so run this with the project's Python); HAProxy and
Prometheus are the system's binaries (Debian's ``haproxy`` and ``prometheus`` packages;
``make haproxy prometheus`` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "haproxy.cfg"
#: Slots the shipped configuration declares (SPLITINFER_REPLICA_1 .. _3).
SLOTS = 3
#: Seconds a replica, HAProxy or Prometheus may take to become ready (a shared, slow machine).
START_S = 120.0


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def wait_until(check: Callable[[], bool], what: str, timeout: float = START_S, every: float = 0.1) -> float:
    """Poll ``check`` until it is true; the seconds it took. Raises TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - started


class Process:
    """A subprocess whose output goes to ``log``; stopped (killed if it must be) by :meth:`stop`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log, self.env = args, log, env
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        if self._out is not None:  # started again (a replica restarted): one log, appended to
            self._out.close()
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.args, stdout=self._out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Replica:
    """``splitinfer serve`` (``splitinfer.lab``'s :class:`ServerProcess`) on fixed loopback ports
    (picked free when made), so that it can be started later, or again, where the balancer
    already expects it. Its output goes to ``WORKDIR/<name>.log``."""

    def __init__(self, name: str, repository: Path, workdir: Path, *options: str):
        from splitinfer.lab import ServerProcess

        self.name, self.repository, self.options = name, repository, options
        self.port, self.metrics_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_")}
        self.server = ServerProcess(
            repository,
            "--host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            *options,
            port=self.port,
            env=env,
            log=workdir / f"{name}.log",
            startup_timeout_s=START_S,
            new_session=True,  # a Ctrl-C reaches the cluster, which stops the replicas in order
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        """Launch without waiting (:meth:`wait_ready` waits); again after it exited too."""
        if self.server.proc is not None:
            self.server.stop()  # it exited (killed, drained): release its pipe and log first
        self.server.launch()

    def wait_ready(self) -> float:
        """Seconds until the replica answers its readiness probe."""
        started = time.monotonic()
        self.server.wait_ready()
        return time.monotonic() - started

    def start_ready(self) -> float:
        self.start()
        return self.wait_ready()

    def alive(self) -> bool:
        return self.server.alive()

    def signal(self, sig: int) -> None:
        if self.server.proc is not None and self.alive():
            self.server.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.server.proc is not None, "not started"
        return self.server.proc.wait(timeout)

    def stop(self) -> int | None:
        return self.server.stop()

    def output(self) -> str:
        return self.server.output

    def ready(self) -> bool:
        return http_get(f"http://{self.metrics_address}/v2/health/ready", timeout=2)[0] == 200

    def metrics(self) -> str:
        status, body = http_get(f"http://{self.metrics_address}/metrics")
        return body.decode() if status == 200 else ""

    def answered(self, code: str = "ok") -> float:
        """Inference requests this replica answered with ``code`` (its own counter)."""
        return metric_sum(self.metrics(), "splitinfer_requests_total", f'code="{code}"')


def metric_sum(text: str, name: str, *having: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text exposition whose labels contain every
    string in ``having`` (a small reader: enough for counters and gauges)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            if all(h in labels for h in having):
                total += float(value)
    return total


class HAProxy(Process):
    """HAProxy with the shipped configuration, its addresses given in the environment as in
    compose; a runtime socket (``show stat``) and the private metrics listener are enabled."""

    def __init__(self, replicas: list[Replica], workdir: Path, config: Path = CONFIG):
        if not 1 <= len(replicas) <= SLOTS:
            raise ValueError(f"the shipped haproxy.cfg has {SLOTS} replica slots, got {len(replicas)}")
        binary = shutil.which("haproxy")
        if binary is None:
            raise FileNotFoundError("haproxy is not installed: make haproxy (apt-get install haproxy)")
        self.port, self.metrics_port = free_port(), free_port()
        self.socket_path = workdir / "haproxy.sock"
        env = dict(os.environ)
        env.update(
            SPLITINFER_LB_BIND=f"127.0.0.1:{self.port}",
            SPLITINFER_LB_METRICS_BIND=f"127.0.0.1:{self.metrics_port}",
            SPLITINFER_LB_RUNTIME_SOCKET=str(self.socket_path),
        )
        for i, replica in enumerate(replicas, 1):
            env[f"SPLITINFER_REPLICA_{i}"] = replica.address
            env[f"SPLITINFER_REPLICA_{i}_METRICS"] = replica.metrics_address
        self.config = config
        super().__init__([binary, "-db", "-f", str(config)], workdir / "haproxy.log", env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check(self) -> subprocess.CompletedProcess[str]:
        """``haproxy -c`` on the configuration with this environment."""
        return subprocess.run(
            [*self.args[:-2], "-c", "-f", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def command(self, line: str) -> str:
        """One runtime API command (``show stat``, ``show servers state``, ...); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str = "replicas") -> dict[str, dict[str, str]]:
        """``show stat`` of ``backend``'s servers, by name (status UP, DOWN, ...; stot; ...)."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        fields = lines[0][2:].split(",")
        found: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            row = dict(zip(fields, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
                found[row["svname"]] = row
        return found

    def status(self, server: str) -> str:
        """``UP``, ``DOWN``, ``MAINT``, ... of one replica as the balancer sees it."""
        try:
            return self.servers().get(server, {}).get("status", "").split(" ")[0]
        except OSError:
            return ""

    def start_ready(self) -> float:
        self.start()

        def listening() -> bool:
            if not self.alive():
                raise RuntimeError(f"haproxy exited:\n{self.output()}")
            stats = f"http://127.0.0.1:{self.metrics_port}/stats"
            return self.socket_path.exists() and http_get(stats)[0] == 200

        return wait_until(listening, "haproxy listening")


class Prometheus(Process):
    """Debian's Prometheus scraping every replica's metrics port (job ``splitinfer``, the job
    the shipped alerts and dashboard expect, label ``replica``) and HAProxy's own exporter
    (job ``haproxy``)."""

    def __init__(self, replicas: list[Replica], lb: HAProxy, workdir: Path, interval_s: float = 1.0):
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed: make prometheus (apt-get install it)")
        self.port = free_port()
        every = f"{interval_s:g}s"
        config = {
            "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
            "scrape_configs": [
                {
                    "job_name": "splitinfer",
                    "static_configs": [
                        {"targets": [r.metrics_address], "labels": {"replica": r.name}} for r in replicas
                    ],
                },
                {"job_name": "haproxy", "static_configs": [{"targets": [f"127.0.0.1:{lb.metrics_port}"]}]},
            ],
        }
        path = workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        args = [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        super().__init__(args, workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10)
        if status != 200:
            raise RuntimeError(f"prometheus answered {status} to {promql}: {body[:500]!r}")
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    def start_ready(self) -> float:
        self.start()
        return self.wait_ready()

    def wait_ready(self) -> float:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"prometheus exited:\n{self.output()}")
            return http_get(f"{self.url}/-/ready")[0] == 200

        return wait_until(ready, "prometheus ready")


class Cluster:
    """Replicas in slots 1..``slots``, the first ``running`` of them started, HAProxy in front,
    optionally Prometheus. Use it as a context manager: everything stops on exit."""

    def __init__(
        self,
        repository: Path | list[Path],
        *,
        slots: int = SLOTS,
        running: int | None = None,
        prometheus: bool = False,
        workdir: Path | None = None,
        options: tuple[str, ...] = (),
    ):
        repositories = repository if isinstance(repository, list) else [repository] * slots
        if len(repositories) != slots:
            raise ValueError(f"{slots} slots need {slots} repositories, got {len(repositories)}")
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="splitinfer-cluster-")
        self.workdir = workdir if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.replicas = [
            Replica(f"r{i}", repo, self.workdir, *options) for i, repo in enumerate(repositories, 1)
        ]
        self.running = slots if running is None else running
        self.lb = HAProxy(self.replicas, self.workdir)
        self.prometheus = Prometheus(self.replicas, self.lb, self.workdir) if prometheus else None

    def start(self) -> Cluster:
        try:
            started = self.replicas[: self.running]
            for replica in started:  # all at once: each spends seconds importing torch
                replica.start()
            if self.prometheus is not None:
                self.prometheus.start()
            for replica in started:
                replica.wait_ready()
            self.lb.start_ready()
            for replica in started:
                self.wait_status(replica.name, "UP")
            if self.prometheus is not None:
                self.prometheus.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_status(self, server: str, status: str, timeout: float = START_S) -> float:
        """Seconds until HAProxy reports ``server`` in ``status`` (polled every 50 ms)."""
        return wait_until(lambda: self.lb.status(server) == status, f"{server} {status}", timeout, every=0.05)

    def replica(self, name: str) -> Replica:
        (found,) = [r for r in self.replicas if r.name == name]
        return found

    def stop(self) -> None:
        for process in [self.prometheus, self.lb, *self.replicas]:
            if process is not None:
                with contextlib.suppress(Exception):
                    process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="the bundles every replica serves")
    parser.add_argument("--replicas", type=int, default=3, help=f"replicas to run (1..{SLOTS}; default 3)")
    parser.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    parser.add_argument("--workdir", type=Path, help="where logs go (default: a temporary directory)")
    parser.add_argument("serve_options", nargs="*", help="more `splitinfer serve` options, after --")
    args = parser.parse_args(argv)
    if not args.repository.is_dir():
        parser.error(f"{args.repository} is not a directory: compile a bundle into it (make loadtest does)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        args.repository,
        slots=args.replicas,
        prometheus=not args.no_prometheus,
        workdir=args.workdir,
        options=tuple(args.serve_options),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops the cluster even when started from a shell that ignores SIGINT in its
    # background jobs (a child inherits the ignored signal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with cluster:
        print(f"splitinfer cluster: {len(cluster.replicas)} replicas behind {cluster.lb.url}", flush=True)
        for r in cluster.replicas:
            print(f"  {r.name}: http://{r.address} (metrics http://{r.metrics_address}/metrics)", flush=True)
        print(f"  balancer status: http://127.0.0.1:{cluster.lb.metrics_port}/stats", flush=True)
        if cluster.prometheus is not None:
            print(f"  prometheus: {cluster.prometheus.url}", flush=True)
        print(f"  logs: {cluster.workdir}", flush=True)
        print(f"load it: make loadtest LOADTEST_ARGS='--url {cluster.lb.url}'; Ctrl-C stops", flush=True)
        try:
            while not stop.wait(1.0):
                for r in cluster.replicas:
                    if not r.alive():
                        print(f"replica {r.name} exited:\n{r.output()[-2000:]}", file=sys.stderr)
                        return 1
        except KeyboardInterrupt:
            pass
        print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
