"""Run the server as a process: listen (TLS if configured), serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from splitinfer.cloud._app import create_app, create_probe_app
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._state import STATE
from splitinfer.cloud._tls import server_ssl_context
from splitinfer.errors import ConfigError

__all__ = ["serve"]

log = logging.getLogger("splitinfer.cloud")

#: Exit status when the drain timeout forced the process out with requests unfinished.
EXIT_DRAIN_TIMEOUT = 3


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
    # The runner's shutdown timeout covers only stragglers: the drain itself waits first.
    reserve = min(1.0, 0.2 * config.drain_timeout_s)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=reserve / 2)
    probe_runner: web.AppRunner | None = None
    watchdog: threading.Timer | None = None
    drained = False
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context, backlog=1024)
        await _listen(site, config.host, config.port)
        scheme = "https" if ssl_context is not None else "http"
        for host, port, *_ in runner.addresses:
            announce(f"splitinfer serve: listening on {scheme}://{_hostport(host, port)}")
        if config.metrics_port is not None:
            probe_runner = web.AppRunner(create_probe_app(app), access_log=None, handle_signals=False)
            await probe_runner.setup()
            await _listen(
                web.TCPSite(probe_runner, config.host, config.metrics_port), config.host, config.metrics_port
            )
            for host, port, *_ in probe_runner.addresses:
                announce(f"splitinfer serve: metrics on http://{_hostport(host, port)}/metrics")
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
        if watchdog is not None:
            watchdog.cancel()
    log.info("drained; exiting" if drained else "drain timeout: exiting with requests unfinished")
    return drained


async def _listen(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {_hostport(host, port)}: {exc.strerror or exc}; pick another --host/--port"
        ) from None


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
