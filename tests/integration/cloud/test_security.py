"""Security against real servers on 127.0.0.1: bearer tokens, TLS and mutual TLS, and the other
promises of docs/security.md (the doc names every test)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pickle
import re
import shutil
import ssl
import subprocess
import warnings
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
from splitinfer.cloud._tls import server_ssl_context
from splitinfer.errors import ConfigError
from tests.support.cloud import INFER, frame, outputs, post, problem_code, running

TOKENS = ["t0k3n-for-the-edge-fleet-0001", "another-token-for-the-second-fleet"]
TOKEN = TOKENS[0]
WRONG = "stolen-or-guessed-token-fedcba9876"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# edge fleets\n" + "\n".join(TOKENS) + "\n\n")
    path.chmod(0o600)
    return path


# -- bearer tokens --------------------------------------------------------------------------


async def test_requests_need_a_valid_bearer_token(repository, token_file, cnn_bundle, cnn):
    x = torch.rand(1, 3, 32, 32)
    body = frame(cnn_bundle, 6, x)
    async with running(repository, token_file=token_file) as server, aiohttp.ClientSession() as s:
        url = server.url + INFER
        status, headers, answer = await post(s, url, body)
        assert (status, problem_code(status, headers, answer)) == (401, "unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        for bad in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer " + TOKENS[0][:-1], "Bearer " + TOKENS[0] + "x"):
            status, headers, answer = await post(s, url, body, headers={"Authorization": bad})
            assert status in (401, 403), bad
            assert problem_code(status, headers, answer) in ("unauthorized", "forbidden")
        for token in TOKENS:
            status, _, answer = await post(s, url, body, headers={"Authorization": f"Bearer {token}"})
            assert status == 200
            with torch.no_grad():
                assert torch.allclose(outputs(answer)[0], cnn(x), atol=1e-5)
        for path in ("/v2/health/ready", "/metrics", "/v1/models"):
            async with s.get(server.url + path) as r:
                assert r.status == 401, path
        rejected = server.registry.get_sample_value("splitinfer_rejections_total", {"reason": "forbidden"})
        assert rejected == 2.0


async def test_probes_can_be_left_open(repository, token_file):
    async with (
        running(repository, token_file=token_file, public_probes=True) as server,
        aiohttp.ClientSession() as s,
    ):
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            async with s.get(server.url + path) as r:
                assert r.status == 200, path
        async with s.get(server.url + "/v1/models") as r:
            assert r.status == 401


def test_token_file_rotation_and_errors(tmp_path: Path, token_file: Path):
    tokens = TokenSet(token_file)
    assert len(tokens) == 2
    assert tokens.verify(TOKENS[1])
    assert not tokens.verify("nope")
    token_file.write_text("rotated-token-for-everyone-0002\n")
    os.utime(token_file, ns=(1, 1))
    assert tokens.reload_if_changed()
    assert tokens.verify("rotated-token-for-everyone-0002")
    assert not tokens.verify(TOKENS[0])
    token_file.write_text("\n# nothing\n")
    os.utime(token_file, ns=(2, 2))
    assert not tokens.reload_if_changed()  # a broken file keeps the tokens loaded before
    assert tokens.verify("rotated-token-for-everyone-0002")
    with pytest.raises(ConfigError, match="holds no token"):
        TokenSet(token_file)


def test_tokens_are_kept_only_as_digests(token_file):
    tokens = TokenSet(token_file)
    assert tokens.verify(TOKEN) and not tokens.verify(WRONG)
    held = repr(vars(tokens)).encode()
    for token in TOKENS:
        assert token.encode() not in held and token.encode().hex().encode() not in held


# -- what requests and answers may carry ----------------------------------------------------


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


# -- TLS ------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(d: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    ext = d / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    ext.write_text("\n".join(lines + ([f"subjectAltName={san}"] if san else [])) + "\n")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d,
    )  # fmt: skip


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's CA and client."""
    if shutil.which("openssl") is None:
        message = "needs the openssl command line (the cryptography package is not installed)"
        if os.environ.get("CI"):  # .ci/run sets it: CI fails rather than skips the TLS tests
            pytest.fail(message)
        pytest.skip(message)
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "serverAuth", "IP:127.0.0.1")
    _leaf(d, "client", "ca", "clientAuth")
    _leaf(d, "stranger", "other-ca", "clientAuth")
    return d


def _client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return ctx


async def _serve_tls(config: ServerConfig) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(config, registry=CollectorRegistry()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(config))
    await site.start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}"


async def _get(url: str, ctx: ssl.SSLContext | bool) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + "/v2/health/ready", ssl=ctx) as r:
        return r.status


async def test_tls_serves_https_and_refuses_plain_http(repository, pki, cnn_bundle, cnn):
    config = ServerConfig(repository=repository, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    runner, url = await _serve_tls(config)
    try:
        assert await _get(url, _client_context(pki)) == 200
        x = torch.rand(1, 3, 32, 32)
        async with aiohttp.ClientSession() as s:
            status, _, body = await post(s, url + INFER, frame(cnn_bundle, 2, x), ssl=_client_context(pki))
        assert status == 200
        with torch.no_grad():
            assert torch.allclose(outputs(body)[0], cnn(x), atol=1e-5)
        with pytest.raises(aiohttp.ClientError):  # the server's certificate is not trusted by default
            await _get(url, True)
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            await _get(url.replace("https://", "http://"), False)
    finally:
        await runner.cleanup()


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(repository, pki):
    config = ServerConfig(
        repository=repository,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    runner, url = await _serve_tls(config)
    try:
        assert await _get(url, _client_context(pki, "client")) == 200
        for ctx in (_client_context(pki), _client_context(pki, "stranger")):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await _get(url, ctx)
        assert await _get(url, _client_context(pki, "client")) == 200  # still serving
    finally:
        await runner.cleanup()


def test_tls_configuration_errors_say_how_to_fix(repository, pki, tmp_path):
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        ServerConfig(repository=repository, tls_cert=pki / "server.pem")
    with pytest.raises(ConfigError, match="needs the server's own"):
        ServerConfig(repository=repository, tls_client_ca=pki / "ca.pem")
    mismatched = ServerConfig(repository=repository, tls_cert=pki / "server.pem", tls_key=pki / "client.key")
    with pytest.raises(ConfigError, match="key must match"):
        server_ssl_context(mismatched)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    broken = ServerConfig(
        repository=repository, tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=garbage
    )
    with pytest.raises(ConfigError, match="client CA"):
        server_ssl_context(broken)


async def test_tls_below_1_2_is_refused(repository, pki):
    config = ServerConfig(repository=repository, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    assert server_ssl_context(config).minimum_version == ssl.TLSVersion.TLSv1_2
    runner, url = await _serve_tls(config)
    try:
        old = _client_context(pki)
        with warnings.catch_warnings():  # the ssl module deprecates TLS 1.1, as it should
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await _get(url, old)
        assert await _get(url, _client_context(pki)) == 200
    finally:
        await runner.cleanup()
