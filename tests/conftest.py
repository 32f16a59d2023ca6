"""Shared fixtures: a real compiled bundle and a real server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

import splitinfer as si
from splitinfer.cloud import ServerConfig, create_app
from splitinfer.lab import demo_model

#: The repository root, which `python -m pytest` puts on sys.path as the working directory: the
#: rooms' folders there (compression/, edge/, ...) would import as top-level packages, and on
#: Python 3.14 `compression` is the standard library's. The package is imported as installed.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


@pytest.fixture(scope="session")
def cnn() -> torch.nn.Sequential:
    return demo_model(seed=0)


#: Compiles for torch alone, as every test whose edge and cloud run torch (the default where
#: torch is installed) needs: the ONNX export costs seconds a compile. ``onnx_*`` fixtures and
#: the tests of ONNX Runtime itself export it.
TORCH_ONLY = ("torch",)


@pytest.fixture(scope="session")
def cnn_bundle(cnn: torch.nn.Sequential) -> si.Bundle:
    return si.compile(cnn, (torch.rand(1, 3, 32, 32),), name="democnn", runtimes=TORCH_ONLY)


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, cnn_bundle: si.Bundle) -> Path:
    root = tmp_path_factory.mktemp("repo")
    cnn_bundle.save(root / "democnn")
    return root


@pytest.fixture(scope="session")
def onnx_cnn_bundle(cnn: torch.nn.Sequential) -> si.Bundle:
    """The demo CNN with its ONNX graph too (ONNX Runtime's tests)."""
    return si.compile(cnn, (torch.rand(1, 3, 32, 32),), name="democnn", runtimes=("torch", "onnxruntime"))


@pytest.fixture(scope="session")
def onnx_repository(tmp_path_factory: pytest.TempPathFactory, onnx_cnn_bundle: si.Bundle) -> Path:
    root = tmp_path_factory.mktemp("onnx-repo")
    onnx_cnn_bundle.save(root / "democnn")
    return root


@dataclass
class RunningServer:
    url: str
    registry: CollectorRegistry
    app: web.Application


async def start_server(config: ServerConfig, port: int = 0) -> tuple[web.AppRunner, RunningServer]:
    registry = CollectorRegistry()
    app = create_app(config, registry=registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, RunningServer(f"http://127.0.0.1:{port}", registry, app)


@pytest.fixture
async def server(repository: Path) -> AsyncIterator[RunningServer]:
    runner, running = await start_server(ServerConfig(repository=repository, max_body_bytes=1 << 20))
    try:
        yield running
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def efficientnet() -> tuple[torch.nn.Module, si.Bundle]:
    """EfficientNet-Lite0 with its real ImageNet weights (shipped in a registry package)."""
    from splitinfer.lab._models import efficientnet_lite0

    model = efficientnet_lite0()
    return model, si.compile(model, (torch.randn(1, 3, 224, 224),), name="efficientnet-lite0")
