"""Limits and hostile input: every bad request gets a 4xx problem+json and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import statistics
import time

import aiohttp
import msgpack
import pytest
import torch

from splitinfer import protocol
from splitinfer.cloud._state import STATE
from splitinfer.compression import get_codec
from tests.support.cloud import INFER, frame, outputs, post, problem_code, running, until


async def _raw(url: str, request: bytes, read_timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; return the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), read_timeout)
        return status, headers, body
    finally:
        writer.close()
        # the server may have reset the connection already
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


def _http(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n" + body


async def _still_serves(url: str, bundle, cnn) -> None:
    x = torch.rand(1, 3, 32, 32)
    async with aiohttp.ClientSession() as s:
        status, _, body = await post(s, url + INFER, frame(bundle, 5, x))
    assert status == 200
    with torch.no_grad():
        assert torch.allclose(outputs(body)[0], cnn(x), atol=1e-5)


def _header(bundle, **fields) -> dict:
    base = {
        "v": 1,
        "model": "democnn",
        "graph": bundle.graph_hash,
        "cut": 3,
        "codec": "f32",
        "tensors": [["float32", [1, 16, 16, 16]]],
        "id": "h",
        "deadline_s": None,
        "payload_nbytes": 0,
    }
    return {**base, **fields}


def _hostile(bundle) -> list[tuple[str, bytes, int, str]]:
    good = frame(bundle, 3, torch.rand(1, 3, 32, 32), codec="f32+zstd1")
    huge = _header(bundle, tensors=[["float32", [1 << 20, 16, 16, 16]]])
    bomb = get_codec("f32+zstd1").encode([torch.zeros(1000, 16, 16, 16)])  # 15.6 MiB of zeros in a few KiB
    narrow = get_codec("f32+zstd1").encode([torch.zeros(1, 16, 16, 8)])
    return [
        ("empty body", b"", 400, "malformed_frame"),
        ("truncated frame", good[: len(good) // 2], 400, "malformed_frame"),
        ("padded frame", good + b"\0" * 9, 400, "malformed_frame"),
        ("msgpack that is not a map", msgpack.packb([1, 2, 3]), 400, "malformed_frame"),
        ("deeply nested msgpack", b"\x91" * 100_000, 400, "malformed_frame"),
        ("header of wrong types", msgpack.packb(_header(bundle, cut="3")), 400, "malformed_frame"),
        ("negative payload size", msgpack.packb(_header(bundle, payload_nbytes=-1)), 400, "malformed_frame"),
        (
            "null dims",
            msgpack.packb(_header(bundle, tensors=[["float32", [None, 16, 16, 16]]])),
            400,
            "malformed_frame",
        ),
        (
            "unknown dtype",
            msgpack.packb(_header(bundle, tensors=[["complex64", [1, 16, 16, 16]]])),
            400,
            "malformed_frame",
        ),
        ("frontier that would decode too large", msgpack.packb(huge), 413, "too_large"),
        (
            "payload that does not decode",
            msgpack.packb(_header(bundle, payload_nbytes=5)) + b"\x01" * 5,
            400,
            "malformed_frame",
        ),
        ("decompression bomb", _with_payload(bundle, bomb), 400, "malformed_frame"),
        ("payload of other shapes than declared", _with_payload(bundle, narrow), 400, "malformed_frame"),
    ]


def _with_payload(bundle, payload: bytes) -> bytes:
    return msgpack.packb(_header(bundle, codec="f32+zstd1", payload_nbytes=len(payload))) + payload


async def test_hostile_bodies_get_problem_json_and_the_server_keeps_serving(repository, cnn_bundle, cnn):
    async with running(repository, max_body_bytes=1 << 20, max_decoded_bytes=1 << 22) as server:
        async with aiohttp.ClientSession() as s:
            for name, body, status, code in _hostile(cnn_bundle):
                got, headers, answer = await post(s, server.url + INFER, body)
                assert (got, problem_code(got, headers, answer)) == (status, code), name
                assert "total" in protocol.parse_server_timing(headers["Server-Timing"])
        await _still_serves(server.url, cnn_bundle, cnn)
        assert server.app[STATE].scheduler.waiting == 0


async def test_mutated_frames_never_get_a_5xx(repository, cnn_bundle, cnn):
    rng = random.Random(0)
    good = frame(cnn_bundle, 3, torch.rand(1, 3, 32, 32), codec="f32+zstd1")
    async with running(repository, max_body_bytes=1 << 20) as server, aiohttp.ClientSession() as s:
        for _ in range(150):
            body = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                op = rng.random()
                i = rng.randrange(len(body))
                if op < 0.5:
                    body[i] = rng.randrange(256)
                elif op < 0.75:
                    del body[i : i + rng.randint(1, 64)]
                else:
                    body[i:i] = rng.randbytes(rng.randint(1, 64))
            status, headers, answer = await post(s, server.url + INFER, bytes(body))
            assert status == 200 or 400 <= status < 500, (status, answer[:200])
            if status != 200:
                problem_code(status, headers, answer)
        await _still_serves(server.url, cnn_bundle, cnn)


async def test_body_over_the_limit_is_413_before_it_is_read(repository, cnn_bundle, cnn):
    async with running(repository, max_body_bytes=1 << 20) as server:
        request = _http(f"POST {INFER} HTTP/1.1\nHost: x\nContent-Length: {50 << 20}\n")
        status, _headers, body = await _raw(server.url, request)  # sends no body at all
        assert (status, json.loads(body)["code"]) == (413, "too_large")
        await _still_serves(server.url, cnn_bundle, cnn)


async def test_expect_100_continue_is_refused_before_the_body_is_sent(repository, cnn_bundle, cnn):
    async with running(repository, max_body_bytes=1 << 20) as server:
        head = f"POST {INFER} HTTP/1.1\nHost: x\nExpect: 100-continue\nContent-Length: {2 << 20}\n"
        status, _, body = await _raw(server.url, _http(head))
        assert (status, json.loads(body)["code"]) == (413, "too_large")
        head = "POST /v1/models/nope/infer HTTP/1.1\nHost: x\nExpect: 100-continue\nContent-Length: 10\n"
        status, _, _ = await _raw(server.url, _http(head))
        assert status == 404
        # a body within the limit is asked for with 100 Continue and answered
        good = frame(cnn_bundle, 5, torch.rand(1, 3, 32, 32))
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(s, server.url + INFER, good, expect100=True)
        assert status == 200


async def test_streamed_bodies_are_accepted_and_capped(repository, cnn_bundle, cnn):
    async with running(repository, max_body_bytes=1 << 20) as server, aiohttp.ClientSession() as s:
        x = torch.rand(1, 3, 32, 32)
        good = frame(cnn_bundle, 1, x, codec="f32")  # 64 KiB of frontier

        async def pieces(data, size):
            for i in range(0, len(data), size):
                yield data[i : i + size]
                await asyncio.sleep(0)

        status, _, body = await post(s, server.url + INFER, pieces(good, 4096))
        assert status == 200
        with torch.no_grad():
            assert torch.allclose(outputs(body)[0], cnn(x), atol=1e-5)
        status, headers, body = await post(s, server.url + INFER, pieces(b"\0" * (3 << 20), 65536))
        assert (status, problem_code(status, headers, body)) == (413, "too_large")


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        (
            "broken chunked encoding",
            _http(f"POST {INFER} HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n", b"zz\r\nab\r\n"),
        ),
        (
            "wrong content type",
            _http(f"POST {INFER} HTTP/1.1\nHost: x\nContent-Type: text/plain\nContent-Length: 2\n", b"hi"),
        ),
        ("get on the infer route", _http(f"GET {INFER} HTTP/1.1\nHost: x\n")),
    ],
)
async def test_broken_http_is_4xx_and_the_server_keeps_serving(
    repository, cnn_bundle, cnn, name, request_bytes
):
    async with running(repository) as server:
        status, _headers, _body = await _raw(server.url, request_bytes)
        assert 400 <= status < 500, name
        await _still_serves(server.url, cnn_bundle, cnn)


async def test_a_client_that_hangs_up_mid_body_leaves_the_server_clean(repository, cnn_bundle, cnn):
    async with running(repository) as server:
        host, port = server.url.removeprefix("http://").split(":")
        for _ in range(3):
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(_http(f"POST {INFER} HTTP/1.1\nHost: x\nContent-Length: 100000\n", b"\x8a" * 1000))
            await writer.drain()
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        state = server.app[STATE]
        await until(lambda: state.drain.inflight == 0)
        assert state.scheduler.waiting == 0
        await _still_serves(server.url, cnn_bundle, cnn)


async def test_event_loop_stays_responsive_while_compute_is_saturated(repository, cnn_bundle):
    """Heavy tails run on the compute pool: liveness answers quickly all along."""
    async with running(repository, compute_threads=1, max_batch_size=1, torch_threads=1) as server:
        body = frame(cnn_bundle, 0, torch.rand(256, 3, 32, 32), codec="f32")
        lags: list[float] = []
        async with aiohttp.ClientSession() as s:
            load = [asyncio.create_task(post(s, server.url + INFER, io.BytesIO(body))) for _ in range(8)]
            state = server.app[STATE]
            await until(lambda: state.scheduler.computing > 0)
            while not all(t.done() for t in load):
                t0 = time.perf_counter()
                async with s.get(server.url + "/v2/health/live") as r:
                    assert r.status == 200
                lags.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
            assert all(t.result()[0] == 200 for t in load)
        computes = server.registry.get_sample_value(
            "splitinfer_request_duration_seconds_sum", {"model": "democnn", "stage": "compute"}
        )
        assert len(lags) >= 5, "the load finished before it could be probed"
        # 8 tails of 256 rows take a second or more; liveness waits for none of them
        assert statistics.median(lags) < 0.05, lags
        assert max(lags) < min(0.5, computes / 2), (lags, computes)


async def test_unknown_model_names_do_not_grow_metric_labels(repository):
    async with running(repository) as server, aiohttp.ClientSession() as s:
        for i in range(5):
            await post(s, server.url + f"/v1/models/m{i}/infer", b"x")
        value = server.registry.get_sample_value(
            "splitinfer_requests_total", {"model": "_unknown", "code": "unknown_model"}
        )
        assert value == 5.0


async def test_an_endless_streamed_body_is_refused_and_cut_off(repository, cnn_bundle, cnn):
    async with running(repository, max_body_bytes=1 << 20) as server:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_http(f"POST {INFER} HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"))
        chunk = b"10000\r\n" + b"\0" * 65536 + b"\r\n"

        async def flood() -> float:
            t0 = time.perf_counter()
            with contextlib.suppress(ConnectionError):
                while time.perf_counter() - t0 < 15:
                    writer.write(chunk)
                    await writer.drain()
            return time.perf_counter() - t0

        sending = asyncio.create_task(flood())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.split(b"\r\n")[0].split()[1] == b"413"
        flooded = await asyncio.wait_for(sending, 20)
        assert flooded < 8  # the server hung up on it, it did not read it all
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        await _still_serves(server.url, cnn_bundle, cnn)
