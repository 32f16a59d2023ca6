"""Bundles: every cut is exact, saving and loading keeps it so, and tampering is caught."""

import json
import subprocess
import sys
import threading

import pytest
import torch

import splitinfer as si
from splitinfer.errors import BundleError, ConfigError, CutNotLoadedError


@pytest.mark.parametrize("batch", [1, 8])
def test_every_cut_is_exact(cnn, cnn_bundle, batch):
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x)
    for cut in cnn_bundle.cuts:
        frontier = cnn_bundle.head(cut.index, x)
        assert len(frontier) == len(cut.tensors)
        assert torch.equal(cnn_bundle.tail(cut.index, frontier), want), cut.name


def test_cut_table(cnn_bundle):
    cuts = cnn_bundle.cuts
    assert [c.index for c in cuts] == list(range(len(cuts)))
    assert cuts[0].name == "input"
    assert cuts[1].name == "after 0"
    assert cuts[0].nbytes == 3 * 32 * 32 * 4
    assert cuts[-1].tensors[0].shape == (None, 10)


def test_save_load_round_trip(tmp_path, cnn, cnn_bundle):
    loaded = si.Bundle.load(cnn_bundle.save(tmp_path / "b"))
    assert loaded.graph_hash == cnn_bundle.graph_hash
    assert loaded.cuts == cnn_bundle.cuts
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.tail(4, loaded.head(4, x)), cnn(x))


def test_partial_loads(repository, cnn):
    edge = si.Bundle.load(repository / "democnn", upto_cut=3)
    cloud = si.Bundle.load(repository / "democnn", from_cut=3)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(cloud.tail(3, edge.head(3, x)), cnn(x))
    with pytest.raises(CutNotLoadedError, match="not loaded"):
        edge.head(4, x)
    with pytest.raises(CutNotLoadedError):
        cloud.tail(2, edge.head(2, x))


def test_bundles_load_concurrently_from_threads(repository, cnn):
    """torch.export.load alone fails when two threads deserialize at once; Bundle.load does not."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(6)

    def load(i: int) -> si.Bundle:
        barrier.wait()  # start together, so that deserializations overlap
        return si.Bundle.load(repository / "democnn", from_cut=i % 3)

    with ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(load, range(6)))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x)
        for i, bundle in enumerate(loaded):
            k = i % 3
            assert torch.equal(bundle.tail(k, loaded[0].head(k, x)), want)


def test_tampered_segment_is_refused(tmp_path, cnn_bundle):
    path = cnn_bundle.save(tmp_path / "b")
    seg = path / "segment_000.pt2"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        si.Bundle.load(path)


def test_missing_segment_is_refused(tmp_path, cnn_bundle):
    path = cnn_bundle.save(tmp_path / "b")
    (path / "segment_002.pt2").unlink()
    with pytest.raises(BundleError, match="missing segment_002"):
        si.Bundle.load(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        si.Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a splitinfer bundle"):
        si.Bundle.load(tmp_path)


def test_wrong_inputs_are_clear_errors(cnn_bundle):
    with pytest.raises(ConfigError, match=r"float32\[Bx3x32x32\]"):
        cnn_bundle.head(2, torch.rand(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="cut must be an int"):
        cnn_bundle.head(99, torch.rand(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="carries 1 tensor"):
        cnn_bundle.tail(2, ())


def test_loading_needs_none_of_the_users_code(tmp_path):
    """A model defined in a module the loading process cannot import still loads and runs."""
    moddir = tmp_path / "usercode"
    moddir.mkdir()
    (moddir / "mymodels.py").write_text(
        "import torch\n"
        "class Scale(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 3\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), Scale(), torch.nn.Linear(8, 2))\n"
    )
    out = tmp_path / "bundle"
    compile_script = (
        "import sys, torch, splitinfer as si; sys.path.insert(0, sys.argv[1]); import mymodels;"
        "m = mymodels.make().eval();"
        "b = si.compile(m, (torch.ones(1, 4),), name='user'); b.save(sys.argv[2]);"
        "print(m(torch.ones(1, 4)).tolist())"
    )
    want = subprocess.run(
        [sys.executable, "-c", compile_script, str(moddir), str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    load_script = (
        "import sys, torch, splitinfer as si;"
        "sys.modules['mymodels'] = None;"  # importing it now raises ImportError
        "b = si.Bundle.load(sys.argv[1]);"
        "print(b.tail(2, b.head(2, torch.ones(1, 4))).tolist())"
    )
    got = subprocess.run(
        [sys.executable, "-c", load_script, str(out)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert got == want


def test_a_segment_that_asks_to_be_unpickled_is_refused(tmp_path, cnn_bundle):
    """A bundle tampered with together with its manifest must still not run code on load."""
    import hashlib
    import zipfile

    path = cnn_bundle.save(tmp_path / "b")
    seg = path / "segment_000.pt2"
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(seg) as src, zipfile.ZipFile(hostile, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("weights_config.json"):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    seg.write_bytes(hostile.read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["segment_000.pt2"] = hashlib.sha256(seg.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="would be unpickled"):
        si.Bundle.load(path)
