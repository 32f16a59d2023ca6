"""Faults on purpose: every request is answered, correctly or with a clear error, and counted.

- the server killed (SIGKILL) and restarted under load from edge clients;
- the link cut mid-request by the link emulator;
- slow clients trickling a body (408, their queue slot freed) or headers (disconnected);
- oversized bodies and decompression bombs (4xx, no memory spent on them);
- a bundle updated on the server while clients hold the old graph (409; the client finishes
  on its device with its own graph, never with another model's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import aiohttp
import msgpack
import pytest
import torch

import splitinfer as si
from splitinfer import protocol
from splitinfer.cloud import ServerConfig
from splitinfer.cloud._state import STATE
from splitinfer.compression import get_codec
from splitinfer.edge import CircuitBreaker, EdgeClient
from splitinfer.lab._demo import demo_model
from splitinfer.netem import BandwidthTrace, LinkEmulator
from tests.conftest import start_server
from tests.support.cloud import INFER, frame, outputs, post, problem_code, until
from tests.support.faults import ServeProcess, free_port, report, scale

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: Requests answered in each phase of the kill-and-restart test (before, down, restarted).
N = int(scale(10, 100))


def _inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def _same(out: torch.Tensor, want: torch.Tensor) -> bool:
    return out.shape == want.shape and torch.allclose(out, want, atol=1e-5)


def _client(url: str, bundle: si.Bundle, cut: int, codec: str = "f32+zstd1", **kw: object) -> EdgeClient:
    # No hedged requests: these tests count where each request was answered and why.
    kw.setdefault("hedge", False)
    return EdgeClient(url, bundle=bundle, policy="static", cut=cut, codec=codec, deadline_s=30.0, **kw)  # type: ignore[arg-type]


async def _metric(url: str, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- the server killed and restarted under load ---------------------------------------------


async def test_server_killed_and_restarted_under_load(repository, cnn_bundle, cnn):
    xs = _inputs(6)
    with torch.no_grad():
        wants = [cnn(x) for x in xs]
    port = free_port()
    server = ServeProcess(repository, "--compute-threads", "1", "--torch-threads", "1", port=port).start()
    counts: Counter[str] = Counter()
    phase = ["before"]
    wrong: list[str] = []
    clients = [
        _client(server.url, cnn_bundle, 3, breaker=CircuitBreaker(failures_to_open=2, reset_after_s=0.2))
        for _ in range(3)
    ]
    stop = asyncio.Event()

    async def user(client: EdgeClient) -> None:
        i = 0
        while not stop.is_set():
            x, want = xs[i % len(xs)], wants[i % len(xs)]
            i += 1
            started_in = phase[0]  # an answer read just after the kill was sent before it
            out = await client.ainfer(x)
            trace = client.last_trace
            where = "cloud" if trace.fallback is None else f"device ({trace.fallback})"
            counts[f"{started_in}: {where}"] += 1
            if not _same(out, want):
                wrong.append(f"{started_in} {where}")
            await asyncio.sleep(0.005)

    def cloud(p: str) -> int:
        return counts[f"{p}: cloud"]

    users = [asyncio.ensure_future(user(c)) for c in clients]
    try:
        await until(lambda: cloud("before") >= N, timeout=120)
        server.kill()  # SIGKILL: no drain, connections die mid-request
        phase[0] = "down"
        await until(lambda: sum(v for k, v in counts.items() if k.startswith("down")) >= N, timeout=120)
        server.start()  # same port
        phase[0] = "restarted"
        await until(lambda: cloud("restarted") >= N, timeout=180)
    finally:
        stop.set()
        results = await asyncio.gather(*users, return_exceptions=True)
        for client in clients:
            await client.aclose()
        server.kill()
    assert [r for r in results if r is not None] == []  # every request was answered
    assert wrong == []
    assert cloud("down") == 0
    assert sum(v for k, v in counts.items() if k.startswith("down: device")) >= N
    report("faults", {"kill_restart": {"answers": dict(counts), "wrong": len(wrong), "unanswered": 0}})


# -- the link cut mid-request ----------------------------------------------------------------


async def test_link_cut_mid_request(repository, cnn_bundle, cnn):
    """Cut every other request while the server is reading it: each is still answered right."""
    runner, server = await start_server(ServerConfig(repository=repository))
    state = server.app[STATE]
    port = int(server.url.rsplit(":", 1)[1])
    counts: Counter[str] = Counter()
    n = int(scale(10, 60))
    try:
        # 2 Mbit/s up: a 64 KiB frontier takes ~0.25 s to cross, long enough to be cut
        async with LinkEmulator(("127.0.0.1", port), uplink=BandwidthTrace.constant(2e6)) as link:
            url = f"http://127.0.0.1:{link.port}"
            breaker = CircuitBreaker(failures_to_open=10_000)
            async with _client(url, cnn_bundle, 1, "f32", breaker=breaker) as client:
                for i, x in enumerate(_inputs(n, seed=100)):
                    task = asyncio.ensure_future(client.ainfer(x))
                    cut = i % 2 == 0
                    if cut:
                        await until(lambda t=task: state.drain.inflight > 0 or t.done())
                        counts["cut"] += link.disconnect_all() > 0
                    out = await task
                    trace = client.last_trace
                    kind = (
                        "retried" if trace.retried else "cloud" if trace.fallback is None else trace.fallback
                    )
                    counts[f"{'cut' if cut else 'intact'}: {kind}"] += 1
                    with torch.no_grad():
                        assert _same(out, cnn(x)), (i, kind)
        await until(lambda: state.drain.inflight == 0 and state.scheduler.waiting == 0)
    finally:
        await runner.cleanup()
    assert counts["cut"] == n // 2  # each of them was cut while the server read it
    assert counts["intact: cloud"] == n - n // 2
    report("faults", {"link_cut": {"answers": dict(counts), "requests": n, "wrong": 0}})


# -- slow clients, oversized bodies, bombs: one real server process ---------------------------


@pytest.fixture(scope="module")
def target(repository: Path):
    options = ("--read-timeout-s", "3", "--max-queue-length", "4", "--max-body-bytes", str(MiB))
    options += ("--max-decoded-bytes", str(16 * MiB))
    with ServeProcess(repository, *options, "--compute-threads", "1", "--torch-threads", "1") as server:
        yield server


async def _trickle(url: str, sent: bytes, trickled: bytes) -> tuple[bytes, float]:
    """Send ``sent`` at once, then ``trickled`` one byte every 50 ms until the server answers or
    hangs up; what came back, and how long the connection was held."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.perf_counter()
    answer = b""
    try:
        writer.write(sent)
        reading = asyncio.ensure_future(reader.read())
        for byte in trickled:
            if reading.done():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.wait([reading], timeout=0.05)
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reading, 60)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return answer, time.perf_counter() - t0


