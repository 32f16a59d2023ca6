"""``splitinfer demo``: one edge client, one real cloud server on 127.0.0.1, real requests."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import torch
from aiohttp import web
from torch import nn

from splitinfer.bundle import Bundle

__all__ = ["demo_model", "run_demo"]


def demo_model(seed: int = 0) -> nn.Sequential:
    """A small CNN classifier for 3x32x32 images, with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()


async def _serve_and_send(bundle_dir: Path, model: nn.Module, requests: int, cut: int, codec: str) -> int:
    from splitinfer.cloud import ServerConfig, create_app
    from splitinfer.edge import EdgeClient

    config = ServerConfig(repository=bundle_dir.parent, port=0)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}"
        print(f"cloud server listening on {url}")
        bundle = Bundle.load(bundle_dir, upto_cut=cut)
        print(f"edge runs segments 0..{cut - 1}, the cloud the rest: {bundle.cuts[cut].name}")
        print(
            f"{'request':>7}  {'bytes up':>9}  {'bytes down':>10}  {'round trip':>10}  "
            f"{'max |diff|':>10}  top-1"
        )
        generator = torch.Generator().manual_seed(1)
        worst = 0.0
        async with EdgeClient(
            url, bundle=bundle, policy="static", cut=cut, codec=codec, max_cut=cut
        ) as client:
            for i in range(requests):
                x = torch.rand(1, 3, 32, 32, generator=generator)
                out = await client.ainfer(x)
                with torch.no_grad():
                    want = model(x)
                diff = float((out - want).abs().max())
                worst = max(worst, diff)
                trace = client.last_trace
                assert trace is not None
                total_ms = sum(trace.stages[s] for s in ("head", "encode", "network", "decode")) * 1000
                same = "same" if out.argmax() == want.argmax() else "DIFFERENT"
                print(
                    f"{i + 1:>7}  {trace.bytes_up:>9}  {trace.bytes_down:>10}  {total_ms:>8.1f}ms  "
                    f"{diff:>10.2e}  {same}"
                )
        ok = worst <= 1e-5
        print(f"split outputs {'match' if ok else 'DO NOT match'} the unsplit model (max |diff| {worst:.2e})")
        return 0 if ok else 1
    finally:
        await runner.cleanup()


def run_demo(requests: int = 5, cut: int | None = None, codec: str = "f32+zstd1") -> int:
    from splitinfer.partitioner import compile

    model = demo_model()
    bundle = compile(model, (torch.rand(1, 3, 32, 32),), name="democnn")
    cut = bundle.last_cut // 2 if cut is None else cut
    bundle.cut(cut)
    print(f"compiled democnn: {len(bundle.cuts)} cuts, graph {bundle.graph_hash}")
    with tempfile.TemporaryDirectory(prefix="splitinfer-demo-") as tmp:
        bundle_dir = bundle.save(Path(tmp) / "democnn")
        return asyncio.run(_serve_and_send(bundle_dir, model, requests, cut, codec))
