"""Weights and compute shared across models: two models fine-tuned from one backbone keep its
segments once, batch their requests together through them, and answer one upload together."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace

import aiohttp
import pytest
import torch
from torch import nn

import splitinfer as si
from splitinfer import protocol
from splitinfer.cloud._state import STATE
from splitinfer.compression import get_codec
from splitinfer.edge import EdgeClient
from splitinfer.errors import ConfigError
from splitinfer.partitioner import Estimates
from tests.support.cloud import compute_held, frame, outputs, post, problem_code, running, until


class Task(nn.Module):
    """A shared backbone (same weights in every task) and a task's own head."""

    def __init__(self, backbone: nn.Module, classes: int, seed: int):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(seed)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    models = {"cats": Task(backbone, 5, seed=1).eval(), "dogs": Task(backbone, 7, seed=2).eval()}
    example = (torch.rand(1, 3, 32, 32),)
    bundles = {name: si.compile(m, example, name=name) for name, m in models.items()}
    root = tmp_path_factory.mktemp("tasks")
    for name, bundle in bundles.items():
        bundle.save(root / name)
    return root, models, bundles


def _backbone_cuts(bundle: si.Bundle) -> int:
    """Cuts of the backbone: up to the first cut whose name is in the head."""
    return next(c.index for c in bundle.cuts if "head" in c.name)


async def test_equal_segments_are_loaded_once_and_both_models_answer_right(tasks):
    root, models, bundles = tasks
    shared = _backbone_cuts(bundles["cats"])
    assert shared >= 2 and shared == _backbone_cuts(bundles["dogs"])
    x = torch.rand(3, 3, 32, 32)
    async with running(root) as server, aiohttp.ClientSession() as s:
        repo = server.app[STATE].repository
        cats, dogs = repo.latest("cats").bundle, repo.latest("dogs").bundle
        assert all(cats.segments[i] is dogs.segments[i] for i in range(shared))  # the backbone's
        heads = [i for i in range(shared, cats.n_segments) if list(cats.segments[i].parameters())]  # type: ignore[union-attr]
        assert heads and all(cats.segments[i] is not dogs.segments[i] for i in heads)  # the tasks' own
        weights = {p.data_ptr() for seg in (cats.segments[0], dogs.segments[0]) for p in seg.parameters()}  # type: ignore[union-attr]
        assert len(weights) == len(list(cats.segments[0].parameters()))  # type: ignore[union-attr]
        for name, bundle in bundles.items():
            for cut in (0, 1, shared, bundle.last_cut - 1):
                status, _, body = await post(
                    s, server.url + f"/v1/models/{name}/infer", frame(bundle, cut, x)
                )
                assert status == 200
                with torch.no_grad():
                    assert torch.allclose(outputs(body)[0], models[name](x), atol=1e-5), (name, cut)
    async with running(root, share_weights=False) as server:
        repo = server.app[STATE].repository
        cats, dogs = repo.latest("cats").bundle, repo.latest("dogs").bundle
        assert all(a is not b for a, b in zip(cats.segments, dogs.segments))


