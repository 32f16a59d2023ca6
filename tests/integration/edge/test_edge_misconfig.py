"""A misconfigured EdgeClient is told so: a wrong token, a model
the server does not host or another graph under its name raise on entering; later refusals are
logged once per kind and counted; a closed client refuses work; traces are per request; reprs
are one line. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import torch
from prometheus_client import CollectorRegistry

import splitinfer as si
from splitinfer.cloud import ServerConfig
from splitinfer.edge import EdgeClient
from splitinfer.errors import AuthError, ClientClosedError, GraphMismatchError, RemoteRequestError
from tests.conftest import start_server

X = torch.rand(1, 3, 32, 32)
EDGE_LOG = "splitinfer.edge"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _static(url, repository, **kw):
    return EdgeClient(url, bundle=repository / "democnn", policy="static", cut=2, codec="f32", **kw)


async def test_a_wrong_token_raises_on_entering_sync_and_async(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    runner, server = await _server(repository, token_file=tokens)
    try:
        with pytest.raises(AuthError, match="token") as info:
            async with _static(server.url, repository, token="wrong"):
                pass
        assert info.value.status == 403
        with pytest.raises(AuthError):
            async with _static(server.url, repository):  # no token at all: 401
                pass

        def sync_enter():
            with _static(server.url, repository, token="wrong"):
                pass

        with pytest.raises(AuthError):
            await asyncio.to_thread(sync_enter)
        async with _static(server.url, repository, token="s3cret-token") as client:
            await client.ainfer(X)
            assert client.last_trace.fallback is None and client.last_trace.ran_on == "cloud"
    finally:
        await runner.cleanup()


async def _server(root, **kw):
    return await start_server(ServerConfig(repository=root, **kw))


async def test_a_model_the_server_does_not_host_is_a_clear_error_naming_the_hash(repository, tmp_path, cnn):
    other = si.compile(cnn, (X,), name="another")
    other.save(tmp_path / "another")
    runner, server = await _server(tmp_path)
    try:
        bundle = si.Bundle.load(repository / "democnn")
        with pytest.raises(RemoteRequestError, match=bundle.graph_hash) as info:
            async with _static(server.url, repository):
                pass
        assert info.value.code == "unknown_model" and "democnn" in str(info.value)
    finally:
        await runner.cleanup()


async def test_another_graph_under_the_same_name_names_both_hashes(repository, tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    impostor = si.compile(model, (X,), name="democnn")
    impostor.save(tmp_path / "democnn")
    runner, server = await _server(tmp_path)
    try:
        ours = si.Bundle.load(repository / "democnn").graph_hash
        with pytest.raises(GraphMismatchError) as info:
            async with _static(server.url, repository):
                pass
        assert ours in str(info.value) and impostor.graph_hash in str(info.value)
    finally:
        await runner.cleanup()


async def test_an_unreachable_server_is_fine_on_entering_but_logged_once(repository, caplog):
    url = f"http://127.0.0.1:{_free_port()}"
    caplog.set_level(logging.WARNING, logger=EDGE_LOG)
    async with _static(url, repository) as client:
        assert not await client.aserver_ready()
        await client.awarm_up(X)  # checks again: still only one line
        out = await client.ainfer(X)
        assert client.last_trace.fallback == "unreachable" and out.shape == (1, 10)
    lines = [r for r in caplog.records if "cannot check model" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


async def test_later_refusals_are_logged_once_per_kind_and_counted(repository, tmp_path, cnn, caplog):
    """A server that comes up after the client entered and hosts another model: every request
    falls back (404), one WARNING for the kind, one for the fallbacks, all of them counted."""
    port = _free_port()
    caplog.set_level(logging.WARNING, logger=EDGE_LOG)
    registry = CollectorRegistry()
    async with _static(f"http://127.0.0.1:{port}", repository, registry=registry) as client:
        other = si.compile(cnn, (X,), name="another")
        other.save(tmp_path / "another")
        runner, _ = await start_server(ServerConfig(repository=tmp_path), port=port)
        try:
            assert await client.aserver_ready()
            for _ in range(4):
                await client.ainfer(X)
                assert client.last_trace.fallback == "bad_request"
        finally:
            await runner.cleanup()
    assert client.refusals["unknown_model"] == 4
    refused = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refused) == 1 and "unknown_model" in refused[0].getMessage()
    fallbacks = [r for r in caplog.records if "finishes on the device (bad_request)" in r.getMessage()]
    assert len(fallbacks) == 1  # rate-limited
    value = registry.get_sample_value(
        "splitinfer_edge_refusals_total", {"model": "democnn", "kind": "unknown_model"}
    )
    assert value == 4


async def test_metadata_and_readiness(server, repository):
    async with _static(server.url, repository) as client:
        assert await client.aserver_ready()
        meta = await client.amodel_metadata()
        assert meta["graph_hash"] == client.bundle.graph_hash and meta["name"] == "democnn"
        assert client.server_metadata == meta

    def sync():
        with _static(server.url, repository) as c:
            return c.server_ready(), c.model_metadata()["version"]

    assert await asyncio.to_thread(sync) == (True, "1")


def test_a_closed_client_refuses_work_and_leaks_nothing(repository, recwarn):
    client = _static(f"http://127.0.0.1:{_free_port()}", repository)
    with client:
        client.infer(X)
    with pytest.raises(ClientClosedError, match="closed"):
        client.infer(X)
    with pytest.raises(ClientClosedError):
        client.warm_up(X)
    with pytest.raises(ClientClosedError), client:
        pass
    assert "closed" in repr(client)
    assert not [w for w in recwarn if "Unclosed" in str(w.message)]


async def test_a_closed_async_client_refuses_work(server, repository):
    async with _static(server.url, repository) as client:
        await client.ainfer(X)
    with pytest.raises(ClientClosedError):
        await client.ainfer(X)
    with pytest.raises(RuntimeError):  # ClientClosedError is a RuntimeError too
        await client.amodel_metadata()


async def test_each_request_gets_its_own_trace_under_gather(server, repository):
    async with _static(server.url, repository) as client:
        results = await asyncio.gather(*(client.ainfer(X * i, return_trace=True) for i in range(6)))
    ids = {trace.request_id for _, trace in results}
    assert len(ids) == 6
    for i, (out, trace) in enumerate(results):
        with torch.no_grad():
            expected = client.bundle.tail(0, client.bundle.head(0, X * i))
        assert torch.allclose(out, expected, atol=1e-5)
        assert trace.ran_on == "cloud" and trace.cut == 2 and trace.codec == "f32"
        shared = {"head", "encode", "link", "queue", "decode", "tail"}
        assert shared <= trace.stages.keys(), trace.stages.keys()
        assert set(trace.compared()) == shared
        assert all(m >= 0 for _, m in trace.compared().values())  # predicted: NaN without a profile


async def test_reprs_are_one_line(server, repository):
    bundle = si.Bundle.load(repository / "democnn")
    text = repr(bundle)
    assert "\n" not in text and len(text) < 300 and "democnn" in text and bundle.graph_hash[:12] in text
    assert len(repr(bundle.manifest)) < 300
    async with _static(server.url, repository) as client:
        text = repr(client)
        assert server.url in text and "democnn" in text and "static" in text and "\n" not in text
