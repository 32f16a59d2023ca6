"""splitinfer: split inference for PyTorch.

An edge device runs the head of a model, streams compressed activations over HTTP to a cloud
server that runs the tail, and a partitioner picks the cut and codec for every request.

>>> import splitinfer as si
>>> bundle = si.compile(model, (torch.randn(1, 3, 224, 224),), name="mynet")
>>> outputs = bundle.tail(2, bundle.head(2, x))

Importing the package loads no torch: ``compile`` (which needs it) is imported from the
partitioner when first used, and a :class:`Manifest` reads a bundle's metadata without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitinfer._version import __version__
from splitinfer.bundle import Bundle
from splitinfer.errors import SplitInferError
from splitinfer.manifest import Cut, Manifest
from splitinfer.tensors import TensorSpec

if TYPE_CHECKING:
    from splitinfer.partitioner import compile

__all__ = ["Bundle", "Cut", "Manifest", "SplitInferError", "TensorSpec", "__version__", "compile"]


def __getattr__(name: str) -> Any:
    # The one upward import of the ground floor, and a lazy one: the public facade re-exports
    # the partitioner's compile (tests/integration/core/test_layering.py allows exactly this).
    if name == "compile":
        from splitinfer.partitioner import compile

        return compile
    raise AttributeError(f"module 'splitinfer' has no attribute {name!r}")
