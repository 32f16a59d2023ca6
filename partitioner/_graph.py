"""Cut an exported graph into a chain of segments (DESIGN.md, "The model, cut into a chain").

The pass, stated as a contract:

- requires: an unlifted ``torch.fx.GraphModule`` from ``ExportedProgram.module()`` whose nodes
  carry ``meta["val"]`` (fake tensors or symbolic ints), with the batch dimension symbolic;
- ensures: ``find_cuts`` returns positions ``p`` in ``0..N`` (``N`` compute nodes in graph
  order) whose frontiers are exact: every value defined at or before ``p`` and used after it is
  a tensor with the batch as its leading dimension (symbolic sizes are recomputed from shapes,
  never sent); ``build_segment(a, b)`` returns a GraphModule mapping frontier ``a`` to
  frontier ``b``, holding only the weights its nodes use.

Positions are pruned when (1) the frontier holds the same values as the previous kept one (the
same nodes, or nodes that only pass a value through: a dropout in eval mode, a full slice, a
clone, a view to the same shape; :meth:`Cuttable.source`), so the cut adds nothing, or (2) a
value crossing it is not a batch-leading tensor (a list, a data-dependent scalar, a tensor
without the batch dim or with the batch folded into another dim): the cloud batches frontiers
along dim 0, so such a cut could not be served. Both rules are documented in
docs/partitioning.md.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import sympy  # type: ignore[import-untyped]  # sympy ships no type stubs
import torch
from torch import fx

__all__ = ["Cuttable", "SegmentError"]

_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


class SegmentError(Exception):
    """A segment cannot be built between two positions (internal: the cut is pruned)."""


def _is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), _SYM_TYPES)


def _module_path(node: fx.Node) -> str:
    """The innermost module that ``node`` runs in, e.g. ``layer2.1``; a module called more than
    once (one activation module reused, say) names the call: ``_swish (call 2)``, so that every
    cut's name says where it is (torch.export keys the n-th call ``...@{n-1}``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, (path, _) = list(stack.items())[-1]
    if str(path).startswith("_empty_nn_module_stack"):
        return ""
    call = str(key).rpartition("@")[2] if "@" in str(key) else ""
    return f"{path} (call {int(call) + 1})" if call.isdigit() else str(path)


