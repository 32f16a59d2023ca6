"""Run the server as a process: listen (TLS if configured), serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry

from splitinfer.cloud._app import create_app, create_probe_app, reload
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._problem import Problem, problem_response
from splitinfer.cloud._state import CONFIG, METRICS, STATE
from splitinfer.cloud._tls import server_ssl_context
from splitinfer.errors import ConfigError

__all__ = ["ServeRunner", "serve"]

log = logging.getLogger("splitinfer.cloud")

#: Exit status when the drain timeout forced the process out with requests unfinished.
EXIT_DRAIN_TIMEOUT = 3


#: Problem codes for the statuses aiohttp answers by itself, outside the middlewares (other
#: 4xx, such as 417 for an unknown ``Expect``, become 400 ``bad_request``).
_AIOHTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    500: "internal",
}


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself (a broken request line,
    malformed headers) with problem+json, counted, and logged in one debug line instead of an
    error with a traceback (a hostile client must not flood the log)."""

    metrics: ServerMetrics | None = None

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client hung up (e.g. before a 100 Continue)
            raise exc  # aiohttp drops the connection quietly
        if status == 500:
            return super().handle_error(request, status, exc, message)  # logs the trace
        if request.writer.output_size > 0:  # an answer has begun: nothing clean is left to send
            raise ConnectionError("the answer was already being sent")
        code = _AIOHTTP_CODES.get(status, "bad_request")
        detail = f"the HTTP request is malformed: {str(message or exc or 'unparsable')[:200]}"
        self.logger.debug("refused a malformed HTTP request from %s: %s", request.remote, detail)
        if self.metrics is not None and code != "internal":
            try:
                self.metrics.rejections.labels(reason=code).inc()
            except Exception:  # metrics never fail an answer
                self.logger.exception("counting a rejection failed")
        response = problem_response(Problem(code, detail))
        response.force_close()
        return response


class _ProblemServer(web.Server):
    metrics: ServerMetrics | None = None

    def __call__(self) -> RequestHandler:
        handler = _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.metrics = self.metrics
        return handler


