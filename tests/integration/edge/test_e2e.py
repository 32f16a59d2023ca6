"""A real request from the edge client through a real aiohttp server on 127.0.0.1."""

import asyncio
import io

import aiohttp
import msgpack
import pytest
import torch

import splitinfer as si
from splitinfer import errors, protocol
from splitinfer.compression import get_codec
from splitinfer.edge import EdgeClient
from splitinfer.tensors import TensorSpec


async def test_split_outputs_equal_the_unsplit_model(server, repository, cnn):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x)
    for cut in (0, 3, 7, 10):
        async with EdgeClient(
            server.url, bundle=repository / "democnn", policy="static", cut=cut, codec="f32+zstd1"
        ) as client:
            out = await client.ainfer(x)
            assert torch.equal(out, want), cut
            trace = client.last_trace
            assert trace.cut == cut
            if cut == client.bundle.last_cut:  # all on the device: nothing crosses the wire
                assert trace.bytes_up == trace.bytes_down == 0
                continue
            assert trace.bytes_up > 0 and trace.bytes_down > 0
            assert {"compute", "decode", "queue"} <= {k.removeprefix("cloud_") for k in trace.stages}


async def test_concurrent_async_requests_share_a_client(server, repository, cnn):
    xs = [torch.rand(2, 3, 32, 32) for _ in range(8)]
    async with EdgeClient(
        server.url, bundle=repository / "democnn", policy="static", cut=5, codec="f32+zstd1"
    ) as client:
        outs = await asyncio.gather(*(client.ainfer(x) for x in xs))
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, cnn(x), rtol=1e-5, atol=1e-6)  # batched in the cloud


async def test_sync_client_from_threads(server, repository, cnn):
    x = torch.rand(1, 3, 32, 32)

    def run():
        with EdgeClient(
            server.url, bundle=repository / "democnn", policy="static", cut=2, codec="f32+zstd1"
        ) as client:
            return [client.infer(x) for _ in range(3)]

    outs = await asyncio.to_thread(run)
    with torch.no_grad():
        assert all(torch.equal(o, cnn(x)) for o in outs)


async def _post(url, body, **kw):
    async with aiohttp.ClientSession() as s, s.post(url, data=body, **kw) as r:
        return r.status, r.headers, await r.read()


def _frame(bundle, cut=3, codec="f32+zstd1", graph=None, tensors=None, model="democnn"):
    frontier = bundle.head(min(cut, 3), torch.rand(1, 3, 32, 32))
    payload = get_codec(codec).encode(frontier) if codec in ("f32+zstd1", "f32") else b"xx"
    header = protocol.RequestHeader(
        model=model,
        graph=graph or bundle.graph_hash,
        cut=cut,
        codec=codec,
        tensors=tensors or tuple(TensorSpec.of(t) for t in frontier),
        request_id="t",
        payload_nbytes=len(payload),
    )
    return protocol.encode_request(header, payload)


@pytest.mark.parametrize(
    ("make_body", "status", "code"),
    [
        (lambda b: b"garbage", 400, "malformed_frame"),
        (lambda b: _frame(b)[:-10], 400, "malformed_frame"),
        (lambda b: _frame(b, graph="0" * 32), 409, "graph_mismatch"),
        (lambda b: _frame(b, codec="f16+zstd9"), 422, "bad_codec"),
        (lambda b: _frame(b, cut=99), 422, "bad_cut"),
        (lambda b: _frame(b, tensors=(TensorSpec((1, 3, 3), "float32"),)), 422, "bad_shape"),
        (lambda b: _frame(b, model="other"), 400, "malformed_frame"),
        (lambda b: msgpack.packb({"v": 9}), 400, "unsupported_version"),
    ],
)
async def test_bad_requests_get_problem_json_and_the_server_keeps_serving(
    server, cnn_bundle, repository, cnn, make_body, status, code
):
    got, headers, body = await _post(f"{server.url}/v1/models/democnn/infer", make_body(cnn_bundle))
    assert got == status
    assert headers["Content-Type"].startswith(protocol.PROBLEM_CONTENT_TYPE)
    doc = protocol.error_from_problem(got, body)
    assert doc.code == code
    async with EdgeClient(
        server.url, bundle=repository / "democnn", policy="static", cut=3, codec="f32+zstd1"
    ) as client:
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(await client.ainfer(x), cnn(x))


