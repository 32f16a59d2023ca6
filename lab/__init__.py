"""splitinfer.lab: the applications built on the product, and what they share.

``splitinfer demo`` (every policy live over a real 3G trace), live sessions, reports, the
hindsight oracle that prices every request after the fact, the load-test recordings
(``splitinfer loadtest prepare``), a real ``splitinfer serve`` subprocess, sample photos, sample
models and how they are compiled. Benchmarks, tests, examples and load tests use it; nothing
in the product does (only the CLI commands that run the demo and the load-test tools, lazily).

>>> with ServerProcess(repository, "--compute-threads", "1") as server:
...     client = EdgeClient(server.url, bundle=repository / "democnn")

The evaluation API the demo and the benchmarks share (the oracle, static tuning, scenario runs
and their reports) is :mod:`splitinfer.lab.evaluation`.

Importing it loads no torch: the recording reader, the oracle and the server helper are
torch-free; the rest (the demo model, photos, sample models) is imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitinfer.lab._hindsight import Link, World, kind_of
from splitinfer.lab._recording import Recording, format_summary, prepare
from splitinfer.lab._server import ServerProcess

if TYPE_CHECKING:
    from splitinfer.lab._demo import demo_model
    from splitinfer.lab._images import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, photo_batch, sample_photos
    from splitinfer.lab._models import compile_on_photos, efficientnet_lite0

__all__ = [
    "CALIBRATION_PHOTOS",
    "EVALUATION_PHOTOS",
    "Link",
    "Recording",
    "ServerProcess",
    "World",
    "compile_on_photos",
    "demo_model",
    "efficientnet_lite0",
    "format_summary",
    "kind_of",
    "photo_batch",
    "prepare",
    "sample_photos",
]

#: Names imported from their module when first used (those modules import torch).
_LAZY = {
    "demo_model": "_demo",
    "CALIBRATION_PHOTOS": "_images",
    "EVALUATION_PHOTOS": "_images",
    "photo_batch": "_images",
    "sample_photos": "_images",
    "compile_on_photos": "_models",
    "efficientnet_lite0": "_models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"splitinfer.lab.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'splitinfer.lab' has no attribute {name!r}")
