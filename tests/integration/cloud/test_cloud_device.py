"""Tails on a device (--device): the same path on every device; CUDA where torch sees one."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
import torch

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.cloud import ServerConfig, create_app
from splitinfer.cloud._state import STATE
from splitinfer.errors import ConfigError
from tests.support.cloud import INFER, frame, outputs, post, running

NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is false on this machine"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
    ),
]


def test_the_device_is_checked_and_says_how_to_fix(repository):
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        ServerConfig(repository=repository, device="tpu")
    auto = ServerConfig(repository=repository).torch_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    beyond = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    config = ServerConfig(repository=repository, device=beyond)
    with pytest.raises(ConfigError, match=r"is not available: torch sees \d+ CUDA device\(s\).*--device cpu"):
        config.torch_device()
    with pytest.raises(ConfigError, match="is not available"):
        create_app(config)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bundle_loads_its_segments_on_the_device(repository, cnn, device):
    bundle = Bundle.load(repository / "democnn", from_cut=2, device=device)
    loaded = [s for s in bundle.segments if s is not None]
    assert loaded and all(
        t.device.type == device
        for s in loaded
        for t in (*s.parameters(), *s.buffers())  # type: ignore[union-attr]
    )
    x = torch.rand(2, 3, 32, 32)
    frontier = Bundle.load(repository / "democnn", upto_cut=2).head(2, x)
    out = bundle.tail(2, [t.to(device) for t in frontier])
    with torch.no_grad():
        assert torch.allclose(out.cpu(), cnn(x), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
async def test_the_server_runs_tails_on_the_device(repository, cnn_bundle, cnn, device):
    xs = [torch.rand(1 + i % 2, 3, 32, 32) for i in range(6)]
    async with running(repository, device=device) as server, aiohttp.ClientSession() as s:
        assert server.app[STATE].scheduler.device.type == device
        for i, x in enumerate(xs):
            status, headers, body = await post(s, server.url + INFER, frame(cnn_bundle, 1 + i % 6, x))
            assert status == 200
            with torch.no_grad():
                assert torch.allclose(outputs(body)[0], cnn(x), atol=1e-4)
            stages = protocol.parse_server_timing(headers["Server-Timing"])
            assert {"queue", "decode", "compute", "encode", "total"} <= set(stages)
        doc = {
            "inputs": [
                {
                    "name": "input_0",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "data": xs[0].ravel().tolist(),
                }
            ]
        }
        async with s.post(server.url + "/v2/models/democnn/infer", json=doc) as r:
            assert r.status == 200
            got = np.asarray((await r.json())["outputs"][0]["data"], dtype=np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(got, cnn(xs[0]).numpy().ravel(), atol=1e-4)
        ok = server.registry.get_sample_value("splitinfer_requests_total", {"model": "democnn", "code": "ok"})
        assert ok == len(xs) + 1