class ServeRunner(web.AppRunner):
    """The AppRunner ``serve`` uses: aiohttp's own refusals (a broken request line, malformed
    headers) become problem+json 400 answers counted in ``splitinfer_rejections_total``, and a
    client that sends no complete request head within ``read_timeout_s`` (the keep-alive timer)
    is disconnected."""

    def __init__(self, app: web.Application, **kwargs: Any):
        kwargs.setdefault("keepalive_timeout", app[CONFIG].read_timeout_s)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        # aiohttp has no hook for its connection handler class: rebuild the Server it made with
        # the same arguments, whose connections use the handler above.
        metrics = self.app.get(METRICS)
        server = _ProblemServer(
            _problem_errors(base.request_handler, metrics),
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        server.metrics = metrics
        return server


def _problem_errors(
    handle: Callable[[BaseRequest], Awaitable[web.StreamResponse]], metrics: ServerMetrics | None
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The application's handler, with the HTTP errors aiohttp raises before the middlewares run
    (an ``Expect`` it does not know, on a route without its own expect handler) as problem+json."""

    async def handler(request: BaseRequest) -> web.StreamResponse:
        try:
            return await handle(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _AIOHTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
            if metrics is not None and code == "bad_request":
                metrics.rejections.labels(reason=code).inc()
            response = problem_response(Problem(code, exc.text or exc.reason))
            response.force_close()
            return response

    return handler


def serve(
    config: ServerConfig,
    *,
    registry: CollectorRegistry | None = None,
    announce: Callable[[str], None] | None = None,
) -> bool:
    """Serve until SIGTERM or SIGINT, then drain; True if every admitted request finished.

    Draining: readiness turns 503, new inference requests get 503 with Retry-After, admitted
    ones finish; the listening sockets close once none is left, or when ``drain_timeout_s``
    runs out. Whatever still runs then, the process exits within the drain timeout (a second
    signal exits at once). ``announce`` receives one line per listening address
    (default: print to stdout).
    """
    return asyncio.run(_run(config, registry, announce or (lambda line: print(line, flush=True))))


async def _run(
    config: ServerConfig, registry: CollectorRegistry | None, announce: Callable[[str], None]
) -> bool:
    ssl_context = server_ssl_context(config)
    app = create_app(config, registry=registry)
    sockets, probe_sockets = _bind_all(config)
    # The runner's shutdown timeout covers only stragglers: the drain itself waits first.
    reserve = min(1.0, 0.2 * config.drain_timeout_s)
    runner = ServeRunner(app, access_log=None, handle_signals=False, shutdown_timeout=reserve / 2)
    probe_runner: web.AppRunner | None = None
    watchdog: threading.Timer | None = None
    drained = False
    try:
        await runner.setup()  # loads the models
    except BaseException:
        _close([*sockets, *probe_sockets])
        raise
    try:
        scheme = "https" if ssl_context is not None else "http"
        await _start(runner, sockets, ssl_context, announce, f"listening on {scheme}://{{}}")
        served = ", ".join(f"{s.name} {s.version}" for s in app[STATE].repository)
        log.info("serving %d model(s): %s", len(app[STATE].repository.models), served)  # bound: true now
        if probe_sockets:
            probe_runner = ServeRunner(create_probe_app(app), access_log=None, handle_signals=False)
            await probe_runner.setup()
            await _start(probe_runner, probe_sockets, None, announce, "metrics on http://{}/metrics")
        _reload_on_sighup(app)
        signum = await _wait_for_signal()
        log.info(
            "received %s: draining for at most %.1f s", signal.Signals(signum).name, config.drain_timeout_s
        )
        watchdog = _start_watchdog(config.drain_timeout_s)
        app[STATE].drain.begin()
        drained = await app[STATE].drain.wait_idle(config.drain_timeout_s - reserve)
    finally:
        if probe_runner is not None:
            await probe_runner.cleanup()
        await runner.cleanup()
        _close([*sockets, *probe_sockets])
        if watchdog is not None:
            watchdog.cancel()
    log.info("drained; exiting" if drained else "drain timeout: exiting with requests unfinished")
    return drained


def _bind_all(config: ServerConfig) -> tuple[list[socket.socket], list[socket.socket]]:
    """The server's sockets and the metrics port's, bound before the models load, so that a port
    in use is reported at once; they listen (accept connections) once the sites start."""
    sockets = _bind(config.host, config.port)
    try:
        probe_sockets = [] if config.metrics_port is None else _bind(config.host, config.metrics_port)
    except ConfigError:
        _close(sockets)
        raise
    return sockets, probe_sockets


async def _start(
    runner: web.AppRunner,
    sockets: list[socket.socket],
    ssl_context: ssl.SSLContext | None,
    announce: Callable[[str], None],
    line: str,
) -> None:
    """Serve ``runner``'s application on ``sockets`` (they listen from now on); announce each
    address with ``line`` (its ``{}`` is the address)."""
    for sock in sockets:
        await web.SockSite(runner, sock, ssl_context=ssl_context, backlog=1024).start()
    for host, port, *_ in runner.addresses:
        announce("splitinfer serve: " + line.format(_hostport(host, port)))


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` at ``port``, not yet listening (as aiohttp's
    own sites would bind them); ConfigError naming the address when one is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {_hostport(host, port)}: {exc}; pick another --host") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            if port == 0 and sockets:  # one ephemeral port for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as exc:
        _close(sockets)
        raise ConfigError(
            f"cannot listen on {_hostport(host, port)}: {exc.strerror or exc}; pick another --host/--port"
        ) from None
    return sockets


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _reload_on_sighup(app: web.Application) -> None:
    """SIGHUP hot-reloads the repository (new versions load beside the served ones, then flip)."""
    if not hasattr(signal, "SIGHUP"):  # not on Windows
        return
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def run() -> None:
        try:
            names = await reload(app[STATE])
            log.info("SIGHUP: reloaded %s", ", ".join(names) or "nothing")
        except Exception:
            log.exception("SIGHUP: reloading the repository failed; serving what was loaded")

    def on_hup() -> None:
        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


async def _wait_for_signal() -> int:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if received.done():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        received.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return await received


def _start_watchdog(timeout: float) -> threading.Timer:
    """Exit the process after ``timeout`` seconds, whatever a compute thread is doing."""

    def expire() -> None:
        log.error("drain timeout of %.1f s reached: exiting with requests unfinished", timeout)
        logging.shutdown()
        os._exit(EXIT_DRAIN_TIMEOUT)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    return timer


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
