"""Weights shared across models: two models fine-tuned from one backbone keep its segments once."""

from __future__ import annotations

import aiohttp
import pytest
import torch
from torch import nn

import splitinfer as si
from splitinfer.cloud._state import STATE
from tests.test_cloud_support import frame, outputs, post, running


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
