"""Tensor specs and dtype names: the vocabulary that the bundle, the codecs and the wire share.

Dtypes travel by name (``"float32"``), never as pickled objects; only the dtypes listed in
:data:`DTYPES` are accepted from a file or a socket. This module imports no torch: a torch
dtype or a numpy dtype is named by :func:`dtype_name`, and :func:`dtype_from_name` (torch) and
:func:`numpy_dtype` (numpy) turn a name back into a dtype of either framework.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splitinfer.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "TensorSpec", "dtype_from_name", "dtype_name", "numpy_dtype"]

#: Every dtype that may cross a process boundary: its wire name and its size in bytes.
DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

#: Most dimensions a tensor on the wire may have.
MAX_NDIM = 16


def dtype_name(dtype: Any) -> str:
    """The wire name of a torch or numpy ``dtype``; ConfigError for one that cannot travel.

    numpy has no bfloat16: a bfloat16 tensor exists only on torch's side (the numpy codecs
    carry its bits as uint16 and name it ``bfloat16`` on the wire).
    """
    text = str(dtype)
    if text.startswith("torch."):
        name = text.removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = text
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype} cannot cross the wire; use one of {', '.join(DTYPES)}")
    return name


def check_dtype_name(name: object) -> str:
    """``name`` if it is the wire name of a dtype in DTYPES; ConfigError otherwise."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype called ``name`` (imports torch); ConfigError for anything not in DTYPES."""
    import torch

    dtype: torch.dtype = getattr(torch, check_dtype_name(name))
    return dtype


def numpy_dtype(name: object) -> np.dtype[Any]:
    """The numpy dtype of the wire name ``name``; bfloat16, which numpy lacks, maps to uint16
    (its bits). ConfigError for anything not in DTYPES."""
    checked = check_dtype_name(name)
    return np.dtype(np.uint16 if checked == "bfloat16" else checked)


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one tensor. ``None`` in ``shape`` marks a dynamic (batch) dim."""

    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        check_dtype_name(self.dtype)
        if len(self.shape) > MAX_NDIM:
            raise ConfigError(f"a tensor may have at most {MAX_NDIM} dims, got {len(self.shape)}")
        for d in self.shape:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
                raise ConfigError(f"tensor dims must be non-negative ints or None, got {d!r}")

    @classmethod
    def of(cls, tensor: Any) -> TensorSpec:
        """The concrete spec of ``tensor`` (a torch tensor or a numpy array)."""
        return cls(tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype))

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    def concrete(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with dynamic dims set to ``batch``."""
        return tuple(batch if d is None else d for d in self.shape)

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of this tensor in its own dtype, with dynamic dims set to ``batch``."""
        return math.prod(self.concrete(batch)) * self.itemsize

    def matches(self, tensor_spec: TensorSpec) -> bool:
        """Whether a concrete spec fits this one (same dtype and rank, dynamic dims free)."""
        return (
            self.dtype == tensor_spec.dtype
            and len(self.shape) == len(tensor_spec.shape)
            and all(a is None or a == b for a, b in zip(self.shape, tensor_spec.shape))
        )

    def to_json(self) -> dict[str, object]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: object) -> TensorSpec:
        if not isinstance(obj, dict) or not isinstance(obj.get("shape"), list | tuple):
            raise ConfigError(f"a tensor spec is a map with 'shape' and 'dtype', got {obj!r}")
        return cls(tuple(obj["shape"]), obj.get("dtype"))  # type: ignore[arg-type]

    def __str__(self) -> str:
        dims = "x".join("B" if d is None else str(d) for d in self.shape) or "scalar"
        return f"{self.dtype}[{dims}]"


def specs_of(tensors: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """The concrete specs of ``tensors`` (torch tensors or numpy arrays)."""
    return tuple(TensorSpec.of(t) for t in tensors)
