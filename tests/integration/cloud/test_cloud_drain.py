"""Graceful drain: SIGTERM a real `python -m splitinfer serve` while requests are in flight."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sys
import time

import aiohttp
import pytest
import torch

from tests.support.cloud import INFER, frame, outputs, post, problem_code

pytestmark = pytest.mark.slow


class Served:
    """A `splitinfer serve` subprocess, its API and metrics URLs, and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, metrics: str, lines: list[str]):
        self.proc, self.url, self.metrics, self.lines = proc, url, metrics, lines

    async def gauge(self, name: str) -> float:
        async with aiohttp.ClientSession() as s, s.get(self.metrics + "/metrics") as r:
            text = await r.text()
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        assert match, name
        return float(match.group(1))


async def _serve(repository, *options: str) -> Served:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "splitinfer", "serve", "--repository", str(repository)),
        *("--port", "0", "--metrics-port", "0", "--compute-threads", "1", "--torch-threads", "1"),
        *("--max-batch-size", "1", "--log-level", "WARNING", *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    url = metrics = None
    while url is None or metrics is None:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, f"server exited before it listened: {lines}"
        lines.append(line)
        if m := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
            url = m.group(1)
        if m := re.search(r"metrics on (http://127\.0\.0\.1:\d+)", line):
            metrics = m.group(1)

    async def pump() -> None:
        async for raw in proc.stdout:
            lines.append(raw.decode())

    proc._pump = asyncio.get_running_loop().create_task(pump())  # type: ignore[attr-defined]
    return Served(proc, url, metrics, lines)


async def _stop(served: Served) -> None:
    if served.proc.returncode is None:
        served.proc.kill()
        await served.proc.wait()
    await served.proc._pump  # type: ignore[attr-defined]


def _heavy(bundle) -> tuple[torch.Tensor, bytes]:
    x = torch.rand(256, 3, 32, 32)  # tens to hundreds of ms of tail each
    return x, frame(bundle, 0, x, codec="f32")


async def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits(repository, cnn_bundle, cnn):
    served = await _serve(repository, "--drain-timeout-s", "30")
    try:
        x, body = _heavy(cnn_bundle)
        async with aiohttp.ClientSession() as s:
            inflight = [asyncio.create_task(post(s, served.url + INFER, io.BytesIO(body))) for _ in range(8)]
            for _ in range(2000):
                if await served.gauge("splitinfer_inflight_requests") >= 8:
                    break
                await asyncio.sleep(0.01)
            served.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # readiness turns 503 on both ports, new inference requests are refused
            for _ in range(500):
                async with s.get(served.url + "/v2/health/ready") as r:
                    if r.status == 503:
                        assert (await r.json(content_type=None))["code"] == "not_ready"
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("readiness never turned 503")
            assert await served.gauge("splitinfer_ready") == 0.0
            status, headers, answer = await post(s, served.url + INFER, frame(cnn_bundle, 5, x[:1]))
            assert (status, problem_code(status, headers, answer)) == (503, "not_ready")
            assert "Retry-After" in headers
            answers = await asyncio.gather(*inflight)
        with torch.no_grad():
            want = cnn(x)
        for status, _, answer in answers:
            assert status == 200
            assert torch.allclose(outputs(answer)[0], want, atol=1e-4)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0, served.lines
        assert time.monotonic() - signalled < 30
        assert not any("Traceback" in line for line in served.lines), served.lines
    finally:
        await _stop(served)


async def test_the_drain_timeout_bounds_the_exit(repository, cnn_bundle):
    served = await _serve(repository, "--drain-timeout-s", "1")
    try:
        _, body = _heavy(cnn_bundle)
        async with aiohttp.ClientSession() as s:
            load = [asyncio.create_task(post(s, served.url + INFER, io.BytesIO(body))) for _ in range(40)]
            for _ in range(2000):
                if await served.gauge("splitinfer_inflight_requests") >= 20:
                    break
                await asyncio.sleep(0.01)
            served.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.wait_for(served.proc.wait(), 30)
            elapsed = time.monotonic() - signalled
            results = await asyncio.gather(*load, return_exceptions=True)
        assert code == 3  # drained only partly
        assert elapsed < 1.0 + 0.75, elapsed
        statuses = [r[0] for r in results if not isinstance(r, BaseException)]
        assert 200 in statuses  # what was computing finished
        assert set(statuses) <= {200, 503}
    finally:
        await _stop(served)
