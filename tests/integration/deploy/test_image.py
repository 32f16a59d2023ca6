"""The server images (deploy/Dockerfile, ``make image``), started for real with podman or docker.

Marker ``image``: left out of ``make test``; ``make test-image`` (and .ci/run) builds both
variants and runs these. Each variant is checked: non-root with the bundle mounted read-only;
readiness answers and the image's own HEALTHCHECK passes inside; an EdgeClient here gets the
float model's answers through it; SIGTERM under load drains (0 lost, exit 0); a bad mount stops
it with one clear line. Then three ONNX Runtime containers behind the shipped HAProxy config,
one killed with kill -9 and one stopped with SIGTERM under load: 0 lost, 0 wrong.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from splitinfer.bundle import Bundle
from splitinfer.edge import EdgeClient
from tests.support.deploy import deploy_script, scenarios

containers = deploy_script("containers.py")
Container, engine, image, image_exists = (
    containers.Container,
    containers.engine,
    containers.image,
    containers.image_exists,
)
readable_copy, run_once = containers.readable_copy, containers.run_once
Figures, Traffic, cluster = scenarios.Figures, scenarios.Traffic, scenarios.cluster

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def eng() -> str:
    found = engine()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no podman or docker: apt-get install podman runc")
        pytest.skip("no podman or docker on PATH")
    return found


def _image(eng: str, variant: str) -> str:
    name = image.image_name(variant)
    if not image_exists(eng, name):
        pytest.fail(f"image {name} is not built: make image IMAGE_BASE=debian-local (or make test-image)")
    return name


@pytest.fixture(scope="module")
def models(onnx_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle repository (with its ONNX graph: the default image runs ONNX Runtime
    tails), readable by the image's user (uid 10001)."""
    return readable_copy(onnx_repository, tmp_path_factory.mktemp("image") / "models")


@pytest.fixture(scope="module")
def bundle(onnx_repository: Path) -> Bundle:
    return Bundle.load(onnx_repository / "democnn")


def _cases(model: torch.nn.Module, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.rand(1, 3, 32, 32, generator=gen) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x)) for x in inputs]


@pytest.mark.parametrize("variant", ["onnxruntime", "torch"])
def test_the_image_serves_as_a_non_root_user_from_a_read_only_bundle(
    eng, variant, models, bundle, cnn, tmp_path
):
    with Container(eng, _image(eng, variant), models, tmp_path, f"si-test-{variant}") as c:
        c.wait_ready()
        assert c.exec("id", "-u").stdout.strip() == "10001"
        write = c.exec("sh", "-c", "touch /models/democnn/x")
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        assert c.healthcheck() == 0, c.output()
        with EdgeClient(
            c.url, bundle=bundle, policy="static", cut=2, codec="f32", deadline_s=None, hedge=False
        ) as client:
            for x, want in _cases(cnn):
                y = client.infer(x)
                assert client.last_trace is not None and client.last_trace.fallback is None
                assert torch.allclose(y, want, rtol=1e-4, atol=1e-5)
    assert "Traceback" not in c.output(), c.output()


@pytest.mark.parametrize("variant", ["onnxruntime", "torch"])
def test_sigterm_under_load_drains_with_nothing_lost(eng, variant, models, bundle, cnn, tmp_path):
    with Container(eng, _image(eng, variant), models, tmp_path, f"si-drain-{variant}") as c:
        c.wait_ready()
        with Traffic(c.url, bundle, cnn, clients=3) as traffic:
            t0 = time.monotonic()
            traffic.wait_for(30, t0)
            c.signal("SIGTERM")
            status = c.wait(60)
            signalled = time.monotonic()
            traffic.wait_for(10, signalled)  # after the exit: finished on the device
        figures = Figures.of(traffic.since(t0))
    assert status == 0, c.output()
    assert figures.errors == 0, figures.error_samples
    assert figures.wrong == 0
    assert figures.requests - figures.fell_back >= 30  # the container answered before it stopped
    assert "Traceback" not in c.output(), c.output()


def _one_line_error(status: int, output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip() and "level=" not in line]
    assert status != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, output
    return errors[0]


def test_a_bad_mount_stops_the_container_with_one_clear_line(eng, models, tmp_path):
    name = _image(eng, "onnxruntime")
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    empty.chmod(0o755)
    line = _one_line_error(*run_once(eng, name, empty))
    assert "no bundle in /models" in line, line

    corrupt = readable_copy(models, tmp_path / "corrupt")
    graph = next((corrupt / "democnn").glob("*.onnx*"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    line = _one_line_error(*run_once(eng, name, corrupt))
    assert "sha256" in line or "hash" in line, line


def test_three_containers_behind_haproxy_lose_nothing_to_kill_9_and_sigterm(
    eng, models, bundle, cnn, tmp_path
):
    name = _image(eng, "onnxruntime")
    phases, status, output = containers.faults_behind_haproxy(
        eng, name, models, tmp_path, bundle, cnn, 30, 60
    )
    killed_phase, drained_phase = phases["kill -9 r2"], phases["SIGTERM r1"]
    for what, figures in (("kill -9", killed_phase), ("SIGTERM", drained_phase)):
        assert figures.errors == 0, (what, figures.error_samples)
        assert figures.wrong == 0, what
        assert figures.fell_back == 0, (what, figures.fallbacks)  # the balancer answered every one
    assert status == 0, output