@dataclass
class Cuttable:
    """An exported graph, analysed for cutting."""

    gm: fx.GraphModule
    batch: sympy.Symbol

    def __post_init__(self) -> None:
        graph = self.gm.graph
        self.inputs = [n for n in graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.nodes if n.op == "output")
        self.outputs: list[fx.Node] = list(output.args[0])
        # Compute nodes in graph order; symbolic scalars are recomputed where needed, and the
        # export's input guard is dropped (each segment's own export guards its inputs).
        self.compute = [
            n
            for n in graph.nodes
            if n.op in ("call_function", "call_module", "call_method")
            and not _is_sym(n)
            and not (n.op == "call_module" and n.target == "_guards_fn")
        ]
        self.position = {n: i + 1 for i, n in enumerate(self.compute)}
        for n in self.inputs:
            self.position[n] = 0
        last_use: dict[fx.Node, int] = {}
        n_compute = len(self.compute)
        for node in self.compute:
            for used in node.all_input_nodes:
                last_use[used] = max(last_use.get(used, 0), self.position[node])
        for node in self.outputs:
            if isinstance(node, fx.Node):
                last_use[node] = n_compute + 1
        self.last_use = last_use

    @property
    def n_positions(self) -> int:
        return len(self.compute)

    def frontier(self, p: int) -> list[fx.Node] | None:
        """Values crossing position ``p``, in definition order; None when the cut is invalid."""
        if p == 0:
            return list(self.inputs)
        if p == self.n_positions:
            return list(self.outputs)
        crossing = [
            n for n in [*self.inputs, *self.compute[:p]] if self.last_use.get(n, -1) > p and not _is_sym(n)
        ]
        for n in crossing:
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() == 0:
                return None
            lead = val.shape[0]
            if not isinstance(lead, torch.SymInt) or lead.node.expr != self.batch:
                return None
            if any(isinstance(d, torch.SymInt) for d in val.shape[1:]):
                return None
        return crossing

    def source(self, node: fx.Node) -> fx.Node:
        """The node whose value ``node`` holds: itself, unless it only passes a value on unchanged
        (same shape, dtype and values: :func:`_passes_through`), then that value's source."""
        while _passes_through(node):
            node = node.args[0]  # type: ignore[assignment]  # checked by _passes_through
        return node

    def same_values(self, a: Sequence[fx.Node], b: Sequence[fx.Node]) -> bool:
        """Whether frontiers ``a`` and ``b`` hold exactly the same values (in any order)."""
        return {self.source(n) for n in a} == {self.source(n) for n in b}

    def name(self, p: int) -> str:
        """A readable name for position ``p``, by module path and position first: ``after
        layer2.1`` at a module's end, ``in layer2.1, op 3 of 7 (relu)`` inside one, ``after
        layer2.1, op 2 of 3 (add)`` between modules (the ops its parent module runs after its
        last submodule call), the graph's own node name last."""
        if p == 0:
            return "input"
        if p == self.n_positions:
            return "output"
        node = self.compute[p - 1]
        path = _module_path(node)
        following = _module_path(self.compute[p])
        if path and not _within(following, path):
            # Name the outermost module that ends here: "after blocks.0.attn", not ".attn.proj".
            parts = path.split(".")
            ending = next(
                prefix
                for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                if not _within(following, prefix)
            )
            return f"after {ending}"
        if path:
            ops = [n for n in self.compute if _within(_module_path(n), path)]
            return f"in {path}, op {ops.index(node) + 1} of {len(ops)} ({node.name})"
        # An op of the top-level forward: placed after the last module call before it.
        start = p - 1
        while start > 0 and not _module_path(self.compute[start - 1]):
            start -= 1
        end = p
        while end < self.n_positions and not _module_path(self.compute[end]):
            end += 1
        anchor = _module_path(self.compute[start - 1]).split(" (call")[0] if start > 0 else "input"
        return f"after {anchor}, op {p - start} of {end - start} ({node.name})"

    def build_segment(self, a: int, b: int) -> fx.GraphModule:
        """A GraphModule computing frontier ``b`` from frontier ``a``."""
        front_a, front_b = self.frontier(a), self.frontier(b)
        if front_a is None or front_b is None:
            raise SegmentError(f"positions {a} or {b} are not valid cuts")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, node in enumerate(front_a):
            ph = graph.placeholder(f"in_{i}")
            ph.meta = dict(node.meta)
            env[node] = ph
        for node in self.compute[a:b]:
            for used in node.all_input_nodes:
                self._materialize(used, graph, env)
            env[node] = graph.node_copy(node, lambda n: env[n])
        outs = []
        for node in front_b:
            if not isinstance(node, fx.Node):
                raise SegmentError(f"output {node!r} is not a graph value")
            outs.append(self._materialize(node, graph, env))
        graph.output(tuple(outs))
        graph.eliminate_dead_code()
        return fx.GraphModule(self.gm, graph)

    def _materialize(self, node: fx.Node, graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> fx.Node:
        """``node`` inside the segment being built: copied, fetched, or recomputed from shapes."""
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.node_copy(node)
            return env[node]
        if _is_sym(node):
            env[node] = self._recompute_sym(node, graph, env)
            return env[node]
        raise SegmentError(f"{node.name} is needed but neither crosses the cut nor is recomputable")

    def _recompute_sym(self, node: fx.Node, graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> fx.Node:
        expr = node.meta["val"].node.expr
        for old, new in env.items():
            val = old.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for dim, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expr:
                    sym = graph.call_function(torch.ops.aten.sym_size.int, (new, dim))
                    sym.meta = dict(node.meta)
                    return sym
        if node.op == "call_function" and node.target in _SYM_OPS:
            for used in node.all_input_nodes:
                self._materialize(used, graph, env)
            return graph.node_copy(node, lambda n: env[n])
        raise SegmentError(f"symbolic value {node.name} ({expr}) cannot be recomputed in this segment")


#: Arithmetic on symbolic sizes that a segment may recompute from its inputs' shapes.
_SYM_OPS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.neg,
    torch.sym_int,
    torch.sym_float,
    torch.sym_max,
    torch.sym_min,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
}


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


#: Ops whose output is their first argument's value when the shape and dtype stay the same.
_PASS_THROUGH = {
    torch.ops.aten.alias.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.dropout.default,  # only with train=False: checked below
    torch.ops.aten.expand.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.slice.Tensor,  # only the whole dim with step 1: checked below
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.view.default,
}


def _passes_through(node: fx.Node) -> bool:
    """Whether ``node`` holds exactly its first argument's value: a pass-through op whose output
    has the input's shape and dtype (a dropout not training, a slice of a whole dim)."""
    if node.op != "call_function" or node.target not in _PASS_THROUGH or not node.args:
        return False
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return False
    a, b = source.meta.get("val"), node.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype != b.dtype:
        return False
    if [str(d) for d in a.shape] != [str(d) for d in b.shape]:
        return False
    if node.target is torch.ops.aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    if node.target is torch.ops.aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        # The same length from 0 with step 1: the whole dim.
        whole = start is None or (isinstance(start, int) and start == 0)
        return whole and isinstance(step, int) and step == 1
    return True


def batch_symbol(gm: fx.GraphModule) -> sympy.Symbol | None:
    """The symbol of the first input's leading dim (the exported dynamic batch)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
                expr = val.shape[0].node.expr
                return expr if isinstance(expr, sympy.Symbol) else None
    return None
