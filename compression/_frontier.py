"""The edge between the numpy core and the caller's framework: torch tensors or numpy arrays in,
torch tensors or numpy arrays out.

The codecs work on *wire arrays*: C-contiguous little-endian numpy arrays in a wire dtype (a
name in :data:`splitinfer.tensors.DTYPES`; a bfloat16 array is its uint16 bits). An encoder
asks :func:`arrays_of` for each tensor's dtype name and its values in the wire dtype it wants
(``wire(name)``: float16 for the ``f16`` cast, float32 for quantizing, the tensor's own dtype for
integers); a decoder hands back :data:`Decoded` triples ``(name, carrier, array)`` (the
tensor's dtype name, the wire dtype of the array it decoded, the array), which
:func:`torch_tensors` and :func:`numpy_arrays` turn into the caller's framework.

Each framework converts its own tensors: torch with ``Tensor.to`` (as fast as it ever was), numpy
with ``_floats.py``, which gives torch's bits for every value (NaN: see there), so a blob is the
same whichever framework made it. torch is imported only inside the functions that handle torch
tensors, so a caller that never hands one in never loads it; a torch tensor is recognised by its
class's module (``torch`` or ``torch.*``: tensors and parameters) or, once torch is loaded, as
an instance of ``torch.Tensor``, without importing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from splitinfer.compression._blob import wire_dtype_name
from splitinfer.compression._floats import FLOATS, bf16_values, from_f32, to_f32
from splitinfer.errors import CodecError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Decoded",
    "array_of",
    "arrays_of",
    "f32_floats",
    "is_torch",
    "numpy_array",
    "numpy_arrays",
    "torch_tensors",
]

#: One decoded tensor: its dtype name, the wire dtype name of the array, and the array.
Decoded = tuple[str, str, np.ndarray]


def is_torch(x: object) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch): its class comes from
    torch, or it is an instance of ``torch.Tensor`` (a subclass defined elsewhere) once torch
    is loaded."""
    module = type(x).__module__
    if module == "torch" or module.startswith("torch."):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _same(name: str) -> str:
    return name


def f32_floats(name: str) -> str:
    """The wire dtype a quantizer wants: float32 for floating tensors, others unchanged."""
    return "float32" if name in FLOATS else name


def array_of(x: object, wire: Callable[[str], str] = _same) -> tuple[str, np.ndarray] | None:
    """``(dtype name, values in the wire dtype wire(name))`` of a torch tensor or numpy array
    ``x``; None for any other object. CodecError for a dtype that cannot travel or a tensor
    without dense data."""
    if isinstance(x, np.ndarray):
        return _numpy_wire(x, wire)
    if is_torch(x):
        return _torch_wire(x, wire)
    return None


def arrays_of(tensors: Sequence[Any], spec: str, wire: Callable[[str], str]) -> list[tuple[str, np.ndarray]]:
    """``array_of`` for each tensor of a frontier (a list or tuple of torch tensors or numpy
    arrays, mixed even), CodecError for anything else."""
    if isinstance(tensors, np.ndarray) or is_torch(tensors) or not isinstance(tensors, Sequence):
        raise CodecError(f"codec {spec} encodes a list of tensors, got {type(tensors).__name__}")
    out = []
    for t in tensors:
        found = array_of(t, wire)
        if found is None:
            raise CodecError(f"codec {spec} encodes tensors or numpy arrays, got {type(t).__name__}")
        out.append(found)
    return out


def _numpy_wire(a: np.ndarray, wire: Callable[[str], str]) -> tuple[str, np.ndarray]:
    name = wire_dtype_name(a.dtype)
    a = np.asarray(a)  # a subclass (matrix, masked array) as a plain array
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    if name == "bfloat16":  # ml_dtypes' bfloat16: carry its bits
        a = a.view(np.uint16)
    target = wire(name)
    return name, a if target == name else from_f32(to_f32(a, name), target)


def _torch_wire(t: Any, wire: Callable[[str], str]) -> tuple[str, np.ndarray]:
    import torch

    if not isinstance(t, torch.Tensor):
        raise CodecError(f"a torch object that is not a tensor cannot be encoded: {type(t).__name__}")
    name = wire_dtype_name(t.dtype)
    if t.layout != torch.strided or t.is_meta:
        raise CodecError(f"the codecs encode dense tensors with data, got a {t.layout} {t.device} tensor")
    target = wire(name)
    t = t.detach()
    if target != name and name in FLOATS and t.numel() and bool(t.sum().isnan()):
        # NaN: torch's kernels write different NaN bits (by size and source dtype), so numpy's
        # conversion makes them, as for a numpy array (a NaN sum without a NaN is rare)
        native = _torch_wire(t, _same)[1]
        return name, from_f32(to_f32(native, name), target)
    t = t.to("cpu", getattr(torch, target)).contiguous()
    if target == "bfloat16":
        return name, t.view(torch.int16).numpy().view(np.uint16)
    return name, t.numpy()


def numpy_array(name: str, carrier: str, array: np.ndarray) -> np.ndarray:
    """The numpy array of a decoded tensor of dtype ``name``: that dtype, except bfloat16,
    which numpy lacks: its values as float32 (exactly the values a torch decode gives)."""
    if carrier != name:
        array = from_f32(to_f32(array, carrier), name)
    return bf16_values(array) if name == "bfloat16" else array


def numpy_arrays(decoded: list[Decoded]) -> list[np.ndarray]:
    """The numpy arrays of decoded wire arrays (see :func:`numpy_array`)."""
    return [numpy_array(*d) for d in decoded]


def torch_tensors(decoded: list[Decoded]) -> list[torch.Tensor]:
    """The torch tensors of decoded wire arrays (imports torch); each owns its memory."""
    import torch

    out = []
    for name, carrier, array in decoded:
        if carrier == "bfloat16":
            t = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(array)
        if carrier != name:
            t = t.to(getattr(torch, name))
        out.append(t)
    return out