async def test_unknown_model_is_404(server):
    status, _, body = await _post(f"{server.url}/v1/models/nope/infer", b"x")
    assert status == 404
    assert b"unknown_model" in body


async def test_body_over_the_limit_is_413_before_it_is_read(server):
    status, _, body = await _post(f"{server.url}/v1/models/democnn/infer", io.BytesIO(b"\0" * (2 << 20)))
    assert status == 413
    assert b"too_large" in body


async def test_streamed_body_over_the_limit_is_413(server):
    async def chunks():
        for _ in range(64):
            yield b"\0" * 65536

    status, _, _ = await _post(f"{server.url}/v1/models/democnn/infer", chunks())
    assert status == 413


async def test_unknown_route_and_method_are_problem_json(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/nope") as r:
            assert r.status == 404
            assert (await r.json(content_type=None))["code"] == "not_found"
        async with s.get(f"{server.url}/v1/models/democnn/infer") as r:
            assert r.status == 405
            assert (await r.json(content_type=None))["code"] == "method_not_allowed"


async def test_model_listing_health_and_metrics(server, cnn_bundle):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/v1/models") as r:
            models = (await r.json())["models"]
        assert [m["name"] for m in models] == ["democnn"]
        assert models[0]["graph_hash"] == cnn_bundle.graph_hash
        assert len(models[0]["cuts"]) == len(cnn_bundle.cuts)
        async with s.get(f"{server.url}/v1/models/democnn") as r:
            assert (await r.json())["codecs"] == cnn_bundle.codecs
        async with s.get(f"{server.url}/v2/health/live") as r:
            assert r.status == 200
        async with s.get(f"{server.url}/v2/health/ready") as r:
            assert r.status == 200
    async with EdgeClient(server.url, bundle=cnn_bundle, policy="static", cut=4, codec="f32+zstd1") as client:
        await client.ainfer(torch.rand(1, 3, 32, 32))
    async with aiohttp.ClientSession() as s, s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert 'splitinfer_requests_total{code="ok",model="democnn"} 1.0' in text
    assert 'splitinfer_request_duration_seconds_count{model="democnn",stage="compute"} 1.0' in text
    assert "splitinfer_build_info" in text


async def test_a_stale_graph_is_answered_on_the_device_never_wrongly(server, cnn_bundle, cnn):
    stale = si.Bundle(**{**cnn_bundle.__dict__, "graph_hash": "f" * 32, "_runners": {}})
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(errors.GraphMismatchError) as info:  # entering asks the server for the model
        async with EdgeClient(server.url, bundle=stale, policy="static", cut=4, codec="f32+zstd1"):
            pass
    assert "f" * 32 in str(info.value) and cnn_bundle.graph_hash in str(info.value)
    client = EdgeClient(server.url, bundle=stale, policy="static", cut=4, codec="f32+zstd1")
    try:  # a client that never checked: every request still answered on the device
        out = await client.ainfer(x)
        assert client.last_trace.fallback == "graph_mismatch"
        assert client.refusals["graph_mismatch"] == 1
    finally:
        await client.aclose()
    with torch.no_grad():
        assert torch.equal(out, cnn(x))


async def test_dead_server_is_answered_on_the_device(cnn_bundle, cnn):
    x = torch.rand(1, 3, 32, 32)
    async with EdgeClient(
        "http://127.0.0.1:9", bundle=cnn_bundle, policy="static", cut=4, codec="f32+zstd1"
    ) as client:
        out = await client.ainfer(x)
        assert client.last_trace.fallback == "unreachable"
    with torch.no_grad():
        assert torch.equal(out, cnn(x))


async def test_dead_server_without_the_full_model_fails_loudly(repository):
    async with EdgeClient(
        "http://127.0.0.1:9", bundle=repository / "democnn", policy="static", cut=4, codec="f32", max_cut=4
    ) as client:
        with pytest.raises(errors.CloudUnavailableError, match="cannot reach"):
            await client.ainfer(torch.rand(1, 3, 32, 32))
