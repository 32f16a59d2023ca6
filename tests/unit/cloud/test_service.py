"""The inference service in-process: no sockets, no HTTP, a toy protocol adapter.

The adapter here speaks neither /v1 nor /v2: its "wire" is a request record and raw float32
bytes. What the service owns (admission, drain, pinning, deadline, scheduling, stage times,
metrics, Server-Timing) is checked through it alone.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from splitinfer.cloud import ServerConfig
from splitinfer.cloud._batcher import Scheduler
from splitinfer.cloud._compute import Answer, Frame
from splitinfer.cloud._drain import Drain
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._problem import Problem
from splitinfer.cloud._repository import Served, load_repository
from splitinfer.cloud._service import Call, InferenceService, Reply, Work
from splitinfer.cloud._state import ServerState
from splitinfer.protocol import parse_server_timing
from splitinfer.tensors import specs_of

CPU = torch.device("cpu")
CLOUD = Path(__file__).resolve().parents[3] / "cloud"


def _imports(module: Path) -> set[str]:
    """Every module (and ``from x import name`` as ``x.name``) that ``module`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return out


@pytest.mark.parametrize("module", ["_service", "_compute", "_batcher"])
def test_the_service_and_the_compute_layer_know_no_wire(module):
    wires = ("aiohttp", "splitinfer.protocol", "splitinfer.cloud._handlers", "splitinfer.cloud._oip")
    imported = _imports(CLOUD / f"{module}.py")
    assert not {m for m in imported if m.startswith(wires)}, module


def test_the_cloud_imports_no_private_torch_module():
    for path in CLOUD.glob("*.py"):
        private = {m for m in _imports(path) if m.startswith("torch") and "._" in m}
        assert not private, (path.name, private)


@pytest.fixture
async def service(repository: Path) -> AsyncIterator[InferenceService]:
    config = ServerConfig(repository=repository, max_queue_length=2, max_body_bytes=4096)
    pool = ThreadPoolExecutor(1)
    scheduler = Scheduler(pool, compute_threads=1, max_batch_size=8, max_delay_s=0.0, device=CPU)
    metrics = ServerMetrics(CollectorRegistry(), "test")
    state = ServerState(config, metrics, load_repository(repository, CPU), pool, scheduler, Drain())
    try:
        yield InferenceService(state)
    finally:
        await scheduler.close()
        pool.shutdown()


def _raw(answers: Sequence[Answer]) -> Reply:
    """The toy protocol's answer: the first output's float32 bytes."""
    (answer,) = answers
    assert answer.outputs is not None
    return Reply(answer.outputs[0].numpy().tobytes(), "application/x-toy", {"X-Toy": "1"})


def _call(served: Served, cut: int, x: torch.Tensor, **work: object) -> Call:
    """A call of the toy protocol: the body is ignored, the frontier of ``x`` at ``cut`` is sent."""
    frontier = served.bundle.head(cut, x)

    async def read() -> bytes:
        return b"toy"

    async def parse(body: bytes) -> Work:
        frame = Frame(cut, specs_of(frontier), x.shape[0], "r1", frontier=frontier)
        return Work(served, frame, _raw, label="toy", **work)  # type: ignore[arg-type]

    return Call(read, parse, declared_bytes=3)


def _tail(served: Served, cut: int, x: torch.Tensor) -> np.ndarray:
    bundle = served.bundle
    return bundle.run_segments(cut, bundle.n_segments, bundle.head(cut, x))[0].numpy()


async def test_a_request_of_any_protocol_is_computed_timed_and_counted(service, cnn_bundle):
    served = service.find("democnn")
    x = torch.rand(2, 3, 32, 32)
    result = await service.infer(_call(served, 3, x))
    got = np.frombuffer(result.reply.body, dtype=np.float32).reshape(2, -1)
    assert np.allclose(got, _tail(served, 3, x), atol=1e-5)
    assert (result.reply.content_type, dict(result.reply.headers)) == ("application/x-toy", {"X-Toy": "1"})
    assert list(result.stages) == ["queue", "decode", "compute", "encode", "receive", "total"]
    assert parse_server_timing(result.timing).keys() == result.stages.keys()
    assert 'batch;desc="rows=2 models=1"' in result.timing
    registry = service.state.metrics.registry
    labels = {"model": "democnn", "cut": "3", "codec": "toy"}
    assert registry.get_sample_value("splitinfer_request_payload_bytes_sum", labels) == 3.0
    assert service.state.drain.inflight == 0 and service.state.scheduler.waiting == 0


async def test_admission_refuses_before_the_body_is_read(service):
    served = service.find("democnn")
    reads: list[str] = []

    async def read() -> bytes:
        reads.append("read")
        return b""

    async def parse(body: bytes) -> Work:
        raise AssertionError("never parsed")

    too_large = Call(read, parse, declared_bytes=4097)
    with pytest.raises(Problem) as refused:
        await service.infer(too_large)
    assert refused.value.code == "too_large"
    service.state.drain.begin()
    with pytest.raises(Problem) as refused:
        await service.infer(_call(served, 1, torch.rand(1, 3, 32, 32)))
    assert (refused.value.code, refused.value.headers) == ("not_ready", {"Retry-After": "1"})
    assert reads == [] and service.state.drain.inflight == 0


async def test_a_full_queue_is_refused_and_the_adapters_own_check_runs_after_admission(service):
    checks: list[str] = []

    def check() -> None:
        checks.append("checked")
        raise Problem("unsupported_media_type", "toy bodies only")

    async def never() -> bytes:
        raise AssertionError("never read")

    call = Call(never, never, declared_bytes=1, check=check)  # type: ignore[arg-type]
    with pytest.raises(Problem, match="toy bodies only"):
        await service.infer(call)
    service.state.scheduler.arriving = service.state.config.max_queue_length
    with pytest.raises(Problem) as refused:
        await service.infer(call)
    assert refused.value.code == "overloaded" and checks == ["checked"]


async def test_the_held_version_stays_in_flight_until_the_answer(service):
    served = service.find("democnn")
    seen: list[tuple[int, int]] = []
    call = _call(served, 2, torch.rand(1, 3, 32, 32))

    async def read() -> bytes:
        seen.append((served.inflight, service.state.drain.inflight))
        return b"toy"

    await service.infer(Call(read, call.parse, hold=served))
    assert seen == [(1, 1)]
    assert (served.inflight, service.state.drain.inflight) == (0, 0)


async def test_a_deadline_that_passed_while_reading_is_refused_before_queueing(service):
    served = service.find("democnn")
    call = _call(served, 2, torch.rand(1, 3, 32, 32), deadline_s=0.001)

    async def slow_read() -> bytes:
        await asyncio.sleep(0.01)
        return b"toy"

    with pytest.raises(Problem) as refused:
        await service.infer(Call(slow_read, call.parse))
    assert refused.value.code == "deadline_exceeded"
    assert service.state.scheduler.queued == 0


async def test_lookups_pin_by_version_and_by_graph_with_errors_that_say_what_is_served(service, cnn_bundle):
    assert service.find("democnn", "1") is service.pin("democnn", cnn_bundle.graph_hash)
    with pytest.raises(Problem, match="no model 'nosuch' here"):
        service.find("nosuch")
    with pytest.raises(Problem, match=r"has version\(s\) 1 here, not '7'"):
        service.find("democnn", "7")
    with pytest.raises(Problem) as refused:
        service.pin("democnn", "0" * 16)
    assert refused.value.code == "graph_mismatch" and "(version 1)" in refused.value.detail
    with pytest.raises(Problem) as refused:
        service.tasks(service.find("democnn"), 2, [("other", "0" * 16)])
    assert refused.value.code == "unknown_model" and refused.value.detail.startswith("task 'other'")


async def test_an_encoded_frontier_is_decoded_by_the_service_and_timed_as_decode(service):
    from splitinfer.compression import get_codec

    served = service.find("democnn")
    x = torch.rand(1, 3, 32, 32)
    frontier = served.bundle.head(4, x)
    payload = memoryview(get_codec("f32+zstd1").encode(frontier))
    decoded: list[bool] = []

    def respond(answers: Sequence[Answer]) -> Reply:
        decoded.append(True)
        return _raw(answers)

    async def parse(body: bytes) -> Work:
        frame = Frame(4, specs_of(frontier), 1, codec="f32+zstd1", payload=payload)
        return Work(served, frame, respond)

    async def read() -> bytes:
        return b""

    result = await service.infer(Call(read, parse))
    got = np.frombuffer(result.reply.body, dtype=np.float32).reshape(1, -1)
    assert np.allclose(got, _tail(served, 4, x), atol=1e-5)
    assert result.stages["decode"] > 0 and decoded == [True]
