"""The promises of docs/security.md that no other test holds (the doc names every test)."""

from __future__ import annotations

import asyncio
import gzip
import json
import pickle
import re
from pathlib import Path

import aiohttp
import msgpack
import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from splitinfer import protocol
from splitinfer.cloud import ServerConfig, create_app
from splitinfer.cloud._auth import TokenSet
from splitinfer.cloud._serve import ServeRunner
from tests.support.cloud import INFER, frame, post, problem_code, running

TOKEN = "edge-fleet-token-0123456789abcdef"
WRONG = "stolen-or-guessed-token-fedcba9876"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_tokens_are_kept_only_as_digests(token_file):
    tokens = TokenSet(token_file)
    assert tokens.verify(TOKEN) and not tokens.verify(WRONG)
    held = repr(vars(tokens)).encode()
    assert TOKEN.encode() not in held and TOKEN.encode().hex().encode() not in held


async def test_metrics_and_answers_never_carry_secrets_or_client_data(repository, token_file, cnn_bundle):
    """Tokens, request ids, client addresses and names the server does not host stay out of
    /metrics and out of error answers; labels stay few."""
    x = torch.rand(1, 3, 32, 32)
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with running(repository, token_file=token_file) as server, aiohttp.ClientSession() as s:
        secret_id = "request-id-SECRET-4242"
        await post(s, server.url + INFER, frame(cnn_bundle, 3, x, request_id=secret_id), headers=good)
        status, _, answer = await post(
            s, server.url + INFER, frame(cnn_bundle, 3, x), headers={"Authorization": f"Bearer {WRONG}"}
        )
        assert status == 403 and WRONG.encode() not in answer
        for i in range(20):
            await post(s, server.url + f"/v1/models/probe-SECRET-{i}/infer", b"x", headers=good)
        async with s.get(server.url + "/metrics", headers=good) as r:
            text = await r.text()
    for secret in (TOKEN, WRONG, secret_id, "probe-SECRET", "127.0.0.1"):
        assert secret not in text, secret
    models = set(re.findall(r'model="([^"]*)"', text))
    assert models <= {"democnn", "_unknown"}


async def test_expect_continue_asks_for_the_token_before_the_body(repository, token_file):
    async with running(repository, token_file=token_file) as server:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n"
        writer.write(head.encode() + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # no body was sent
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    assert head.startswith(b"HTTP/1.1 401")


async def test_pickles_and_msgpack_extensions_are_refused(repository, cnn_bundle):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    # a pickle's first bytes read as an empty msgpack map: refused as a frame of no version
    ext = msgpack.packb({"v": 1, "model": "democnn", "graph": msgpack.ExtType(1, b"x" * 8)})
    bodies = {
        "a pickle": pickle.dumps(Payload()),
        "a msgpack ext type": ext,
        "msgpack bin in the header": msgpack.packb({"v": 1, "model": b"democnn"}, use_bin_type=True),
    }
    async with running(repository) as server, aiohttp.ClientSession() as s:
        for name, body in bodies.items():
            status, headers, answer = await post(s, server.url + INFER, body)
            code = problem_code(status, headers, answer)
            assert status == 400 and code in ("malformed_frame", "unsupported_version"), name


async def test_odd_paths_and_model_names_are_404_problem_json(repository):
    async with running(repository) as server, aiohttp.ClientSession() as s:
        for path in (
            "/v1/models/..%2F..%2Fetc%2Fpasswd",
            "/v1/models/%2E%2E/infer",
            "/v1/models/democnn/../../metrics/x",
            "/v1/models/" + "a" * 2000,
        ):
            async with s.get(server.url + path) as r:
                assert r.status == 404, path
                assert r.headers["Content-Type"].startswith(protocol.PROBLEM_CONTENT_TYPE)


async def test_broken_http_gets_a_problem_json_400_and_is_counted(repository, cnn_bundle):
    """Under ``serve`` (its runner), even what aiohttp refuses before any handler runs is a
    problem+json answer, counted, logged in one line; the server keeps serving."""
    registry = CollectorRegistry()
    runner = ServeRunner(create_app(ServerConfig(repository=repository), registry=registry), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = "127.0.0.1", runner.addresses[0][1]
        broken = {
            "request line": b"GARBAGE\r\n\r\n",
            "header without a colon": b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            "header line of 20 KB": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
            "two Content-Lengths": b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "TLS spoken to plain HTTP": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
            "an unknown Expect": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nExpect: x\r\n\r\n",
        }
        for name, request in broken.items():
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 30)  # the connection closes after it
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split()[1] == b"400", (name, answer[:200])
            assert b"content-type: application/problem+json" in head.lower(), name
            assert json.loads(body)["code"] == "bad_request", name
        url = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(s, url + INFER, frame(cnn_bundle, 3, torch.rand(1, 3, 32, 32)))
        assert status == 200
        counted = registry.get_sample_value("splitinfer_rejections_total", {"reason": "bad_request"})
        assert counted == len(broken)
    finally:
        await runner.cleanup()


async def test_a_frame_whose_deadline_already_ran_out_is_refused_as_malformed(repository, cnn_bundle):
    x = torch.rand(1, 3, 32, 32)
    async with running(repository) as server, aiohttp.ClientSession() as s:
        for deadline in (0.0, -1.0, float("-inf")):
            body = frame(cnn_bundle, 3, x, deadline_s=deadline)
            status, headers, answer = await post(s, server.url + INFER, body)
            assert (status, problem_code(status, headers, answer)) == (400, "malformed_frame"), deadline


async def test_content_encodings_are_refused_before_the_body_is_inflated(repository, cnn_bundle):
    """aiohttp would inflate a gzip or deflate body: a decompression bomb outside the codecs' caps."""
    good = frame(cnn_bundle, 3, torch.rand(1, 3, 32, 32))
    async with running(repository) as server, aiohttp.ClientSession() as s:
        for encoding, body in (("gzip", gzip.compress(good)), ("deflate", b"not deflate"), ("br", good)):
            status, headers, answer = await post(
                s, server.url + INFER, body, headers={"Content-Encoding": encoding}
            )
            assert (status, problem_code(status, headers, answer)) == (415, "unsupported_media_type")
        status, _, _ = await post(s, server.url + INFER, good, headers={"Content-Encoding": "identity"})
        assert status == 200
