"""The house holds: imports point one way (read from the source, lazy imports included), and the
ground floor, the codecs and the decision run in a process where torch cannot be imported.

docs/DESIGN.md ("Layout") draws the rooms; :data:`ALLOWED` is that drawing as data.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import splitinfer

PACKAGE = Path(splitinfer.__file__).resolve().parent
ROOMS = ("compression", "partitioner", "edge", "cloud", "netem", "lab")

#: Which rooms each room may import (``core`` is the ground floor: errors, tensors, protocol,
#: manifest, bundle; it shares a floor with the numpy codecs of ``compression``). ``cli`` is the
#: dispatcher (splitinfer/cli.py, splitinfer/__main__.py), the one place that sees every room.
ALLOWED: dict[str, set[str]] = {
    "core": {"core", "compression"},
    "compression": {"core", "compression"},
    "partitioner": {"core", "compression", "partitioner"},
    "netem": {"core", "netem"},
    "edge": {"core", "compression", "partitioner", "edge"},
    "cloud": {"core", "compression", "partitioner", "cloud"},
    "lab": {"core", "compression", "partitioner", "netem", "edge", "cloud", "lab"},
    "cli": {"core", "cli", *ROOMS},
}

#: Upward imports that are part of the design, each with its reason.
EXCEPTIONS = {
    # The public facade re-exports the partitioner's compile, lazily (module __getattr__).
    ("splitinfer/__init__.py", "splitinfer.partitioner"),
}

#: Modules whose top level may not import torch (the torch-free floor and the decision side).
TORCH_FREE = ("core", "compression", "netem")
TORCH_FREE_MODULES = {
    "partitioner/__init__.py",
    "partitioner/_costs.py",
    "partitioner/_estimate.py",
    "partitioner/_policy.py",
    "partitioner/_profiles.py",
    # the edge SDK runs on ONNX Runtime where torch is not installed (tests/integration/core/test_runtime.py)
    "edge/__init__.py",
    "edge/_breaker.py",
    "edge/_build.py",
    "edge/_client.py",
    "edge/_cloud_api.py",
    "edge/_config.py",
    "edge/_device.py",
    "edge/_hedging.py",
    "edge/_link.py",
    "edge/_metrics.py",
    "edge/_observe.py",
    "edge/_pipeline.py",
    "edge/_targets.py",
    "edge/_trace.py",
    "edge/_transport.py",
}


def room_of_file(rel: str) -> str:
    parts = rel.split("/")
    if len(parts) == 1:
        return "cli" if rel in ("cli.py", "__main__.py") else "core"
    return parts[0] if parts[0] in ROOMS else "core"


def room_of_module(name: str) -> str | None:
    """The room of an imported module, or None for a module outside the package."""
    parts = name.split(".")
    if parts[0] != "splitinfer":
        return None
    if len(parts) > 1 and parts[1] in ROOMS:
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "cli"
    return "core"


def package_files() -> list[str]:
    """Every module of the package, as paths relative to it (through the room symlinks)."""
    out = []
    for root, _dirs, files in os.walk(PACKAGE, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                out.append(str((Path(root) / f).relative_to(PACKAGE)))
    return sorted(out)


def imports_of(rel: str) -> list[tuple[str, int, bool]]:
    """Every module ``rel`` imports: (absolute name, line, at module level), lazy ones included.

    ``from splitinfer import y`` counts as importing ``splitinfer.y`` too, so that a room
    imported as a name (``from splitinfer import edge``) is seen.
    """
    path = PACKAGE / rel
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(["splitinfer", *Path(rel).parent.parts])
    # Imports that run when the module is imported: its body, and the bodies of top-level
    # try/if blocks, except `if TYPE_CHECKING:` (seen by type checkers only).
    top_level = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((module, node.lineno, id(node) in top_level))
            if module == "splitinfer" or node.module is None:
                found += [(f"{module}.{a.name}", node.lineno, id(node) in top_level) for a in node.names]
    return found


def test_the_package_is_what_the_rooms_hold():
    files = package_files()
    for room in ROOMS:
        assert f"{room}/__init__.py" in files, f"room {room} is missing (symlink splitinfer/{room})"
    assert len(files) > 50


@pytest.mark.parametrize("rel", package_files())
def test_imports_point_one_way(rel):
    room = room_of_file(rel)
    bad = []
    for module, line, _top in imports_of(rel):
        target = room_of_module(module)
        if target is None or target in ALLOWED[room]:
            continue
        if (f"splitinfer/{rel}", ".".join(module.split(".")[:2])) in EXCEPTIONS:
            continue
        bad.append(f"{rel}:{line} imports {module} ({room} -> {target})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "rel",
    [f for f in package_files() if room_of_file(f) in TORCH_FREE or f in TORCH_FREE_MODULES],
)
def test_torch_free_modules_import_no_torch_at_module_level(rel):
    bad = [
        f"{rel}:{line} imports {module}"
        for module, line, top in imports_of(rel)
        if top and module.split(".")[0] == "torch"
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The reader itself: an import inside a function and a relative import are both found.
    source = "from . import _x\n\ndef f():\n    from splitinfer import lab\n    import torch\n"
    rel = "partitioner/_layering_probe.py"
    path = PACKAGE / rel
    path.write_text(source)
    try:
        found = {(m, top) for m, _line, top in imports_of(rel)}
    finally:
        path.unlink()
    assert ("splitinfer.partitioner._x", True) in found
    assert ("splitinfer.partitioner", True) in found
    assert ("splitinfer.lab", False) in found
    assert ("torch", False) in found
    assert room_of_module("splitinfer.lab") not in ALLOWED["partitioner"]


#: Runs first in the subprocess: any import of torch raises, as on a device without it.
BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not installed here ({name})")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks_torch():
    done = run_without_torch("import torch")
    assert done.returncode != 0 and "torch is not installed here" in done.stderr


@pytest.mark.slow
def test_ground_floor_codecs_manifest_and_decision_run_without_torch(repository):
    bundle_dir = repository / "democnn"
    done = run_without_torch(
        f"""
        import sys
        import numpy as np
        import splitinfer, splitinfer.protocol, splitinfer.compression
        from splitinfer import Manifest
        from splitinfer.partitioner import Estimates, make_policy

        manifest = Manifest.load({str(bundle_dir)!r})
        assert manifest.name == "democnn" and manifest.last_cut > 2, manifest
        codec = manifest.codec_for(1, "f32")
        x = np.random.default_rng(0).random((1, 4), dtype=np.float32)
        assert len(codec.encode([x])) >= x.nbytes
        policy = make_policy("static", manifest, cut=1, codec="f32")
        decision = policy.decide(Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.05))
        assert decision.cut == 1 and decision.codec == "f32", decision
        from splitinfer.cli import build_parser
        commands = build_parser()._subparsers._group_actions[0].choices
        assert {{"serve", "compile", "inspect", "plan", "netem", "demo", "loadtest"}} <= set(commands)
        assert "torch" not in sys.modules
        print("ok", manifest.last_cut)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
