"""Tensor specs and dtype names: the vocabulary that the bundle, the codecs and the wire share.

Dtypes travel by name (``"float32"``), never as pickled objects; only the dtypes listed in
:data:`DTYPES` are accepted from a file or a socket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitinfer.errors import ConfigError

__all__ = ["DTYPES", "TensorSpec", "dtype_from_name", "dtype_name"]

#: Every dtype that may cross a process boundary, by its wire name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: Most dimensions a tensor on the wire may have.
MAX_NDIM = 16


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; raises ConfigError for a dtype that cannot travel."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype} cannot cross the wire; use one of {', '.join(DTYPES)}") from None


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype called ``name``; raises ConfigError for anything not in DTYPES."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one tensor. ``None`` in ``shape`` marks a dynamic (batch) dim."""

    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        dtype_from_name(self.dtype)
        if len(self.shape) > MAX_NDIM:
            raise ConfigError(f"a tensor may have at most {MAX_NDIM} dims, got {len(self.shape)}")
        for d in self.shape:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
                raise ConfigError(f"tensor dims must be non-negative ints or None, got {d!r}")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        """The concrete spec of ``tensor``."""
        return cls(tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype))

    @property
    def itemsize(self) -> int:
        return dtype_from_name(self.dtype).itemsize

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of this tensor in its own dtype, with dynamic dims set to ``batch``."""
        return math.prod(batch if d is None else d for d in self.shape) * self.itemsize

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


def specs_of(tensors: Sequence[torch.Tensor]) -> tuple[TensorSpec, ...]:
    """The concrete specs of ``tensors``."""
    return tuple(TensorSpec.of(t) for t in tensors)
