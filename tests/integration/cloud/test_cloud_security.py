"""Bearer tokens, TLS and mutual TLS, against a real server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import warnings
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from splitinfer.cloud import ServerConfig, create_app
from splitinfer.cloud._auth import TokenSet
from splitinfer.cloud._tls import server_ssl_context
from splitinfer.errors import ConfigError
from tests.support.cloud import INFER, frame, outputs, post, problem_code, running

TOKENS = ["t0k3n-for-the-edge-fleet-0001", "another-token-for-the-second-fleet"]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# edge fleets\n" + "\n".join(TOKENS) + "\n\n")
    path.chmod(0o600)
    return path


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
