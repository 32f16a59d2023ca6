"""splitinfer: split inference for PyTorch.

An edge device runs the head of a model, streams compressed activations over HTTP to a cloud
server that runs the tail, and a partitioner picks the cut and codec for every request.

>>> import splitinfer as si
>>> bundle = si.compile(model, (torch.randn(1, 3, 224, 224),), name="mynet")
>>> outputs = bundle.tail(2, bundle.head(2, x))
"""

from splitinfer._version import __version__
from splitinfer.bundle import Bundle, Cut
from splitinfer.errors import SplitInferError
from splitinfer.partitioner import compile
from splitinfer.tensors import TensorSpec

__all__ = ["Bundle", "Cut", "SplitInferError", "TensorSpec", "__version__", "compile"]
