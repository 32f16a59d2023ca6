"""TLS misconfiguration is configuration, not an outage: the client raises on entering and
says how to fix it (issue 31 item 7), against a real TLS server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from splitinfer.cloud import ServerConfig, create_app
from splitinfer.edge import EdgeClient
from splitinfer.errors import CloudError, TLSError


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed server certificate for 127.0.0.1 (server.pem, server.key)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("needs the openssl command line")
        pytest.skip("needs the openssl command line")
    d = tmp_path_factory.mktemp("self-signed")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return d


@pytest.fixture
async def tls_port(repository: Path, self_signed: Path) -> AsyncIterator[int]:
    from splitinfer.cloud._tls import server_ssl_context

    config = ServerConfig(
        repository=repository, tls_cert=self_signed / "server.pem", tls_key=self_signed / "server.key"
    )
    runner = web.AppRunner(create_app(config, registry=CollectorRegistry()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(config))
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_an_untrusted_certificate_raises_on_entering_and_names_ca_file(tls_port, repository):
    client = EdgeClient(f"https://127.0.0.1:{tls_port}", bundle=repository / "democnn", policy="local")
    with pytest.raises(TLSError, match="ca_file=") as caught:
        await client.__aenter__()
    assert isinstance(caught.value, OSError) and isinstance(caught.value, CloudError)


async def test_http_to_a_tls_port_says_the_server_speaks_tls(tls_port, repository):
    client = EdgeClient(f"http://127.0.0.1:{tls_port}", bundle=repository / "democnn", policy="local")
    with pytest.raises(TLSError, match=f"speaks TLS: use https://127.0.0.1:{tls_port}"):
        await client.__aenter__()


async def test_with_ca_file_the_self_signed_server_answers(tls_port, repository, self_signed, cnn):
    x = torch.rand(1, 3, 32, 32)
    async with EdgeClient(
        f"https://127.0.0.1:{tls_port}", bundle=repository / "democnn", policy="static", cut=2, codec="f32",
        ca_file=self_signed / "server.pem",
    ) as client:  # fmt: skip
        out, trace = await client.ainfer(x, return_trace=True)
    assert trace.ran_on == "cloud"
    with torch.no_grad():
        assert torch.allclose(out, cnn(x), atol=1e-5)
