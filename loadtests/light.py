"""Import splitinfer's real decision code into a locust process without importing torch.

The policies (``partitioner/_policy.py``), the cost model (``_costs.py``), the estimator
(``_estimate.py``), the wire format (``protocol.py``), the link traces (``netem.py``) and the
recording reader (``_loadtest.py``) need only numpy and msgpack. But ``import splitinfer``
runs the package's ``__init__``, which imports the bundle and the capture code, and so torch
(about 4 s and 220 MB per process). A locust worker should start in a fraction of that.

So :func:`load` registers the two packages (``splitinfer``, ``splitinfer.partitioner``) as
empty shells that point at their real folders, and stands in for the three torch-bound
modules that the light ones import by name only:

- ``splitinfer.bundle``: ``Bundle`` is :class:`~splitinfer._loadtest.RecordedBundle` (the
  policies check ``isinstance(bundle, Bundle)`` and read only cuts, codecs, fidelity, profiles);
- ``splitinfer.tensors``: ``TensorSpec`` is :class:`~splitinfer._loadtest.WireSpec` (the
  protocol writes ``dtype`` and ``shape`` into request headers);

then imports the real modules from their files. Nothing else is replaced: every decision, cost
and estimate comes from the code the edge SDK runs. If the process has already imported torch
or the real package, the real modules are used as they are.

The shells are fragile by nature: a new torch import in one of the light modules breaks
them, loudly (tests/test_loadtest.py checks that a locust process never imports torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

__all__ = ["Splitinfer", "load"]


@dataclass(frozen=True)
class Splitinfer:
    """The modules a load-test user needs."""

    errors: Any
    protocol: Any
    netem: Any
    estimate: Any
    costs: Any
    policy: Any
    recording: Any
    #: Whether the light shells were used (False: the real package was already imported).
    light: bool


_loaded: Splitinfer | None = None


def _shell(name: str, path: list[str] | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = f"load-test shell of {name} (loadtests/light.py)"
    if path is not None:
        module.__path__ = path
        module.__package__ = name
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        assert spec is not None
        spec.submodule_search_locations = path
        module.__spec__ = spec
    sys.modules[name] = module
    return module


def _package_path(name: str) -> list[str]:
    """Where package ``name`` lives, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"cannot find package {name}; install splitinfer (pip install -e .[loadtest])")
    return list(spec.submodule_search_locations)


def load() -> Splitinfer:
    """The real decision modules, imported without torch when the process has not loaded it."""
    global _loaded
    if _loaded is not None:
        return _loaded
    light = "splitinfer" not in sys.modules and "torch" not in sys.modules
    if light:
        real_spec = importlib.util.find_spec("splitinfer")
        root = _shell("splitinfer", _package_path("splitinfer"))
        # The real spec (with its loader), so that importlib.resources finds the shipped traces.
        root.__spec__ = real_spec
        part = _shell("splitinfer.partitioner", _package_path("splitinfer.partitioner"))
        root.partitioner = part  # type: ignore[attr-defined]
        errors = importlib.import_module("splitinfer.errors")
        recording = importlib.import_module("splitinfer._loadtest")
        bundle = _shell("splitinfer.bundle")
        bundle.Bundle = recording.RecordedBundle  # type: ignore[attr-defined]
        bundle.Cut = recording.RecordedCut  # type: ignore[attr-defined]
        tensors = _shell("splitinfer.tensors")
        tensors.TensorSpec = recording.WireSpec  # type: ignore[attr-defined]
    else:
        errors = importlib.import_module("splitinfer.errors")
        recording = importlib.import_module("splitinfer._loadtest")
    _loaded = Splitinfer(
        errors=errors,
        protocol=importlib.import_module("splitinfer.protocol"),
        netem=importlib.import_module("splitinfer.netem"),
        estimate=importlib.import_module("splitinfer.partitioner._estimate"),
        costs=importlib.import_module("splitinfer.partitioner._costs"),
        policy=importlib.import_module("splitinfer.partitioner._policy"),
        recording=recording,
        light=light,
    )
    return _loaded