# -- requests of several models batched together, one upload for several tasks -------------


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _batch_desc(headers) -> str:
    return next(e.strip() for e in headers["Server-Timing"].split(",") if e.strip().startswith("batch;"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_requests_of_two_models_run_the_shared_backbone_in_one_batch(tasks):
    root, models, bundles = tasks
    cut = 1  # inside the backbone: both tails begin with the same (shared) segment
    xs = {name: [torch.rand(1, 3, 32, 32) for _ in range(3)] for name in bundles}
    async with running(root, max_batch_size=16, compute_threads=1) as server, aiohttp.ClientSession() as s:
        scheduler = server.app[STATE].scheduler
        async with compute_held(server):  # every request queues before a batch forms
            sent = [
                (
                    name,
                    x,
                    asyncio.create_task(post(s, server.url + f"/v1/models/{name}/infer", frame(b, cut, x))),
                )
                for name, b in bundles.items()
                for x in xs[name]
            ]
            await until(lambda: scheduler.queued >= len(sent))
            assert len(scheduler.batchers) == 1  # one queue for both models at that cut
        for name, x, task in sent:
            status, headers, body = await task
            assert status == 200
            assert torch.allclose(outputs(body)[0], _eager(models[name], x), atol=1e-5), name
            assert _batch_desc(headers) == 'batch;desc="rows=6 models=2"'
        get = server.registry.get_sample_value
        for name in bundles:
            assert get("splitinfer_shared_batches_total", {"model": name}) == 1.0
            assert get("splitinfer_batch_size_count", {"model": name}) == 1.0
            assert get("splitinfer_batch_size_sum", {"model": name}) == 6.0
        # at a cut inside the tasks' own heads their requests queue apart, and answer right
        last = bundles["cats"].last_cut - 1
        for name, b in bundles.items():
            status, headers, body = await post(
                s, server.url + f"/v1/models/{name}/infer", frame(b, last, xs[name][0])
            )
            assert status == 200 and _batch_desc(headers).endswith('models=1"')
            assert torch.allclose(outputs(body)[0], _eager(models[name], xs[name][0]), atol=1e-5)
        assert all(get("splitinfer_shared_batches_total", {"model": n}) == 1.0 for n in bundles)


async def test_one_upload_is_answered_by_every_task_that_shares_the_head(tasks):
    root, models, bundles = tasks
    cats, dogs = bundles["cats"], bundles["dogs"]
    x = torch.rand(2, 3, 32, 32)
    async with running(root) as server, aiohttp.ClientSession() as s:
        url = server.url + "/v1/models/cats/infer"
        doc = await (await s.get(server.url + "/v1/models/cats")).json()
        shared = doc["shared_heads"]["dogs"]
        assert shared >= _backbone_cuts(cats)
        for cut in (0, 1, shared):
            status, headers, body = await post(s, url, frame(cats, cut, x, codec="f32", tasks=[dogs]))
            assert status == 200, body
            rheader, payload = protocol.decode_response(body)
            assert rheader.models == (("cats", 1), ("dogs", 1))
            got = get_codec(rheader.codec).decode(payload)
            assert torch.allclose(got[0], _eager(models["cats"], x), atol=1e-5), cut
            assert torch.allclose(got[1], _eager(models["dogs"], x), atol=1e-5), cut
            # before the shared cut the tails' first segments are shared too: they ran once for
            # both models, one batch of the frontier's 2 rows; from it each tail is its own
            models_in_batch = 2 if cut < shared else 1
            assert _batch_desc(headers) == f'batch;desc="rows=2 models={models_in_batch}"'
            assert (got[0].shape, got[1].shape) == ((2, 5), (2, 7))
        # where the heads differ, the frontier is not the task's: refused, and why
        status, headers, body = await post(s, url, frame(cats, shared + 1, x, codec="f32", tasks=[dogs]))
        assert (status, problem_code(status, headers, body)) == (409, "head_not_shared")
        assert f"up to cut {shared}" in json.loads(body)["detail"]
        status, headers, body = await post(
            s, url, frame(cats, 1, x, codec="f32", tasks=[replace(dogs, graph_hash="0" * 16)])
        )
        assert (status, problem_code(status, headers, body)) == (409, "graph_mismatch")
        status, headers, body = await post(
            s, url, frame(cats, 1, x, codec="f32", tasks=[replace(dogs, name="birds")])
        )
        assert (status, problem_code(status, headers, body)) == (404, "unknown_model")
        assert "task 'birds'" in json.loads(body)["detail"]
        assert (
            server.registry.get_sample_value("splitinfer_requests_total", {"model": "dogs", "code": "ok"})
            is None
        )


async def test_tasks_the_frontier_is_not_for_are_refused_and_nothing_else_is_lost(tasks, tmp_path):
    """A task with other inputs is a 409 naming the fix, and neither model's requests are lost; a
    server that keeps a copy per model (--no-share-weights) still answers one upload for both."""
    _, models, bundles = tasks
    cats, dogs = bundles["cats"], bundles["dogs"]
    torch.manual_seed(3)
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    birds = si.compile(other, (torch.rand(1, 1, 16, 16),), name="birds")
    for name, bundle in (("cats", cats), ("dogs", dogs), ("birds", birds)):
        bundle.save(tmp_path / name)
    x = torch.rand(1, 3, 32, 32)
    async with running(tmp_path, share_weights=False) as server, aiohttp.ClientSession() as s:
        url = server.url + "/v1/models/cats/infer"
        for cut in (0, 1):
            status, headers, body = await post(s, url, frame(cats, cut, x, codec="f32", tasks=[dogs, birds]))
            assert (status, problem_code(status, headers, body)) == (409, "head_not_shared")
            detail = json.loads(body)["detail"]
            assert "'birds'" in detail and "nowhere (their inputs differ)" in detail
            assert "send one request per model" in detail
        get = server.registry.get_sample_value
        assert get("splitinfer_queue_depth") == 0.0 and get("splitinfer_inflight_requests") == 0.0
        # the same upload for the models that do share the head is answered, whole
        doc = await (await s.get(server.url + "/v1/models/cats")).json()
        assert set(doc["shared_heads"]) == {"dogs"} and doc["shared_heads"]["dogs"] >= _backbone_cuts(cats)
        status, headers, body = await post(s, url, frame(cats, 1, x, codec="f32", tasks=[dogs]))
        assert status == 200, body
        rheader, payload = protocol.decode_response(body)
        got = get_codec(rheader.codec).decode(payload)
        assert torch.allclose(got[0], _eager(models["cats"], x), atol=1e-5)
        assert torch.allclose(got[1], _eager(models["dogs"], x), atol=1e-5)
        assert _batch_desc(headers).endswith('models=1"')  # two copies of the backbone: two batches
        status, _, body = await post(
            s, server.url + "/v1/models/birds/infer", frame(birds, 1, torch.rand(1, 1, 16, 16))
        )
        assert status == 200, body


def _profiled(bundle: si.Bundle, segment_s: list[float], response_bytes: float) -> si.Bundle:
    profile = {"segments": {"1": {"median_s": segment_s}}, "response_bytes": response_bytes}
    return replace(bundle, profiles={"host": profile})


def test_the_decision_prices_one_upload_and_every_tail(tasks):
    _, _, bundles = tasks
    cats = _profiled(bundles["cats"], [0.001 * (i + 1) for i in range(bundles["cats"].n_segments)], 20.0)
    dogs = _profiled(bundles["dogs"], [0.002 * (i + 1) for i in range(bundles["dogs"].n_segments)], 28.0)
    client = EdgeClient("http://127.0.0.1:9", bundle=cats, tasks=[dogs], explore=0.0, fidelity_budget=0.0)
    try:
        assert client.tasks is not None
        s = client.tasks.shared_cut
        assert s >= _backbone_cuts(cats)
        est = Estimates(uplink_bps=8e6, downlink_bps=8e6, rtt_s=0.01, device_slowdown=3.0, cloud_slowdown=0.5)
        candidates = client.tasks.policy.explain(est).candidates
        alone = {(c.cut, c.codec): c for c in client.policy.explain(est).candidates}  # cats' own
        cat_seg, dog_seg = (
            cats.profiles["host"]["segments"]["1"]["median_s"],
            dogs.profiles["host"]["segments"]["1"]["median_s"],
        )
        for c in candidates:
            if c.cut == cats.last_cut:  # all on the device: the shared head once, then each task's rest
                assert c.feasible
                assert c.stages["head"] == pytest.approx(3.0 * (sum(cat_seg) + sum(dog_seg[s:])))
            elif c.cut > s:
                assert not c.feasible and "heads differ" in c.excluded
            elif c.codec == "f32":  # one upload of cut k's frontier, and both tails on the cloud
                assert c.stages["uplink"] == pytest.approx(alone[c.cut, c.codec].stages["uplink"])
                assert c.stages["tail"] == pytest.approx(0.5 * (sum(cat_seg[c.cut :]) + sum(dog_seg[s:])))
                assert c.stages["downlink"] == pytest.approx(48.0 * 8 / 8e6)
        # a fast link and a slow device send; a dead slow link keeps every task on the device
        assert client.tasks.policy.decide(replace(est, device_slowdown=50.0)).cut <= s
        assert client.tasks.policy.decide(replace(est, uplink_bps=1e3)).cut == cats.last_cut
    finally:
        client.close()
    with pytest.raises(ConfigError, match="no candidate is allowed"):  # a cut where the heads differ
        EdgeClient("http://127.0.0.1:9", bundle=cats, tasks=[dogs], policy="static", cut=s + 1, codec="f32")


async def test_edge_client_sends_one_frontier_for_two_tasks_and_falls_back_to_both(tasks):
    root, models, bundles = tasks
    cats, dogs = bundles["cats"], bundles["dogs"]
    x = torch.rand(1, 3, 32, 32)
    async with running(root) as server:
        probe = EdgeClient(server.url, bundle=cats, tasks=[dogs], policy="local")
        s = probe.tasks.shared_cut  # type: ignore[union-attr]
        probe.close()
        async with EdgeClient(
            server.url, bundle=cats, tasks=[root / "dogs"], policy="static", cut=s, codec="f32+zstd1"
        ) as client:
            many, trace = await client.ainfer_many(x, return_trace=True)
            one, single = await client.ainfer(x, return_trace=True)
        assert torch.allclose(one, _eager(models["cats"], x), atol=1e-5)
        assert set(many) == {"cats", "dogs"}
        assert torch.allclose(many["cats"], _eager(models["cats"], x), atol=1e-5)
        assert torch.allclose(many["dogs"], _eager(models["dogs"], x), atol=1e-5)
        assert (trace.ran_on, trace.fallback, trace.cut) == ("cloud", None, s)
        assert single.bytes_up < trace.bytes_up < single.bytes_up + 200  # one upload (the header names dogs)
        assert trace.bytes_down > single.bytes_down
        get = server.registry.get_sample_value
        assert get("splitinfer_requests_total", {"model": "cats", "code": "ok"}) == 2.0
        assert get("splitinfer_requests_total", {"model": "dogs", "code": "ok"}) is None
    # no cloud at all: every task's answer is computed on the device, from the frontier computed
    async with EdgeClient(
        f"http://127.0.0.1:{_free_port()}", bundle=cats, tasks=[dogs], policy="static", cut=s, codec="f32"
    ) as client:
        many, trace = await client.ainfer_many(x, return_trace=True)
        assert (trace.ran_on, trace.fallback) == ("device", "unreachable")
        assert torch.allclose(many["cats"], _eager(models["cats"], x), atol=1e-5)
        assert torch.allclose(many["dogs"], _eager(models["dogs"], x), atol=1e-5)
