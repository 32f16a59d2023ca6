"""One rule for broken bundles, whatever the damage (docs/server.md, "Broken bundles"): at the
start it stops the server with an error naming the directory; at a reload the version is
refused (logged, counted as a failed load) and what was served keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from splitinfer.bundle import Bundle
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._repository import load_repository, reload_models
from splitinfer.errors import BundleError

CPU = torch.device("cpu")


def _flip_a_segment_byte(path: Path) -> None:
    segment = path / "segment_000.pt2"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))


def _garble_the_manifest(path: Path) -> None:
    (path / "manifest.json").write_text('{"format": "splitinfer-bundle", "name": ')


def _manifest_of_another_format(path: Path) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**doc, "format": "something-else"}))


def _lose_a_segment(path: Path) -> None:
    (path / "segment_001.pt2").unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped segment byte": _flip_a_segment_byte,
    "unreadable manifest": _garble_the_manifest,
    "manifest of another format": _manifest_of_another_format,
    "missing segment": _lose_a_segment,
}


@pytest.fixture(params=list(DAMAGE), ids=list(DAMAGE))
def damage(request: pytest.FixtureRequest) -> Callable[[Path], None]:
    return DAMAGE[request.param]


def test_any_damage_stops_the_start_and_names_the_directory(tmp_path, cnn_bundle: Bundle, damage):
    cnn_bundle.save(tmp_path / "good")
    broken = tmp_path / "broken" / "1"
    cnn_bundle.save(broken)
    damage(broken)
    with pytest.raises(BundleError, match=str(broken)):
        load_repository(tmp_path, CPU)


async def test_any_damage_at_a_reload_is_refused_and_counted_while_the_served_version_stays(
    tmp_path, cnn_bundle: Bundle, damage
):
    cnn_bundle.save(tmp_path / "democnn" / "1")
    repo = load_repository(tmp_path, CPU)
    metrics = ServerMetrics(CollectorRegistry(), "test")
    repo.on_load = metrics.observe_load
    cnn_bundle.save(tmp_path / "democnn" / "2")
    damage(tmp_path / "democnn" / "2")
    with ThreadPoolExecutor(1) as pool:
        await reload_models(repo, pool)
        await reload_models(repo, pool)  # unchanged: not refused (nor counted) again
    assert [s.version for s in repo.versions("democnn")] == ["1"]
    failed = metrics.registry.get_sample_value(
        "splitinfer_model_loads_total", {"model": "democnn", "result": "failed"}
    )
    assert failed == 1.0
