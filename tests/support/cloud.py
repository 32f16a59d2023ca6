"""Helpers shared by the cloud tests (frames, a server in a context, answers); no tests here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import torch
from multidict import CIMultiDictProxy

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.cloud import ServerConfig
from splitinfer.cloud._state import STATE
from splitinfer.compression import get_codec
from splitinfer.tensors import specs_of
from tests.conftest import RunningServer, start_server

INFER = "/v1/models/democnn/infer"


def frame(
    bundle: Bundle,
    cut: int,
    x: torch.Tensor,
    *,
    codec: str = "f32+zstd1",
    deadline_s: float | None = None,
    request_id: str = "t",
    tasks: Sequence[Bundle] = (),
) -> bytes:
    """A request body carrying cut ``cut``'s frontier for the model input ``x`` (asking for
    ``tasks``' outputs too, when given)."""
    frontier = bundle.head(cut, x)
    payload = get_codec(codec).encode(frontier)
    header = protocol.RequestHeader(
        model=bundle.name,
        graph=bundle.graph_hash,
        cut=cut,
        codec=codec,
        tensors=specs_of(frontier),
        request_id=request_id,
        payload_nbytes=len(payload),
        deadline_s=deadline_s,
        tasks=tuple((t.name, t.graph_hash) for t in tasks),
    )
    return protocol.encode_request(header, payload)


def outputs(body: bytes) -> list[torch.Tensor]:
    header, payload = protocol.decode_response(body)
    return get_codec(header.codec).decode(payload)


@asynccontextmanager
async def running(repository: Path, **options: object) -> AsyncIterator[RunningServer]:
    runner, server = await start_server(ServerConfig(repository=repository, **options))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        await runner.cleanup()


async def post(
    session: aiohttp.ClientSession, url: str, body: object, **kw: object
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with session.post(url, data=body, **kw) as r:  # type: ignore[arg-type]
        return r.status, r.headers, await r.read()


def problem_code(status: int, headers: CIMultiDictProxy[str], body: bytes) -> str:
    """The problem code of an error answer, checking that it is problem+json with that status."""
    assert headers["Content-Type"].startswith(protocol.PROBLEM_CONTENT_TYPE), (status, body[:200])
    doc = json.loads(body)
    assert doc["status"] == status
    assert "Traceback" not in doc["detail"]
    return doc["code"]


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds (polling), failing after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


@asynccontextmanager
async def compute_held(server: RunningServer) -> AsyncIterator[None]:
    """Hold every compute slot of ``server`` (requests queue) until the block ends."""
    scheduler = server.app[STATE].scheduler
    for _ in range(scheduler.threads):
        await scheduler.slots.acquire()
    try:
        yield
    finally:
        for _ in range(scheduler.threads):
            scheduler.slots.release()
