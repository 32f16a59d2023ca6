"""Model versions and hot reload: versions side by side, routing by graph hash, reload under load."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from tritonclient.http import InferInput
from tritonclient.http.aio import InferenceServerClient

import splitinfer as si
from splitinfer.cloud._state import STATE
from splitinfer.edge import EdgeClient
from splitinfer.errors import BundleError
from splitinfer.lab._demo import demo_model
from splitinfer.lab._server import ServerProcess
from tests.support.cloud import INFER, compute_held, frame, outputs, post, problem_code, running, until

LOAD = "/v2/repository/models/democnn/load"


@pytest.fixture(scope="module")
def second() -> tuple[torch.nn.Module, si.Bundle]:
    """Version 2 of democnn: the same architecture with other weights (so another graph hash)."""
    model = demo_model(seed=1)
    return model, si.compile(model, (torch.rand(1, 3, 32, 32),), name="democnn", version="2")


def _expect(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _versioned(root: Path, *bundles: tuple[str, si.Bundle]) -> Path:
    for version, bundle in bundles:
        bundle.save(root / "democnn" / version)
    return root


async def test_versions_are_served_side_by_side_and_routed_by_graph_hash(tmp_path, cnn, cnn_bundle, second):
    model2, bundle2 = second
    root = _versioned(tmp_path, ("1", cnn_bundle), ("2", bundle2))
    x = torch.rand(2, 3, 32, 32)
    async with running(root) as server, aiohttp.ClientSession() as s:
        for bundle, model in ((cnn_bundle, cnn), (bundle2, model2)):
            status, _, body = await post(s, server.url + INFER, frame(bundle, 3, x))
            assert status == 200
            assert torch.allclose(outputs(body)[0], _expect(model, x), atol=1e-5)
        async with s.get(server.url + "/v1/models/democnn") as r:
            doc = await r.json()
        assert doc["graph_hash"] == bundle2.graph_hash  # the newest, as before
        assert doc["versions"] == [
            {"version": "1", "graph_hash": cnn_bundle.graph_hash},
            {"version": "2", "graph_hash": bundle2.graph_hash},
        ]
        client = InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert (await client.get_model_metadata("democnn"))["versions"] == ["1", "2"]
            for version, model in (("1", cnn), ("2", model2), ("", model2)):
                tensor = InferInput("input_0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x.numpy())
                result = await client.infer("democnn", [tensor], model_version=version)
                assert result.get_response()["model_version"] == (version or "2")
                np.testing.assert_allclose(result.as_numpy("output_0"), _expect(model, x).numpy(), atol=1e-5)
        finally:
            await client.close()
        # An edge client on the older bundle enters (its graph is served) and is answered by the cloud.
        async with EdgeClient(
            server.url, bundle=cnn_bundle, policy="static", cut=3, codec="f32+zstd1", hedge=False
        ) as edge:
            out = await edge.ainfer(x[:1])
            assert edge.last_trace.fallback is None and edge.last_trace.ran_on == "cloud"
        assert torch.allclose(out, _expect(cnn, x[:1]), atol=1e-5)
    async with running(root, max_versions=1) as server, aiohttp.ClientSession() as s:
        status, headers, body = await post(s, server.url + INFER, frame(cnn_bundle, 3, x))
        assert problem_code(status, headers, body) == "graph_mismatch"
        assert b"version 2" in body
        status, _, _ = await post(s, server.url + INFER, frame(bundle2, 3, x))
        assert status == 200


async def test_a_version_leaves_only_after_its_requests_in_flight(tmp_path, cnn, cnn_bundle, second):
    model2, bundle2 = second
    root = _versioned(tmp_path, ("1", cnn_bundle))
    x = torch.rand(1, 3, 32, 32)
    async with running(root) as server, aiohttp.ClientSession() as s:
        state = server.app[STATE]
        async with compute_held(server):
            pending = asyncio.create_task(post(s, server.url + INFER, frame(cnn_bundle, 2, x)))
            await until(lambda: state.scheduler.queued == 1)
            bundle2.save(root / "democnn" / "2")
            shutil.rmtree(root / "democnn" / "1")
            async with s.post(server.url + LOAD) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["versions"] == ["2"]
            assert [v.version for v in state.repository.versions("democnn")] == ["2"]
            assert ("democnn", 2, "1") in state.scheduler.batchers  # still computing for version 1
        status, _, body = await pending
        assert status == 200
        assert torch.allclose(outputs(body)[0], _expect(cnn, x), atol=1e-5)
        await until(lambda: ("democnn", 2, "1") not in state.scheduler.batchers)
        status, headers, body = await post(s, server.url + INFER, frame(cnn_bundle, 2, x))
        assert problem_code(status, headers, body) == "graph_mismatch"
        async with s.post(server.url + "/v2/repository/models/democnn/unload") as r:
            assert r.status == 200
        status, headers, body = await post(s, server.url + INFER, frame(bundle2, 2, x))
        assert problem_code(status, headers, body) == "unknown_model"
        async with s.post(server.url + LOAD) as r:
            assert r.status == 200
        status, _, body = await post(s, server.url + INFER, frame(bundle2, 2, x))
        assert status == 200 and torch.allclose(outputs(body)[0], _expect(model2, x), atol=1e-5)
        async with s.post(server.url + "/v2/repository/models/nosuch/load") as r:
            assert r.status == 400 and "no bundle of model 'nosuch'" in (await r.json())["error"]


def _corrupt(path: Path) -> None:
    segment = path / "segment_000.pt2"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))


async def test_hot_reload_under_load_loses_nothing(tmp_path, cnn, cnn_bundle, second):
    """Edge clients send continuously while version 2 is added, a broken version 3 is refused and
    version 1 is removed (picked up by polling): every request is answered, right, and none 5xx."""
    model2, bundle2 = second
    root = _versioned(tmp_path, ("1", cnn_bundle))
    models = {cnn_bundle.graph_hash: cnn, bundle2.graph_hash: model2}
    current = {"bundle": cnn_bundle}
    moved: set[int] = set()
    answers: list[tuple[int, bool]] = []
    stop = asyncio.Event()

    async def client(i: int, s: aiohttp.ClientSession, url: str) -> None:
        cut = 1 + i % (cnn_bundle.last_cut - 1)
        while not stop.is_set():
            bundle = current["bundle"]
            x = torch.rand(1 + i % 3, 3, 32, 32)
            status, _, body = await post(s, url + INFER, frame(bundle, cut, x, request_id=f"c{i}"))
            right = status == 200 and torch.allclose(
                outputs(body)[0], _expect(models[bundle.graph_hash], x), atol=1e-5
            )
            answers.append((status, right))
            if bundle is bundle2 and right:
                moved.add(i)

    async with running(root, poll_repository_s=0.2) as server, aiohttp.ClientSession() as s:
        state = server.app[STATE]
        clients = [asyncio.create_task(client(i, s, server.url)) for i in range(6)]
        await until(lambda: len(answers) >= 20)
        bundle2.save(root / "democnn" / "2")
        async with s.post(server.url + LOAD) as r:
            assert r.status == 200 and (await r.json())["versions"] == ["1", "2"]
        await until(lambda: len(answers) >= 40)
        current["bundle"] = bundle2  # the edge fleet moves to the new bundle
        await until(lambda: len(moved) == len(clients))
        # copied under a name the scan skips, then renamed: no poll sees a half-copied version
        shutil.copytree(root / "democnn" / "2", root / "democnn" / ".3.tmp")
        _corrupt(root / "democnn" / ".3.tmp")
        (root / "democnn" / ".3.tmp").rename(root / "democnn" / "3")
        async with s.post(server.url + LOAD) as r:
            assert r.status == 400
            error = (await r.json())["error"]
        assert "version 3 was refused" in error and "sha256" in error and "serving version(s) 1, 2" in error
        shutil.rmtree(root / "democnn" / "1")
        await until(lambda: [v.version for v in state.repository.versions("democnn")] == ["2"])
        seen = len(answers)
        await until(lambda: len(answers) >= seen + 20)
        stop.set()
        await asyncio.gather(*clients)
        failed = server.registry.get_sample_value(
            "splitinfer_model_loads_total", {"model": "democnn", "result": "failed"}
        )
    assert failed == 1.0  # refused once, not again at every poll
    statuses = {status for status, _ in answers}
    assert statuses == {200}, statuses
    assert all(right for _, right in answers)
    assert len(answers) >= 80


def test_a_broken_bundle_still_stops_the_start(tmp_path, cnn_bundle):
    from splitinfer.cloud._repository import load_repository

    root = _versioned(tmp_path, ("1", cnn_bundle))
    _corrupt(root / "democnn" / "1")
    with pytest.raises(BundleError, match="sha256"):
        load_repository(root, torch.device("cpu"))
    (root / "twin").mkdir()
    shutil.copytree(root / "democnn" / "1", root / "twin" / "1")
    with pytest.raises(BundleError, match="two bundles"):
        load_repository(root, torch.device("cpu"))


def test_sighup_reloads_the_repository_of_a_running_server(tmp_path, cnn_bundle, second):
    _, bundle2 = second
    root = _versioned(tmp_path, ("1", cnn_bundle))
    with ServerProcess(root) as server:
        assert server.proc is not None

        def versions() -> list[str]:
            with urllib.request.urlopen(server.url + "/v1/models/democnn", timeout=10) as r:
                return [v["version"] for v in json.loads(r.read())["versions"]]

        assert versions() == ["1"]
        bundle2.save(root / "democnn" / "2")
        server.proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            if versions() == ["1", "2"]:
                break
            time.sleep(0.1)
        assert versions() == ["1", "2"]
        assert server.proc.poll() is None  # still serving