async def test_slow_clients_are_cut_off_and_free_their_queue_slots(target, cnn_bundle, cnn):
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode()
    slow = [asyncio.ensure_future(_trickle(target.url, head, b"\0" * 5000)) for _ in range(4)]
    x = torch.rand(1, 3, 32, 32)
    async with aiohttp.ClientSession() as s:
        for _ in range(2000):  # the four slow bodies hold the four queue slots...
            if await _metric(target.url, "splitinfer_queue_depth") == 4:
                break
            await asyncio.sleep(0.01)
        status, headers, answer = await post(s, target.url + INFER, frame(cnn_bundle, 3, x))
        refused = (status, problem_code(status, headers, answer))
        # ...until the read timeout cuts them off with 408
        answers = await asyncio.gather(*slow)
        for answer, _seconds in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            doc = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert doc["code"] == "request_timeout"
            assert b"connection: close" in answer.lower()
        # a client trickling its headers is disconnected too (the keep-alive timer)
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode() + b"X-Slow: y\r\n" * 200
        head_answer, _ = await _trickle(target.url, b"", head)
        assert head_answer == b""
        status, _, answer = await post(s, target.url + INFER, frame(cnn_bundle, 3, x))
        assert status == 200
        with torch.no_grad():
            assert _same(outputs(answer)[0], cnn(x))
    assert refused == (503, "overloaded")
    timeouts = await _metric(target.url, "splitinfer_rejections_total", '{reason="request_timeout"}')
    assert timeouts >= 4
    assert await _metric(target.url, "splitinfer_queue_depth") == 0
    report(
        "faults",
        {
            "slow_clients": {
                "slow_bodies": len(answers),
                "answered_408": sum(a.startswith(b"HTTP/1.1 408") for a, _ in answers),
                "slow_headers_disconnected": int(head_answer == b""),
                "read_timeout_s": 3,
                "seconds_held_max": round(max(s for _, s in answers), 2),
            }
        },
    )


def _bodies(bundle: si.Bundle) -> dict[str, tuple[bytes, int, str]]:
    def header(**fields: object) -> dict[str, object]:
        return {
            "v": 1,
            "model": "democnn",
            "graph": bundle.graph_hash,
            "cut": 3,
            "codec": "f32+zstd1",
            "tensors": [["float32", [1, 16, 16, 16]]],
            "id": "bomb",
            "deadline_s": None,
            "payload_nbytes": 0,
            **fields,
        }

    bomb = get_codec("f32+zstd1").encode([torch.zeros(4096, 16, 16, 16)])  # 64 MiB in a few KiB
    small_head = msgpack.packb(header(payload_nbytes=len(bomb)))
    big_head = msgpack.packb(header(payload_nbytes=len(bomb), tensors=[["float32", [4096, 16, 16, 16]]]))
    return {
        "zstd bomb declaring a small frontier": (small_head + bomb, 400, "malformed_frame"),
        "frame declaring a 64 MiB frontier (limit 16 MiB)": (big_head + bomb, 413, "too_large"),
    }


