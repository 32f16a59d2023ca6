"""A real ``splitinfer serve`` in a subprocess on 127.0.0.1: started, waited for, stopped.

The demo, the end-to-end benchmark, the load tests and the tests that need a real server
process (faults, soak, Prometheus, locust) all start it here:

>>> with ServerProcess(repository, "--compute-threads", "1") as server:
...     EdgeClient(server.url, bundle=repository / "democnn")

:meth:`ServerProcess.start` launches ``python -m splitinfer serve --repository DIR --port 0``
(an ephemeral port unless told one), reads the address the server announces on its stdout, and
waits until ``/v2/health/ready`` answers (on the metrics port when the server has one).
Leaving the ``with`` block stops it cleanly: SIGTERM (the server drains), then SIGKILL if it
does not exit in time. Its output (stdout and stderr) is kept in :attr:`~ServerProcess.lines`
and, with ``log``, written to a file. Imports no torch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from splitinfer.errors import SplitInferError

__all__ = ["ServerProcess"]

_LISTENING = re.compile(r"listening on (https?://\S+)")
_METRICS = re.compile(r"metrics on (http://\S+?)/metrics")


class ServerProcess:
    """``splitinfer serve`` in a subprocess; use it as a context manager (or start/stop).

    ``options`` are more ``splitinfer serve`` arguments. ``port`` 0 picks a free one; a fixed
    port restarts a server where its clients expect it; ``None`` passes no ``--port`` (set by
    the environment). ``command`` replaces ``python -m splitinfer serve`` (say, the container's
    entrypoint); ``repository`` ``None`` passes no ``--repository``. ``new_session`` puts the
    server in a session of its own, so that a Ctrl-C in the terminal reaches only the parent,
    which stops it. ``ready`` False waits only until it listens, not for its readiness probe.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | None,
        *options: str,
        port: int | None = 0,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        log: str | os.PathLike[str] | None = None,
        log_level: str | None = "WARNING",
        new_session: bool = False,
        ready: bool = True,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
        keep_lines: int = 10_000,
    ):
        args = list(command) if command is not None else [sys.executable, "-m", "splitinfer", "serve"]
        if repository is not None:
            args += ["--repository", str(repository)]
        if port is not None:
            args += ["--port", str(port)]
        if log_level is not None:
            args += ["--log-level", log_level]
        self.args = [*args, *options]
        self.env = dict(env) if env is not None else None
        # A metrics port is announced right after the API's: wait for both.
        self._metrics = "--metrics-port" in self.args or bool(
            (os.environ if env is None else env).get("SPLITINFER_METRICS_PORT")
        )
        self.log_path = Path(log) if log is not None else None
        self.new_session = new_session
        self.ready = ready
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        #: The server's output lines (stdout and stderr, each with its newline), the last
        #: ``keep_lines`` to twice as many of them.
        self.lines: list[str] = []
        self.keep_lines = keep_lines
        #: The API's base URL (``http://127.0.0.1:PORT``) once the server listens.
        self.url = ""
        #: The metrics port's base URL, when the server serves one.
        self.metrics_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self._log: IO[str] | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Launch the server and wait until it is ready; stops it and raises if it cannot."""
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> ServerProcess:
        """Start the process without waiting (:meth:`wait_ready` waits; load the edge meanwhile)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is running; stop it before starting it again")
        self.lines = []
        self.url = self.metrics_url = ""
        self._listening.clear()
        if self.log_path is not None:
            self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=self.new_session,
        )
        self._reader = threading.Thread(
            target=self._pump, args=(self.proc,), daemon=True, name="splitinfer-serve"
        )
        self._reader.start()
        return self

    def wait_ready(self) -> str:
        """The server's URL once it listens (and is ready); stops it and raises otherwise."""
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not self._listening.wait(0.05):
                self._check_alive(deadline, "listen")
            while self._metrics and not self.metrics_url:
                self._check_alive(deadline, "announce its metrics port")
                time.sleep(0.05)
            if self.ready:
                while not self._probe_ready():
                    self._check_alive(deadline, "become ready")
                    time.sleep(0.1)
        except BaseException:  # Ctrl-C while it starts, too
            self.stop()
            raise
        return self.url

    def stop(self) -> int | None:
        """SIGTERM (the server drains), SIGKILL after ``stop_timeout_s``; the exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close()
        return None if proc is None else proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (a crash, as a fault test wants it)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        self._close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it is ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def tracebacks(self) -> list[str]:
        return [line for line in self.lines if "Traceback" in line]

    # -- inside ----------------------------------------------------------------------------

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if len(self.lines) > 2 * self.keep_lines:
                del self.lines[: -self.keep_lines]
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            if not self.url and (m := _LISTENING.search(line)):
                self.url = m.group(1)
                self._listening.set()
            elif not self.metrics_url and (m := _METRICS.search(line)):
                self.metrics_url = m.group(1)

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None or time.monotonic() > deadline:
            time.sleep(0.2)  # the last lines of a server that exited
            why = (
                "exited"
                if self.proc.poll() is not None
                else f"did not {what} in {self.startup_timeout_s:g} s"
            )
            raise SplitInferError(f"splitinfer serve {why}; its output:\n{self.output}")

    def _probe_ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 (or refuses without a token: it is up)."""
        base = self.metrics_url or self.url
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code in (401, 403)
        except (OSError, ValueError):
            return False

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
