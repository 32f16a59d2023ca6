"""Capture a model with torch.export and cut it into a chain of segments.

This first version cuts an ``nn.Sequential`` between its children: the simplest correct means.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from splitinfer.bundle import Bundle, Cut, frontier_nbytes
from splitinfer.errors import CaptureError, ConfigError
from splitinfer.protocol import valid_model_name
from splitinfer.tensors import TensorSpec

__all__ = ["compile"]

#: Batch size the programs are exported at: 1 would let torch specialize the batch dim.
_EXPORT_BATCH = 2


class _Step(nn.Module):
    """One child of a Sequential as a segment: a tuple of tensors in, a tuple out."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.layer(*xs),)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() == 0:
        raise ConfigError("example inputs need a batch dimension first; got a 0-d tensor")
    return t[:1].expand(batch, *t.shape[1:]).contiguous()


def _dynamic_spec(t: torch.Tensor) -> TensorSpec:
    spec = TensorSpec.of(t)
    return TensorSpec((None, *spec.shape[1:]), spec.dtype)


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    name: str,
    version: str = "1",
) -> Bundle:
    """Capture ``model`` and return a :class:`Bundle` that can be split at every offered cut."""
    if not valid_model_name(name):
        raise ConfigError(f"name {name!r} must be 1-128 characters of [A-Za-z0-9._-]")
    if not isinstance(example_inputs, tuple | list) or not all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        raise ConfigError("example_inputs must be a tuple of tensors, e.g. (torch.randn(1, 3, 224, 224),)")
    if not isinstance(model, nn.Sequential):
        raise CaptureError(
            f"this version cuts nn.Sequential models only, got {type(model).__name__}; "
            "wrap the model's layers in nn.Sequential"
        )
    model = model.eval()
    frontier = tuple(_batched(t, _EXPORT_BATCH) for t in example_inputs)
    _, in_spec = pytree.tree_flatten((tuple(example_inputs), {}))
    cuts = [Cut(0, "input", tuple(_dynamic_spec(t) for t in frontier), 0)]
    programs = []
    batch = Dim("batch")
    with torch.no_grad():
        for child_name, layer in model.named_children():
            step = _Step(layer)
            try:
                program = torch.export.export(
                    step,
                    frontier,
                    dynamic_shapes=(tuple({0: batch} for _ in frontier),),
                    strict=False,
                )
            except Exception as exc:
                raise CaptureError(f"torch.export cannot capture layer {child_name!r}: {exc}") from exc
            frontier = tuple(step(*frontier))
            programs.append(program)
            specs = tuple(_dynamic_spec(t) for t in frontier)
            cuts.append(Cut(len(cuts), f"after {child_name}", specs, 0))
    cuts = [Cut(c.index, c.name, c.tensors, frontier_nbytes(c.tensors)) for c in cuts]
    _, out_spec = pytree.tree_flatten(model(*example_inputs))
    in_spec_s, out_spec_s = pytree.treespec_dumps(in_spec), pytree.treespec_dumps(out_spec)
    graph_hash = _graph_hash(programs, cuts, in_spec_s, out_spec_s)
    return Bundle(
        name=name,
        cuts=cuts,
        inputs=cuts[0].tensors,
        in_spec=in_spec_s,
        out_spec=out_spec_s,
        graph_hash=graph_hash,
        segments=[p.module() for p in programs],
        version=version,
        _programs=programs,
    )


def _graph_hash(programs: Sequence[torch.export.ExportedProgram], cuts: Sequence[Cut], *specs: str) -> str:
    """A digest of the graphs, weights and cuts: edge and cloud must agree on it."""
    h = hashlib.sha256()
    h.update(json.dumps([c.to_json() for c in cuts], sort_keys=True).encode())
    for s in specs:
        h.update(s.encode())
    for program in programs:
        h.update(str(program.graph).encode())
        for key, value in sorted(program.state_dict.items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
