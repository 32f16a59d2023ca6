"""The edge's request pipeline through an in-process transport: hedging, back-off, probing and
fallback without sockets (STYLE.md item 4; httpx's MockTransport is the model)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from multidict import CIMultiDict

import splitinfer as si
from splitinfer import protocol
from splitinfer.compression import get_codec
from splitinfer.edge import ClientConfig, EdgeClient, InProcessTransport, TransportRequest, TransportResponse
from splitinfer.edge._cloud_api import MAX_RETRY_AFTER_S
from splitinfer.edge._device import Device, MeasuredEmulation
from splitinfer.edge._targets import make_tasks
from splitinfer.errors import CloudUnavailableError, ConfigError
from splitinfer.lab._demo import demo_model
from splitinfer.partitioner import CostModel, Decision, Estimates, Explanation, make_policy

FAST_LINK = Estimates(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.0005)
X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return demo_model(seed=0)


@pytest.fixture(scope="module")
def bundle(cnn: torch.nn.Module) -> si.Bundle:
    return si.compile(cnn, (torch.rand(1, 3, 32, 32),), name="democnn", codecs=["f32"], profile=True)


def want(cnn: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return cnn(X)


def cloud(bundle: si.Bundle, infer: Callable[[TransportRequest], object] | None = None):
    """A handler playing the cloud: the model's metadata, link probes (204), and inference by
    running the tail here (or ``infer(request)`` instead)."""

    def answer(request: TransportRequest) -> TransportResponse:
        header, payload = protocol.decode_request(request.body)
        frontier = get_codec(header.codec).decode(bytes(payload), max_nbytes=1 << 24)
        outputs = bundle.run_segments(header.cut, bundle.n_segments, frontier)
        body = get_codec("f32").encode(list(outputs))
        rheader = protocol.ResponseHeader(header.request_id, "f32", si.tensors.specs_of(outputs), len(body))
        timing = CIMultiDict({"Server-Timing": "queue;dur=1, decode;dur=1, compute;dur=2, total;dur=4"})
        return TransportResponse(200, protocol.encode_response(rheader, body), timing)

    def handler(request: TransportRequest):
        if request.method == "GET":
            return TransportResponse(200, json.dumps({"graph_hash": bundle.graph_hash}).encode())
        if request.path == "/v1/link-probe":
            return TransportResponse(204, b"")
        return infer(request) if infer is not None else answer(request)

    return handler


def infers(transport: InProcessTransport) -> list[TransportRequest]:
    return [r for r in transport.requests if r.path.endswith("/infer")]


async def test_a_request_is_answered_by_the_cloud_with_its_stage_times(bundle, cnn):
    transport = InProcessTransport(cloud(bundle))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=2, codec="f32", hedge=False
    ) as client:
        out, trace = await client.ainfer(X, return_trace=True)
    assert torch.allclose(out, want(cnn), atol=1e-6)
    assert trace.ran_on == "cloud" and trace.fallback is None and trace.cut == 2
    assert trace.stages["tail"] == pytest.approx(0.002) and trace.stages["queue"] == pytest.approx(0.001)
    assert trace.bytes_up == len(infers(transport)[0].body) and transport.closed
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.fallback = "x"  # type: ignore[misc]


async def test_an_overdue_answer_is_hedged_and_the_moot_request_ends_with_the_client(bundle, cnn):
    never = asyncio.Event()

    async def hang(request: TransportRequest) -> TransportResponse:
        await never.wait()
        raise AssertionError("unreachable")

    transport = InProcessTransport(cloud(bundle, hang))
    client = EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=1, codec="f32",
        deadline_s=60.0, prior=FAST_LINK,
    )  # fmt: skip
    async with client:
        out, trace = await asyncio.wait_for(client.ainfer(X, return_trace=True), 30)
        assert trace.fallback == "hedge" and trace.ran_on == "device"
        assert trace.predicted["hedge_after"] > 0 and "local_tail" in trace.stages
        assert torch.allclose(out, want(cnn), atol=1e-6)
        assert len(client._hedger.moot) == 1
    assert not client._hedger.moot


async def test_retry_after_keeps_requests_on_the_device_without_asking(bundle, cnn):
    def shed(request: TransportRequest) -> TransportResponse:
        status, body = protocol.problem_body("overloaded", "busy")
        return TransportResponse(status, body, CIMultiDict({"Retry-After": "30"}))

    transport = InProcessTransport(cloud(bundle, shed))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=2, codec="f32", hedge=False
    ) as client:
        first = (await client.ainfer(X, return_trace=True))[1]
        second = (await client.ainfer(X, return_trace=True))[1]
    assert (first.fallback, second.fallback) == ("shed", "backoff")
    assert len(infers(transport)) == 1  # the second was not sent


async def test_a_retry_after_longer_than_the_cap_is_capped(bundle):
    def shed(request: TransportRequest) -> TransportResponse:
        status, body = protocol.problem_body("overloaded", "busy")
        return TransportResponse(status, body, CIMultiDict({"Retry-After": "100000"}))

    transport = InProcessTransport(cloud(bundle, shed))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=2, codec="f32", hedge=False
    ) as client:
        await client.ainfer(X)
        link = client._pipeline.link
        assert 0 < link.back_at - link.clock() <= MAX_RETRY_AFTER_S


async def test_an_unreachable_cloud_opens_the_breaker(bundle, cnn):
    def down(request: TransportRequest) -> TransportResponse:
        raise CloudUnavailableError("cannot reach the cloud")

    transport = InProcessTransport(cloud(bundle, down))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=2, codec="f32", hedge=False
    ) as client:
        reasons = [(await client.ainfer(X, return_trace=True))[1].fallback for _ in range(4)]
        assert client.breaker.state == "open"
    assert reasons == ["unreachable"] * 3 + ["circuit_open"]
    assert len(infers(transport)) == 3


async def test_a_stale_link_is_probed_and_a_server_without_probes_is_not_asked_again(bundle):
    transport = InProcessTransport(cloud(bundle))
    async with EdgeClient("http://cloud", bundle=bundle, transport=transport, policy="adaptive") as client:
        assert client.estimator.needs_rtt_probe()
        await client.ainfer(X)
        for _ in range(200):
            if not client.estimator.needs_rtt_probe():
                break
            await asyncio.sleep(0.01)
        assert any(r.path == "/v1/link-probe" for r in transport.requests)
        assert not client.estimator.needs_rtt_probe()

    def no_probes(request: TransportRequest):
        if request.path == "/v1/link-probe":
            return TransportResponse(404, b"")
        return cloud(bundle)(request)

    transport = InProcessTransport(no_probes)
    async with EdgeClient("http://cloud", bundle=bundle, transport=transport, policy="adaptive") as client:
        await client.ainfer(X)
        for _ in range(200):
            if not client.probe:
                break
            await asyncio.sleep(0.01)
        assert not client.probe


def test_keywords_a_policy_object_cannot_take_are_refused(bundle):
    policy = make_policy("local", bundle)
    with pytest.raises(ConfigError, match="some_typo"):
        EdgeClient("http://cloud", bundle=bundle, policy=policy, some_typo=1)


class Recording(MeasuredEmulation):
    def __init__(self, slowdown: float):
        super().__init__(slowdown)
        self.took: list[float] = []

    def extra_s(self, took: float, elapsed: float, profiled_s: float | None) -> float:
        self.took.append(took)
        return 0.0


async def test_emulation_scales_only_the_devices_model_work(bundle):
    """Issue 31 item 5: a cut-0 head runs no model code, so nothing of it is emulated (the
    input check was scaled by N before: 43-45 ms at N=200)."""
    emulation = Recording(200.0)
    device = Device(emulation)
    frontier, _ = await device.head(bundle, 0, (X,), profiled_s=None)
    assert emulation.took == [] and frontier[0] is X
    await device.head(bundle, 3, (X,), profiled_s=None)
    assert len(emulation.took) == 1


async def test_a_cut_0_request_on_a_slow_device_takes_no_emulated_head_time(bundle):
    transport = InProcessTransport(cloud(bundle))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=0, codec="f32",
        hedge=False, device_slowdown=5000.0, deadline_s=None,
    ) as client:  # fmt: skip
        _, trace = await client.ainfer(X, return_trace=True)
    # the input check alone takes 0.2-1.5 ms here: scaled by 5000 that was 1-7 s of "head"
    assert trace.compared()["head"][1] < 0.25


async def test_each_sent_head_corrects_its_own_cut_and_feeds_the_device_once(bundle):
    """Issue 28 item 5: the head time of a request sent at cut 2 corrects cut 2's price; the
    device's speed is fed once per request (head and encode together), not twice."""
    transport = InProcessTransport(cloud(bundle))
    async with EdgeClient(
        "http://cloud", bundle=bundle, transport=transport, policy="static", cut=2, codec="f32", hedge=False
    ) as client:
        heads = [(await client.ainfer(X, return_trace=True))[1].stages["head"] for _ in range(3)]
        est = client.estimator
        profiled = float(CostModel(bundle).head_by_cut[2])
        mean, count = est.cut_heads[2]
        assert count == 3 and list(est.cut_heads) == [2]
        ratios = [math.log(h / profiled) for h in heads]
        assert min(ratios) - 1e-9 <= mean <= max(ratios) + 1e-9
        assert est.summary()["device_samples"] == 3
        assert len(est.estimates().head_slowdown) == bundle.last_cut + 1


