"""Dynamic batching per (model, cut), deadlines and backpressure, against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
import pytest
import torch

from splitinfer.cloud._compute import HOST, Answer, finish, run_batch
from splitinfer.cloud._handlers import frame as v1_frame
from splitinfer.cloud._problem import Problem
from splitinfer.cloud._state import STATE
from splitinfer.compression import get_codec
from splitinfer.protocol import decode_request, parse_server_timing
from tests.support.cloud import (
    INFER,
    compute_held,
    frame,
    outputs,
    post,
    problem_code,
    running,
    until,
)


def _expected(cnn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cnn(x)


async def test_concurrent_requests_form_real_batches_and_answer_each_its_own(repository, cnn_bundle, cnn):
    async with running(repository, max_batch_size=8, compute_threads=1) as server:
        state = server.app[STATE]
        xs = [torch.rand(1, 3, 32, 32) for _ in range(12)]
        codecs = ["f32", "f32+zstd1"]
        bodies = [frame(cnn_bundle, 3, x, codec=codecs[i % 2], request_id=f"r{i}") for i, x in enumerate(xs)]
        async with aiohttp.ClientSession() as s:
            async with compute_held(server):  # every request queues before any batch forms
                tasks = [asyncio.create_task(post(s, server.url + INFER, b)) for b in bodies]
                await until(lambda: state.scheduler.queued >= len(bodies))
            answers = await asyncio.gather(*tasks)
        for x, (status, headers, body) in zip(xs, answers):
            assert status == 200
            assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
            assert {"queue", "decode", "compute", "encode", "total"} <= set(
                parse_server_timing(headers["Server-Timing"])
            )
        count = server.registry.get_sample_value("splitinfer_batch_size_count", {"model": "democnn"})
        rows = server.registry.get_sample_value("splitinfer_batch_size_sum", {"model": "democnn"})
        assert (count, rows) == (2.0, 12.0)  # 8 + 4: both codecs in the same batches
        full = server.registry.get_sample_value(
            "splitinfer_batch_size_bucket", {"model": "democnn", "le": "4.0"}
        )
        assert full == 1.0


async def test_queued_jobs_are_shared_out_over_the_free_compute_threads(repository, cnn_bundle, cnn):
    # 8 requests that arrive together on 2 free threads: two batches of 4, one per thread, rather
    # than one batch of 8 while the other thread idles.
    async with running(repository, max_batch_size=16, compute_threads=2) as server:
        state = server.app[STATE]
        xs = [torch.rand(1, 3, 32, 32) for _ in range(8)]
        async with aiohttp.ClientSession() as s:
            async with compute_held(server):
                tasks = [
                    asyncio.create_task(post(s, server.url + INFER, frame(cnn_bundle, 3, x))) for x in xs
                ]
                await until(lambda: state.scheduler.queued >= len(xs))
            answers = await asyncio.gather(*tasks)
        for x, (status, _, body) in zip(xs, answers):
            assert status == 200
            assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
        get = server.registry.get_sample_value
        assert get("splitinfer_batch_size_count", {"model": "democnn"}) == 2.0
        assert get("splitinfer_batch_size_bucket", {"model": "democnn", "le": "4.0"}) == 2.0


async def test_requests_at_different_cuts_batch_separately(repository, cnn_bundle, cnn):
    # One compute thread: with more, a cut's queued jobs are also shared out between threads.
    async with running(repository, max_batch_size=16, compute_threads=1) as server:
        state = server.app[STATE]
        cuts = [2, 5, 2, 5, 8, 2]
        xs = [torch.rand(2, 3, 32, 32) for _ in cuts]
        async with aiohttp.ClientSession() as s:
            async with compute_held(server):
                tasks = [
                    asyncio.create_task(post(s, server.url + INFER, frame(cnn_bundle, c, x)))
                    for c, x in zip(cuts, xs)
                ]
                await until(lambda: state.scheduler.queued >= len(cuts))
            answers = await asyncio.gather(*tasks)
        for x, (status, _, body) in zip(xs, answers):
            assert status == 200
            assert outputs(body)[0].shape == (2, 10)
            assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
        assert {key[1] for key in state.scheduler.batchers} == {2, 5, 8}
        assert server.registry.get_sample_value("splitinfer_batch_size_count", {"model": "democnn"}) == 3.0


async def test_a_lone_request_does_not_wait_for_the_queue_delay(repository, cnn_bundle):
    async with running(repository, max_queue_delay_ms=2000) as server, aiohttp.ClientSession() as s:
        body = frame(cnn_bundle, 4, torch.rand(1, 3, 32, 32))
        await post(s, server.url + INFER, body)
        t0 = time.perf_counter()
        status, headers, _ = await post(s, server.url + INFER, body)
        assert status == 200
        assert time.perf_counter() - t0 < 0.5
        assert parse_server_timing(headers["Server-Timing"])["queue"] < 0.5


async def test_deadline_that_passes_in_the_queue_is_504(repository, cnn_bundle, cnn):
    async with running(repository) as server, aiohttp.ClientSession() as s:
        state = server.app[STATE]
        x = torch.rand(1, 3, 32, 32)
        async with compute_held(server):
            t0 = time.perf_counter()
            status, headers, body = await post(s, server.url + INFER, frame(cnn_bundle, 4, x, deadline_s=0.2))
            waited = time.perf_counter() - t0
        assert status == 504
        assert problem_code(status, headers, body) == "deadline_exceeded"
        assert 0.15 < waited < 2.0  # answered when it expired, not when compute came back
        assert state.scheduler.queued == 0
        status, _, body = await post(s, server.url + INFER, frame(cnn_bundle, 4, x, deadline_s=5.0))
        assert status == 200
        assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
        reason = {"reason": "deadline_exceeded"}
        assert server.registry.get_sample_value("splitinfer_rejections_total", reason) == 1.0


async def test_full_queue_is_503_with_retry_after_and_admitted_requests_finish(repository, cnn_bundle, cnn):
    async with running(repository, max_queue_length=4, max_batch_size=2) as server:
        state = server.app[STATE]
        xs = [torch.rand(1, 3, 32, 32) for _ in range(4)]
        async with aiohttp.ClientSession() as s:
            async with compute_held(server):
                admitted = [
                    asyncio.create_task(post(s, server.url + INFER, frame(cnn_bundle, 6, x))) for x in xs
                ]
                await until(lambda: state.scheduler.queued >= 4)
                refused = await asyncio.gather(
                    *(post(s, server.url + INFER, frame(cnn_bundle, 6, xs[0])) for _ in range(5))
                )
                for status, headers, body in refused:
                    assert status == 503
                    assert problem_code(status, headers, body) == "overloaded"
                    assert int(headers["Retry-After"]) >= 1
                async with s.get(server.url + "/metrics") as r:
                    text = await r.text()
                assert "splitinfer_queue_depth 4.0" in text
                assert "splitinfer_inflight_requests 4.0" in text
            for x, (status, _, body) in zip(xs, await asyncio.gather(*admitted)):
                assert status == 200
                assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
            status, _, _ = await post(s, server.url + INFER, frame(cnn_bundle, 6, xs[0]))
            assert status == 200
        assert (
            server.registry.get_sample_value("splitinfer_rejections_total", {"reason": "overloaded"}) == 5.0
        )
        assert (
            server.registry.get_sample_value("splitinfer_requests_total", {"model": "democnn", "code": "ok"})
            == 5.0
        )


def _frames(bundle, specs, response_codec="f32"):
    out = []
    for cut, rows, codec in specs:
        header, payload = decode_request(frame(bundle, cut, torch.rand(rows, 3, 32, 32), codec=codec))
        out.append(v1_frame(header, payload, rows, response_codec))
    return out


def test_run_batch_concatenates_mixed_codecs_and_splits_rows_back(cnn_bundle):
    frames = _frames(cnn_bundle, [(5, 1, "f32"), (5, 3, "f32+zstd1"), (5, 2, "f32")])
    answers = run_batch(cnn_bundle, 5, frames, time.perf_counter(), HOST)
    assert all(isinstance(a, Answer) for a in answers)
    computes = {a.stages["compute"] for a in answers}
    assert len(computes) == 1  # one run of the tail for the whole batch
    for f, a in zip(frames, answers):
        assert a.batch_rows == 6
        frontier = get_codec(f.codec).decode(f.payload)
        want = cnn_bundle.run_segments(5, cnn_bundle.n_segments, frontier)[0]
        assert a.body is None  # small outputs are left for the event loop to encode
        finish(a, f)
        got = outputs(a.body)[0]
        assert got.shape[0] == f.rows
        assert torch.allclose(got, want, atol=1e-5)


def test_a_frame_that_does_not_decode_fails_alone(cnn_bundle):
    good, bad, other = _frames(cnn_bundle, [(4, 1, "f32+zstd1"), (4, 1, "f32+zstd1"), (4, 2, "f32")])
    broken = replace(bad, payload=memoryview(bytes(bad.payload)[:-7] + b"\x00" * 7))
    answers = run_batch(cnn_bundle, 4, [good, broken, other], time.perf_counter(), HOST)
    assert isinstance(answers[0], Answer) and isinstance(answers[2], Answer)
    assert isinstance(answers[1], Problem) and answers[1].code == "malformed_frame"
    assert answers[0].batch_rows == 3


@pytest.mark.parametrize("bad_rows", [1, 2])
def test_a_batch_that_fails_runs_its_requests_one_by_one(cnn_bundle, monkeypatch, bad_rows):
    frames = _frames(cnn_bundle, [(7, 1, "f32"), (7, bad_rows, "f32")])
    calls = []
    real = cnn_bundle.run_segments

    def flaky(start, stop, frontier):
        calls.append(frontier[0].shape[0])
        if frontier[0].shape[0] != 1:
            raise RuntimeError("boom")
        return real(start, stop, frontier)

    monkeypatch.setattr(cnn_bundle, "run_segments", flaky)
    answers = run_batch(cnn_bundle, 7, frames, time.perf_counter(), HOST)
    assert isinstance(answers[0], Answer)
    if bad_rows == 1:
        assert isinstance(answers[1], Answer)
    else:
        assert isinstance(answers[1], Problem) and answers[1].code == "internal"
        assert "boom" not in answers[1].detail
    assert calls[0] == 1 + bad_rows


def test_large_outputs_are_encoded_in_the_compute_thread(cnn_bundle, monkeypatch):
    from splitinfer.cloud import _compute

    monkeypatch.setattr(_compute, "SMALL_BYTES", 0)
    (f,) = _frames(cnn_bundle, [(6, 2, "f32")], response_codec="f32+zstd1")
    (answer,) = run_batch(cnn_bundle, 6, [f], time.perf_counter(), HOST)
    assert isinstance(answer, Answer) and answer.body is not None and answer.outputs is None
    assert outputs(answer.body)[0].shape == (2, 10)


async def test_light_batches_run_inline_once_measured(repository, cnn_bundle, cnn, monkeypatch):
    from splitinfer.cloud._batcher import Batcher

    inline = []
    real = Batcher._run_inline

    def spy(self, batch):
        inline.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(Batcher, "_run_inline", spy)
    async with running(repository, inline_below_ms=50) as server, aiohttp.ClientSession() as s:
        xs = [torch.rand(1, 3, 32, 32) for _ in range(4)]
        for x in xs:
            status, _, body = await post(s, server.url + INFER, frame(cnn_bundle, 8, x))
            assert status == 200
            assert torch.allclose(outputs(body)[0], _expected(cnn, x), atol=1e-5)
        batcher = server.app[STATE].scheduler.batchers[("democnn", 8, "1")]
        assert batcher.cost_per_row is not None
    assert inline == [1, 1, 1]  # the first batch ran on a compute thread, to measure the cost


async def test_a_closed_loop_of_clients_gets_batches_of_about_its_size(repository, cnn_bundle):
    async with running(repository, max_batch_size=8, max_queue_delay_ms=100, compute_threads=1) as server:
        body = frame(cnn_bundle, 4, torch.rand(1, 3, 32, 32))
        async with aiohttp.ClientSession() as s:

            async def client() -> None:
                for _ in range(4):
                    status, _, _ = await post(s, server.url + INFER, body)
                    assert status == 200

            await asyncio.gather(*(client() for _ in range(8)))
        count = server.registry.get_sample_value("splitinfer_batch_size_count", {"model": "democnn"})
        rows = server.registry.get_sample_value("splitinfer_batch_size_sum", {"model": "democnn"})
    assert rows == 32.0
    assert rows / count >= 4, (rows, count)  # without waiting for the expected ones: about 1-2
