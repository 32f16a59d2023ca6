"""Compile's ONNX side: the segment chain exported once, split into per-segment graph pieces.

The segments are fused into one fx graph that returns every distinct frontier tensor, which is
exported once (``torch.export`` with a dynamic batch, then ``torch.onnx.export(program,
dynamo=True)``): exporting each segment on its own costs about a second per segment (EfficientNet-
Lite0 has hundreds). The ONNX graph is then split along the cuts: segment ``i``'s piece is the
nodes and initializers that compute frontier ``i + 1`` from frontier ``i`` (a constant two
segments share is copied into each under its own name), serialized as a GraphProto fragment.
Protobuf fragments concatenate, so ``splitinfer.runtime.fuse_range`` builds the graph of any range
``start..stop`` (a head, a tail, the whole model) by joining bytes, with no onnx package: one
ONNX Runtime session per range (docs/runtimes.md).

The whole ONNX chain runs once on the batched example inputs and every frontier is compared
with torch's (within :data:`RTOL`/:data:`ATOL` of its scale); the error at each cut goes into
the manifest. A model the exporter refuses, or whose ONNX disagrees with torch, gets a clear
warning naming the operator and a bundle that runs on torch only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from splitinfer.errors import CaptureError
from splitinfer.runtime import OnnxGraph

__all__ = ["ATOL", "RTOL", "export_onnx", "onnx_importable"]

log = logging.getLogger("splitinfer.partitioner")

#: The ONNX chain must reproduce the torch chain within these (ATOL + RTOL * max |torch|).
RTOL, ATOL = 1e-3, 1e-4


def onnx_importable() -> bool:
    """Whether ``onnx``, ``onnxscript`` (the exporter's needs) and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warns about its internals; a compile stays quiet."""
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(previous)


def _operator(exc: BaseException) -> str:
    """The operator an export error names, else the error's first line."""
    text = str(exc)
    for pattern in (r"(aten::[A-Za-z0-9_.]+)", r"(aten\.[A-Za-z0-9_.]+)", r"(torch\.ops\.[A-Za-z0-9_.]+)"):
        found = re.search(pattern, text)
        if found:
            return f"operator {found.group(1)}"
    first = text.strip().splitlines()[0][:300] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"


def _all_frontiers(segments: Sequence[fx.GraphModule]) -> tuple[fx.GraphModule, list[list[int]]]:
    """One module running ``segments`` that returns every frontier tensor, and for each cut the
    positions of its tensors in that output (cut 0: the inputs).

    Past cut 0 each frontier tensor is returned as a clone taken at its cut: a segment may
    mutate its input in place (``zeros_like(mask).masked_fill_(mask, -inf)`` in
    nn.MultiheadAttention's padding mask, cut between the two), and the tensor itself would come
    out of the functional graph as its value after the mutation, not the value crossing the cut
    (a head on ONNX Runtime then sent -inf where torch's head sends 0)."""
    root = torch.nn.Module()
    graph = fx.Graph()
    values: list[fx.Node] = []
    distinct: dict[fx.Node, int] = {}
    cuts: list[list[int]] = []

    def positions(nodes: Sequence[fx.Node]) -> list[int]:
        for node in nodes:
            distinct.setdefault(node, len(distinct))
        return [distinct[n] for n in nodes]

    for i, seg in enumerate(segments):
        root.add_module(f"s{i}", seg)
        env: dict[fx.Node, fx.Node] = {}
        placeholders = [n for n in seg.graph.nodes if n.op == "placeholder"]
        if i == 0:
            values = [graph.placeholder(f"in_{j}") for j in range(len(placeholders))]
            cuts.append(positions(values))
        for node, value in zip(placeholders, values, strict=True):
            env[node] = value
        for node in seg.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                values = [env[n] for n in node.args[0]]
            elif node.op == "get_attr":
                env[node] = graph.get_attr(f"s{i}.{node.target}")
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
        snapshots: dict[fx.Node, fx.Node] = {}
        for value in values:
            if value not in snapshots:
                snapshots[value] = graph.call_function(torch.ops.aten.clone.default, (value,))
        cuts.append(positions([snapshots[v] for v in values]))
    graph.output(tuple(distinct))
    return fx.GraphModule(root, graph), cuts


def export_onnx(
    segments: Sequence[fx.GraphModule], args: tuple[torch.Tensor, ...]
) -> tuple[OnnxGraph, dict[str, Any]]:
    """The segment chain as an :class:`OnnxGraph` and the manifest's ``onnx`` entry (errors per
    cut). ``args`` are the batched example inputs (batch >= 2, so the batch stays dynamic).

    CaptureError naming the operator when the chain cannot be exported or does not match torch.
    """
    import onnx

    module, cuts = _all_frontiers(segments)
    with torch.no_grad():
        want = [t.detach() for t in module(*args)]
    for k, cut in enumerate(cuts):
        if any(want[p].dtype == torch.bfloat16 for p in cut):
            # ONNX Runtime's Python API hands tensors over as numpy arrays, and numpy has no
            # bfloat16: such a graph would export but could not be fed or read.
            raise CaptureError(
                f"ONNX Runtime cannot carry the bfloat16 tensor at cut {k} (numpy has no bfloat16); "
                "cast it to float32 or float16 in the model to run it on ONNX Runtime"
            )
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            program = torch.export.export(
                module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False
            )
            # optimize=False: the exporter's optimizer fuses across frontiers (a Pad folded into the
            # next segment's Conv reads the input past the cut); _fold only folds constants, and
            # ORT fuses within each range's session.
            onnx_program = torch.onnx.export(program, args, dynamo=True, verbose=False, optimize=False)
        assert onnx_program is not None
        model = onnx_program.model_proto
    except Exception as exc:  # the exporter raises many types; name the operator at the boundary
        raise CaptureError(f"ONNX cannot export this model: {_operator(exc)}") from exc
    _fold(model)
    graph = _split(onnx, model, cuts)
    errors = _check(model, graph, args, _torch_frontiers(segments, args), cuts)
    return graph, {"opset": _opset(model), "max_abs_error": errors}


def _fold(model: Any) -> None:
    """Constant-fold the unoptimized export in place (onnxscript's folder; no rewrites).

    Unoptimized, the exporter leaves values ONNX Runtime cannot fold itself: a bias-less Conv
    gets ``Expand(CastLike(0, x), Shape(weight))`` as its bias and a ReLU6 ``Clip`` gets
    ``CastLike(6, x)`` bounds, which depend on the activation ``x`` (only for its type). ORT's
    Conv+BatchNorm, Conv+Clip and Pad+Conv fusions need those inputs constant, so they did not
    fire, and the bundle's EfficientNet-Lite0 ran 2.8x slower than a plain export (27 vs 9.6 ms
    at batch 1, 1 thread; docs/runtimes.md). The folder resolves them from the graph's types
    (this must run before the split: the pieces carry no value_info). Constant folding only
    replaces values computed from constants, so no frontier moves, unlike the exporter's full
    optimizer (which fuses a Pad into the next segment's Conv, across the cut)."""
    import onnxscript.optimizer

    folded = type(model)()
    folded.CopyFrom(model)
    try:
        with _quiet():
            onnxscript.optimizer.fold_constants(folded)
            onnxscript.optimizer.remove_unused_nodes(folded)
    except Exception as exc:  # a folder bug costs speed, not the export: keep the graph as it is
        log.warning("ONNX constant folding failed (%s); the graph stays unfolded (slower)", _operator(exc))
        return
    model.CopyFrom(folded)


def _opset(model: Any) -> int:
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _split(onnx: Any, model: Any, cuts: list[list[int]]) -> OnnxGraph:
    """Per-segment GraphProto fragments of ``model`` (whose outputs are the distinct frontier
    tensors, cut 0's being its inputs) and the input/output fragments of every cut."""
    g = model.graph
    n_inputs = len(cuts[0])
    # The ONNX value of each distinct frontier tensor: a graph input, or the graph output (or
    # the source of the Identity that names it).
    names: list[str] = []
    infos: list[Any] = []
    identity = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
    for j, out in enumerate(g.output):
        if j < n_inputs:
            name = g.input[j].name
            infos.append(g.input[j])
        else:
            # The optimizer forwards an Identity's consumers to its source and keeps the
            # Identity for the graph output: the source is the value the next segments read.
            name = out.name
            while name in identity:
                name = identity[name]
            infos.append(out)
        names.append(name)
    model_inputs = {vi.name for vi in g.input}
    producer: dict[str, int] = {}
    for index, node in enumerate(g.node):
        for out in node.output:
            producer[out] = index
    initializers = {t.name: t for t in g.initializer}
    owner: dict[str, int] = {}  # the first segment holding each node's outputs or initializer
    bodies: list[bytes] = []
    for i in range(len(cuts) - 1):
        given = {names[p] for p in cuts[i]}
        wanted = [names[p] for p in cuts[i + 1]]
        nodes: set[int] = set()
        batch_from: dict[int, str] = {}
        stack = [w for w in wanted if w not in given]
        seen: set[str] = set()
        used_inits: set[str] = set()
        while stack:
            value = stack.pop()
            if value in seen or value in given or not value:
                continue
            seen.add(value)
            if value in initializers:
                used_inits.add(value)
                continue
            found = producer.get(value)
            if found is None:
                raise CaptureError(f"the ONNX graph of segment {i} needs {value!r}, which nothing computes")
            if found in nodes:
                continue
            nodes.add(found)
            node = g.node[found]
            if _batch_of_input(onnx, node, model_inputs - given) and cuts[i]:
                # The exporter takes the symbolic batch size from the model's input wherever it
                # is needed; past cut 0 it is the batch of any frontier tensor (dim 0 of each).
                batch_from[found] = names[cuts[i][0]]
                continue
            stack.extend(_node_inputs(node))
        body = onnx.GraphProto()
        renames: dict[str, str] = {}
        for index in sorted(nodes):
            for out in g.node[index].output:
                if owner.setdefault(out, i) != i:
                    renames[out] = f"{out}__s{i}"
        for name in sorted(used_inits):
            if owner.setdefault(name, i) != i:
                renames[name] = f"{name}__s{i}"
        for index in sorted(nodes):
            node = body.node.add()
            node.CopyFrom(g.node[index])
            if index in batch_from:
                node.input[0] = batch_from[index]
            node.name = f"n{index}_s{i}"  # unique where a node is copied into several segments
            _rename(node, renames)
        for name in sorted(used_inits):
            tensor = body.initializer.add()
            tensor.CopyFrom(initializers[name])
            tensor.name = renames.get(name, name)
        bodies.append(body.SerializeToString())
    # A cut's outputs are Identity copies under names of their own: two frontier tensors may
    # be one ONNX value, and a range's output may be its input (ONNX Runtime drops the copies).
    ends = []
    for k, cut in enumerate(cuts):
        inp, out = onnx.GraphProto(), onnx.GraphProto()
        for j, p in enumerate(cut):
            vi = infos[p]
            inp.input.add().CopyFrom(vi)
            inp.input[-1].name = names[p]
            out.node.append(onnx.helper.make_node("Identity", [names[p]], [f"cut{k}_out{j}"]))
            out.output.add().CopyFrom(vi)
            out.output[-1].name = f"cut{k}_out{j}"
        ends.append((inp.SerializeToString(), out.SerializeToString()))
    header = onnx.ModelProto()
    header.CopyFrom(model)
    header.ClearField("graph")
    return OnnxGraph(header.SerializeToString(), bodies, [e[0] for e in ends], [e[1] for e in ends])


def _batch_of_input(onnx: Any, node: Any, inputs: set[str]) -> bool:
    """Whether ``node`` is ``Shape(x, start=0, end=1)`` of one of the model ``inputs``."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] not in inputs:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("start", 0) == 0 and attrs.get("end") == 1


def _node_inputs(node: Any) -> list[str]:
    """The values a node reads, those its subgraphs (If, Loop, Scan) read from outside included."""
    found = list(node.input)
    for attr in node.attribute:
        for sub in [attr.g, *attr.graphs] if attr.HasField("g") or attr.graphs else []:
            local = {vi.name for vi in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                local.update(n.output)
            found += [v for n in sub.node for v in _node_inputs(n) if v not in local]
    return found


def _rename(node: Any, renames: dict[str, str]) -> None:
    if not renames:
        return
    for j, name in enumerate(node.input):
        if name in renames:
            node.input[j] = renames[name]
    for j, name in enumerate(node.output):
        if name in renames:
            node.output[j] = renames[name]


def _torch_frontiers(
    segments: Sequence[fx.GraphModule], args: tuple[torch.Tensor, ...]
) -> list[list[torch.Tensor]]:
    """Every cut's frontier as torch's heads compute it: the segments run one by one, each on
    copies (a segment that mutates its input in place must not change the frontier kept)."""
    frontier = [t.detach().clone() for t in args]
    out = [frontier]
    with torch.no_grad():
        for seg in segments:
            frontier = [t.detach().clone() for t in seg(*[t.clone() for t in frontier])]
            out.append(frontier)
    return out


def _check(
    model: Any,
    graph: OnnxGraph,
    args: tuple[torch.Tensor, ...],
    want: list[list[torch.Tensor]],
    cuts: list[list[int]],
) -> dict[str, float]:
    """The exported graph (every frontier an output) in ONNX Runtime against torch at every cut;
    each segment's piece on its own, fed torch's frontier, against torch's next frontier; and the
    whole chain fused from the pieces: the max abs error per cut; CaptureError where a frontier
    is off by more than the tolerance.

    The pieces are what heads and tails run (any range is their concatenation, and a piece reads
    nothing but its frontier, its own nodes and initializers): checking the unsplit graph alone
    once let a piece that computed a wrong frontier ship (a transformer's masked attention did).
    ``want`` is torch's frontier at every cut (:func:`_torch_frontiers`), not the fused module's
    outputs: those alias tensors a later segment mutates in place."""
    import onnxruntime as ort

    from splitinfer.runtime import OnnxRunner, session_options

    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)}
    outputs = session.run(None, feeds)
    errors = {}
    for k, cut in enumerate(cuts):
        try:
            errors[str(k)] = _error([outputs[p] for p in cut], want[k], k)
        except CaptureError as exc:
            where = f", computed by segment {k - 1} ({_operators(graph.bodies[k - 1])})" if k else ""
            raise CaptureError(f"{exc}{where}") from None
    del session, outputs
    n = len(cuts) - 1
    for i in range(n):
        piece = OnnxRunner(graph, threads=1).run(i, i + 1, [t.numpy() for t in want[i]])
        try:
            error = _error(piece, want[i + 1], i + 1)
        except CaptureError as exc:
            raise CaptureError(f"{exc}, computed by segment {i} ({_operators(graph.bodies[i])})") from None
        errors[str(i + 1)] = max(errors[str(i + 1)], error)
    whole = OnnxRunner(graph, threads=1).run(0, n, [t.numpy() for t in args])
    _error(whole, want[n], n)
    return errors


def _operators(body: bytes) -> str:
    """The ONNX operators of a segment's piece, for a message: ``Where, Softmax, ...``."""
    import onnx

    piece = onnx.GraphProto()
    piece.ParseFromString(body)
    ops = list(dict.fromkeys(node.op_type for node in piece.node))
    return "operators " + ", ".join(ops[:12]) + (", ..." if len(ops) > 12 else "")


def _error(got: Sequence[np.ndarray], want: Sequence[torch.Tensor], cut: int) -> float:
    if len(got) != len(want):
        raise CaptureError(f"the ONNX chain yields {len(got)} tensors at cut {cut}, torch {len(want)}")
    worst = 0.0
    for a, b in zip(got, want):
        ref = b.numpy()
        if a.shape != ref.shape or a.dtype != ref.dtype:
            raise CaptureError(
                f"the ONNX chain yields a {a.dtype} {a.shape} tensor at cut {cut}, "
                f"torch a {ref.dtype} {ref.shape} one"
            )
        if not ref.size:
            continue
        got64, ref64 = a.astype(np.float64), ref.astype(np.float64)
        finite = np.isfinite(ref64)
        same = (got64 == ref64) | (
            np.isnan(got64) & np.isnan(ref64)
        )  # inf, -inf and NaN where torch has them
        if not np.all(same[~finite]):
            raise CaptureError(
                f"the ONNX chain has non-finite values where torch has none, or other ones, at cut {cut}"
            )
        if not finite.any():
            continue
        diff = float(np.max(np.abs(got64[finite] - ref64[finite])))
        scale = float(np.max(np.abs(ref64[finite])))
        if not diff <= ATOL + RTOL * scale:  # NaN fails too
            raise CaptureError(
                f"the ONNX chain differs from torch by {diff:.3g} at cut {cut} (scale {scale:.3g})"
            )
        worst = max(worst, diff)
    return worst
