"""ONNX Runtime as a second execution backend (docs/runtimes.md): the ONNX chain equals the torch
chain at every cut of the zoo, hostile ONNX files are refused, older bundles keep loading, the
server's tails on ONNX Runtime equal torch's, and an adaptive edge runs with no torch at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import splitinfer as si
from splitinfer.cloud import ServerConfig
from splitinfer.errors import BundleError, ConfigError
from splitinfer.runtime import ONNX_FILE
from tests.conftest import start_server
from tests.support.zoo import ZOO, batched

from .test_layering import BLOCK_TORCH

pytestmark = pytest.mark.slow


def _close(got, want, what):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    want = want.detach().numpy()
    assert got.shape == want.shape and got.dtype == want.dtype, what
    finite = np.abs(want[np.isfinite(want)])
    scale = float(finite.max()) if finite.size else 0.0
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4 + 1e-3 * scale), (what, np.abs(got - want).max())


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_onnx_chain_equals_torch_chain_at_every_cut(arch, tmp_path):
    model, example = ZOO[arch]()
    bundle = si.compile(model, example, name=arch, runtimes=("torch", "onnxruntime"))
    if "refused" in bundle.onnx:  # a clear refusal naming what ONNX could not export
        assert bundle.runtimes == ("torch",) and "ONNX" in bundle.onnx["refused"]
        return
    assert bundle.runtimes == ("torch", "onnxruntime")
    assert set(bundle.onnx["max_abs_error"]) == {str(c.index) for c in bundle.cuts}
    bundle.save(tmp_path / arch)
    onnx = si.Bundle.load(tmp_path / arch, runtime="onnxruntime")
    assert onnx.runtime == "onnxruntime" and all(s is None for s in onnx.segments)
    for batch in (1, 8):
        x = batched(example, batch)
        numpy_in = tuple(t.numpy() for t in x)
        want = torch.utils._pytree.tree_leaves(model(*x))
        for k in range(bundle.last_cut + 1):
            frontier = onnx.head(k, *numpy_in)
            for got, ref in zip(frontier, bundle.head(k, *x), strict=True):
                assert isinstance(got, np.ndarray)
                _close(got, ref, f"{arch} head({k}) at batch {batch}")
            outputs = torch.utils._pytree.tree_leaves(
                onnx.tail(k, frontier), is_leaf=lambda v: not isinstance(v, tuple | list | dict)
            )
            for got, ref in zip(outputs, want, strict=True):
                _close(got, ref, f"{arch} tail({k}) at batch {batch}")
            # the runtimes mix across the cut: a torch edge with an ONNX Runtime cloud, and back
            mixed = onnx.tail(k, tuple(t.numpy() for t in bundle.head(k, *x)))
            for got, ref in zip(_leaves(mixed), want, strict=True):
                _close(got, ref, f"{arch} torch head({k}) + onnxruntime tail at batch {batch}")
            back = bundle.tail(k, tuple(torch.from_numpy(f) for f in frontier))
            for got, ref in zip(_leaves(back), want, strict=True):
                _close(got, ref, f"{arch} onnxruntime head({k}) + torch tail at batch {batch}")
        # torch tensors in: torch tensors out, with the model's output structure
        out = onnx.tail(0, x)
        assert type(out) is type(model(*x))


def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree, is_leaf=lambda v: not isinstance(v, tuple | list | dict))


def test_a_segment_mutating_its_frontier_in_place_matches_torch_on_both_runtimes():
    """The masked attention's padding mask, ``zeros_like(mask).masked_fill_(mask, -inf)``, with a
    cut between the two: ONNX's head must send the zeros torch's head sends (the frontier as it
    crosses the cut), not the tensor after the next segment filled it in place."""

    class InPlace(torch.nn.Module):
        def forward(self, x, mask):
            fill = torch.zeros_like(x)
            fill = fill.masked_fill_(mask, float("-inf"))
            return torch.softmax(x + fill, dim=-1)

    x, mask = torch.randn(2, 6), torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    bundle = si.compile(InPlace(), (x, mask), name="inplace", runtimes=("torch", "onnxruntime"))
    assert bundle.runtimes == ("torch", "onnxruntime"), bundle.onnx.get("refused")
    assert any("zeros_like" in c.name for c in bundle.cuts)
    graph = bundle._onnx_graph
    assert graph is not None
    from splitinfer.runtime import OnnxRunner

    runner = OnnxRunner(graph, threads=1)
    want = InPlace()(x, mask)
    for k in range(bundle.last_cut + 1):
        torch_front = bundle.head(k, x, mask)
        onnx_front = runner.run(0, k, [x.numpy(), mask.numpy()])
        for a, b in zip(onnx_front, torch_front, strict=True):
            # the mask's -inf and 0 compared exactly; computed floats (the softmax) within tolerance
            ref = b.numpy()
            assert np.array_equal(np.isinf(a), np.isinf(ref)), (k, a, ref)
            assert np.array_equal(a[np.isinf(a)], ref[np.isinf(ref)]), (k, a, ref)
            finite = torch.from_numpy(np.where(np.isinf(ref), 0, ref))
            _close(np.where(np.isinf(a), 0, a), finite, f"head({k})")
        out = runner.run(k, bundle.n_segments, [t.numpy() for t in torch_front])
        _close(out[0], want, f"torch head({k}) + onnxruntime tail")


def test_a_model_onnx_cannot_export_still_compiles_for_torch(caplog):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x) + 1  # no ONNX symbolic for aten.special_bessel_j0

    with caplog.at_level("WARNING", logger="splitinfer.partitioner"):
        bundle = si.compile(Unexportable(), (torch.randn(1, 4),), name="bessel")
    assert bundle.runtimes == ("torch",)
    assert "bessel" in bundle.onnx["refused"] and "ONNX" in bundle.onnx["refused"]
    assert "torch only" in caplog.text
    x = torch.randn(3, 4)
    assert torch.equal(bundle.tail(0, bundle.head(0, x)), torch.special.bessel_j0(x) + 1)


def test_hostile_or_missing_onnx_is_refused_and_old_bundles_load(onnx_repository, tmp_path):
    src = onnx_repository / "democnn"
    assert si.Manifest.load(src).runtimes == ("torch", "onnxruntime")
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    data = bytearray((tampered / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        si.Bundle.load(tampered, runtime="onnxruntime")
    # An older bundle: no ONNX in its manifest. auto runs it on torch; onnxruntime says why not.
    old = tmp_path / "old"
    shutil.copytree(src, old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["onnx"]
    del doc["files"][ONNX_FILE]
    (old / ONNX_FILE).unlink()
    (old / "manifest.json").write_text(json.dumps(doc))
    assert si.Bundle.load(old, runtime="auto").runtime == "torch"
    assert si.Manifest.load(old).runtimes == ("torch",)
    with pytest.raises(ConfigError, match="has no ONNX graph"):
        si.Bundle.load(old, runtime="onnxruntime")
    # A file that hashes right but is not our ONNX container: a BundleError, not a crash.
    doc = json.loads((src / "manifest.json").read_text())
    junk = tmp_path / "junk"
    shutil.copytree(src, junk)
    (junk / ONNX_FILE).write_bytes(b"\x93not onnx")
    import hashlib

    doc["files"][ONNX_FILE] = hashlib.sha256(b"\x93not onnx").hexdigest()
    (junk / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="not a splitinfer ONNX file"):
        si.Bundle.load(junk, runtime="onnxruntime")


@pytest.fixture(scope="module")
def effnet_repo(efficientnet, tmp_path_factory) -> Path:
    _, bundle = efficientnet
    root = tmp_path_factory.mktemp("effnet")
    bundle.save(root / bundle.name)
    return root


# EfficientNet-Lite0's compile (shared fixture, with its ONNX export) takes a minute or two on a
# busy 2-core machine: these tests may take longer than the suite's default timeout.
@pytest.mark.timeout(600)
async def test_server_tails_on_onnxruntime_equal_torch_at_batch_1_and_8(efficientnet, effnet_repo):
    from splitinfer.edge import EdgeClient

    model, bundle = efficientnet
    runner, server = await start_server(
        ServerConfig(repository=effnet_repo, runtime="onnxruntime", max_batch_size=8)
    )
    try:
        from splitinfer.lab._images import photo_batch

        photos = photo_batch(8, seed=3)
        mid = bundle.last_cut // 2
        async with EdgeClient(
            server.url, bundle=bundle, policy="static", cut=mid, codec="f32", deadline_s=None
        ) as client:
            for batch in (1, 8):
                x = photos[:batch]
                out = await client.ainfer(x)
                assert client.last_trace is not None and client.last_trace.fallback is None
                _close(out, model(x), f"server tail at batch {batch}")
                assert torch.equal(out.argmax(1), model(x).argmax(1))
    finally:
        await runner.cleanup()


@pytest.mark.timeout(600)
def test_an_adaptive_edge_without_torch_on_real_photos(efficientnet, effnet_repo, tmp_path):
    """A subprocess where ``import torch`` raises runs the adaptive EdgeClient on ONNX Runtime
    against a real ``splitinfer serve``, which is killed mid-run: every photo is answered, with
    the torch model's top-1."""
    from splitinfer.lab._images import photo_batch
    from splitinfer.lab._server import ServerProcess
    from splitinfer.partitioner import profile_bundle

    model, bundle = efficientnet
    repo = tmp_path / "repo"
    shutil.copytree(effnet_repo, repo)
    from splitinfer.manifest import update_manifest

    profile = profile_bundle(bundle, batch_sizes=(1,), codecs=["f32+zstd1"], repeats=1, progress=False)
    update_manifest(repo / bundle.name, profiles={"host": profile})
    photos = photo_batch(12, seed=5)
    np.save(tmp_path / "photos.npy", photos.numpy())
    want = model(photos).argmax(1).tolist()
    with ServerProcess(repo, "--runtime", "onnxruntime") as server:
        code = f"""
            import sys, numpy as np
            from splitinfer.edge import EdgeClient
            photos = np.load({str(tmp_path / "photos.npy")!r})
            top1, where = [], []
            client = EdgeClient({server.url!r}, bundle={str(repo / bundle.name)!r}, policy="adaptive",
                                fidelity_budget=0.99, deadline_s=None, runtime="onnxruntime")
            assert client.bundle.runtime == "onnxruntime"
            client.warm_up(photos[:1])
            for i in range(len(photos)):
                if i == 6:
                    print("KILL", flush=True)
                    sys.stdin.readline()
                out = client.infer(photos[i:i + 1])
                assert isinstance(out, np.ndarray), type(out)
                top1.append(int(out.argmax(1)[0]))
                t = client.last_trace
                where.append((t.cut, t.fallback))
            client.close()
            assert "torch" not in sys.modules
            print("TOP1", top1)
            print("WHERE", where)
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            assert line.strip() == "KILL", (line, proc.stderr.read() if proc.poll() is not None else "")
            server.kill()
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert eval(lines["TOP1"]) == want
    where = eval(lines["WHERE"])
    last = bundle.last_cut
    # after the kill, a request the policy sends to the cloud finishes on the device
    assert all(cut == last or fallback for cut, fallback in where[6:]), where


def test_the_profile_times_both_runtimes_and_each_side_is_priced_on_its_own(onnx_cnn_bundle, tmp_path):
    """``profile_bundle`` times ONNX Runtime beside torch; the cost model prices the head on the
    runtime the edge's bundle runs on and the tail on the cloud's (torch unless told), and a
    profile without ONNX Runtime times (older ones) prices every side on torch's."""
    from splitinfer.manifest import update_manifest
    from splitinfer.partitioner import profile_bundle
    from splitinfer.partitioner._costs import CostModel
    from splitinfer.partitioner._profiles import chain_times

    n = onnx_cnn_bundle.n_segments
    profile = profile_bundle(
        onnx_cnn_bundle, batch_sizes=(1, 4), repeats=3, warmup=1, threads=1, progress=False
    )
    ort_times = profile["runtimes"]["onnxruntime"]
    assert ort_times["threads"] == 1
    for batch in ("1", "4"):
        seg = ort_times["segments"][batch]
        assert len(seg["median_s"]) == len(seg["p90_s"]) == n
        assert all(t > 0 for t in seg["median_s"])
    path = onnx_cnn_bundle.save(tmp_path / "democnn")
    update_manifest(path, profiles={"host": profile})
    on_torch, on_ort = si.Bundle.load(path), si.Bundle.load(path, runtime="onnxruntime")
    assert on_ort.runtime == "onnxruntime"

    def cum(times):
        return np.concatenate([[0.0], np.cumsum(times)])

    torch1, ort1 = cum(profile["segments"]["1"]["median_s"]), cum(ort_times["segments"]["1"]["median_s"])
    ort4 = cum(ort_times["segments"]["4"]["median_s"])
    edge_torch, edge_ort = CostModel(on_torch), CostModel(on_ort)
    assert edge_ort.runtimes == ("onnxruntime", "torch") and edge_torch.runtimes == ("torch", "torch")
    assert np.allclose(edge_torch.head, torch1[edge_torch.cut])
    assert np.allclose(edge_ort.head, ort1[edge_ort.cut])
    assert np.array_equal(edge_ort.tail, edge_torch.tail)  # the cloud's runtime, not the edge's
    sent = edge_ort.cut < edge_ort.n
    cloud_ort = CostModel(on_ort, tail_runtime="onnxruntime", cloud_batch=4)
    assert np.allclose(cloud_ort.tail[sent], (ort4[-1] - ort4)[cloud_ort.cut[sent]])
    head, tail = chain_times(on_ort)
    assert np.allclose(head, ort1) and np.allclose(tail, torch1[-1] - torch1)
    # a profile from before ONNX Runtime was timed: both sides on torch's times
    old = {k: v for k, v in profile.items() if k != "runtimes"}
    update_manifest(path, profiles={"host": old})
    assert np.allclose(CostModel(si.Bundle.load(path, runtime="onnxruntime")).head, edge_torch.head)


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda_provider(), reason="this onnxruntime has a CUDA provider: nothing to refuse")
def test_cuda_with_onnxruntime_is_refused_where_it_has_no_cuda_provider(onnx_repository):
    """``--device cuda`` on ONNX Runtime needs its CUDA provider: without one the bundle, the
    server's config and ``splitinfer serve`` refuse it with the fix, never run on the CPU."""
    src = onnx_repository / "democnn"
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        si.Bundle.load(src, runtime="onnxruntime", device="cuda")
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        si.Bundle.load(src, runtime="onnxruntime", device="tpu")
    assert si.Bundle.load(src, runtime="auto", device="cpu").runtime == "onnxruntime"
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        ServerConfig(repository=onnx_repository, runtime="onnxruntime", device="cuda:0").torch_device()
    assert str(ServerConfig(repository=onnx_repository, runtime="onnxruntime").torch_device()) == "cpu"
    serve = ["serve", "--repository", str(onnx_repository), "--port", "0", "--runtime", "onnxruntime"]
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", *serve, "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "onnxruntime-gpu" in out.stderr, (out.returncode, out.stderr[-2000:])