async def test_oversized_bodies_and_bombs_are_refused_without_spending_memory(target, cnn_bundle, cnn):
    before = target.rss(), target.peak_rss()
    counts: Counter[str] = Counter()
    rounds = int(scale(5, 50))
    host, port = target.url.removeprefix("http://").split(":")
    async with aiohttp.ClientSession() as s:
        bodies = _bodies(cnn_bundle)
        for _ in range(rounds):
            for name, (body, want_status, want_code) in bodies.items():
                status, headers, answer = await post(s, target.url + INFER, body)
                assert (status, problem_code(status, headers, answer)) == (want_status, want_code), name
                counts[f"{name}: {status} {want_code}"] += 1
            # a declared 50 MiB body: refused from its Content-Length, never read
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {50 * MiB}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
            assert head.startswith(b"HTTP/1.1 413"), head
            counts["declared 50 MiB body: 413 too_large"] += 1

            async def endless():
                for _ in range(48):  # 3 MiB streamed against a 1 MiB limit
                    yield b"\0" * 65536

            with contextlib.suppress(aiohttp.ClientError):  # the server may hang up while we send
                status, headers, answer = await post(s, target.url + INFER, endless())
                assert (status, problem_code(status, headers, answer)) == (413, "too_large")
            counts["streamed 3 MiB body: 413 too_large (or cut off)"] += 1
        status, _, answer = await post(
            s, target.url + INFER, frame(cnn_bundle, 3, x := torch.rand(1, 3, 32, 32))
        )
        assert status == 200
        with torch.no_grad():
            assert _same(outputs(answer)[0], cnn(x))
    after = target.rss(), target.peak_rss()
    # nothing was inflated: the peak did not climb by the 64 MiB a bomb would take
    assert after[1] - max(before) < 32 * MiB, (before, after)
    assert target.tracebacks() == []
    report(
        "faults",
        {
            "hostile_bodies": {
                "answers": dict(counts),
                "server_rss_before_bytes": before[0],
                "server_rss_after_bytes": after[0],
                "server_peak_rss_before_bytes": before[1],
                "server_peak_rss_after_bytes": after[1],
            }
        },
    )


# -- a bundle updated on the server ----------------------------------------------------------


async def test_a_bundle_updated_on_the_server_never_gives_a_wrong_answer(
    repository, tmp_path, cnn_bundle, cnn
):
    new_model = demo_model(seed=1)  # retrained: same name and shapes, other weights
    new_bundle = si.compile(new_model, (torch.rand(1, 3, 32, 32),), name="democnn")
    assert new_bundle.graph_hash != cnn_bundle.graph_hash
    new_bundle.save(tmp_path / "repo" / "democnn")
    xs = _inputs(int(scale(6, 30)), seed=200)
    with torch.no_grad():
        old_wants, new_wants = [cnn(x) for x in xs], [new_model(x) for x in xs]
    assert not any(_same(a, b) for a, b in zip(old_wants, new_wants))
    counts: Counter[str] = Counter()
    port = free_port()
    runner, server = await start_server(ServerConfig(repository=repository), port=port)
    try:
        async with _client(server.url, cnn_bundle, 3) as old_client:
            out = await old_client.ainfer(xs[0])
            assert old_client.last_trace.fallback is None and _same(out, old_wants[0])
            await runner.cleanup()  # the operator rolls out the new bundle on the same address
            runner, server = await start_server(ServerConfig(repository=tmp_path / "repo"), port=port)
            for x, old, new in zip(xs, old_wants, new_wants):
                out = await old_client.ainfer(x)
                assert old_client.last_trace.fallback == "graph_mismatch"
                assert _same(out, old) and not _same(out, new)
                counts["old client: device (graph_mismatch)"] += 1
        async with aiohttp.ClientSession() as s:
            status, headers, answer = await post(s, server.url + INFER, frame(cnn_bundle, 3, xs[0]))
            assert (status, problem_code(status, headers, answer)) == (409, "graph_mismatch")
            assert cnn_bundle.graph_hash in json.loads(answer)["detail"]
        async with _client(server.url, new_bundle, 3) as new_client:  # the client reloads
            for x, new in zip(xs, new_wants):
                out = await new_client.ainfer(x)
                assert new_client.last_trace.fallback is None and _same(out, new)
                counts["reloaded client: cloud"] += 1
        mismatches = server.registry.get_sample_value(
            "splitinfer_requests_total", {"model": "democnn", "code": "graph_mismatch"}
        )
        assert mismatches == len(xs) + 1
    finally:
        await runner.cleanup()
    report("faults", {"bundle_update": {"answers": dict(counts), "wrong": 0, "409s_counted": mismatches}})


def test_a_408_maps_to_a_timeout_on_the_edge():
    error = protocol.error_from_problem(408, protocol.problem_body("request_timeout", "slow")[1])
    assert isinstance(error, TimeoutError) and error.code == "request_timeout"