# -- a set of tasks, priced through the partitioner's public operations --------------------


def twin_of(bundle: si.Bundle, name: str) -> si.Bundle:
    """The same model under another name: it shares every segment with ``bundle``."""
    twin = copy.copy(bundle)
    twin.name = name
    return twin


def test_a_set_of_tasks_is_priced_for_one_upload_and_every_tail(bundle):
    twin = twin_of(bundle, "twin")
    policy = make_policy("static", bundle, cut=2, codec="f32")
    before = policy.model.tail.copy()
    tasks = make_tasks(bundle, [twin], policy, ClientConfig(), lambda b: b)
    assert tasks.shared_cut == bundle.last_cut and tasks.tasks == (("twin", bundle.graph_hash),)
    model = tasks.policy.model  # type: ignore[attr-defined]
    # the twin shares every segment: it adds no compute, only its answer to the download
    assert np.array_equal(model.tail, policy.model.tail) and np.array_equal(model.head, policy.model.head)
    assert model.response_bytes == 2 * policy.model.response_bytes > 0
    assert np.array_equal(policy.model.tail, before)  # the client's own model is left alone
    assert tasks.policy.decide(FAST_LINK).cut == 2 and list(tasks.policy.rows) == list(policy.rows)


class AlwaysLocal:
    """A Policy that is not one of make_policy's."""

    name = "mine"

    def __init__(self, bundle: si.Bundle):
        self.inner = make_policy("local", bundle)

    def decide(self, est: Estimates) -> Decision:
        return self.inner.decide(est)

    def explain(self, est: Estimates) -> Explanation:
        return self.inner.explain(est)


async def test_a_custom_policy_serves_a_set_of_tasks(bundle, cnn):
    twin = twin_of(bundle, "twin")
    client = EdgeClient("http://cloud", bundle=bundle, policy=AlwaysLocal(bundle), tasks=[twin])
    assert client.tasks is not None and isinstance(client.tasks.policy, AlwaysLocal)
    answers = await client.ainfer_many(X)
    assert set(answers) == {"democnn", "twin"}
    assert torch.allclose(answers["twin"], want(cnn), atol=1e-6)
    await client.aclose()
