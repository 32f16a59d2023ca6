"""The bundle: a model cut into a chain of segments, stored as a directory (DESIGN.md).

Layout::

    manifest.json         name, version, graph hash, inputs, output structure, cuts, segment
                          files with their sha256, codecs offered, fidelity table, profiles
    segment_000.pt2 ...   one serialized torch.export program per segment

Segment ``i`` maps frontier ``i`` (a tuple of tensors) to frontier ``i + 1``. Frontier 0 is the
flattened model inputs, frontier ``n`` the flattened outputs; so ``head(k)`` runs segments
``0..k-1`` and ``tail(k)`` segments ``k..n-1``. Loading verifies every file's sha256 first and
needs none of the user's Python code. A process may load only a prefix (the edge,
``upto_cut``) or a suffix (the cloud, ``from_cut``) of the segments.

A :class:`Bundle` is a :class:`~splitinfer.manifest.Manifest` plus the segments this process
loaded. Importing this module loads no torch; running, saving or loading segments does.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import zipfile
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitinfer import _pytree
from splitinfer.errors import BundleError, ConfigError, CutNotLoadedError
from splitinfer.manifest import (
    MANIFEST,
    Cut,
    Manifest,
    bottleneck_file,
    dict_file,
    exit_file,
    load_dictionaries,
    load_projections,
    projection_file,
    read_manifest,
    segment_file,
    sha256_of,
)
from splitinfer.runtime import (
    ONNX_FILE,
    OnnxGraph,
    OnnxRunner,
    choose_runtime,
    load_onnx,
    load_onnx_head,
)
from splitinfer.tensors import TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = ["Bundle", "Cut"]

#: torch.export.load is not thread-safe (its deserializer keeps module-level state and fails
#: with "_CURRENT_DESERIALIZER is already set" when two threads load at once): segments of all
#: bundles in a process are deserialized one at a time (hashing and checks still run in parallel).
_EXPORT_LOAD_LOCK = threading.Lock()

Segment = Callable[..., Sequence["torch.Tensor"]]


@dataclass(repr=False)
class Bundle(Manifest):
    """A compiled model: its manifest (cuts, codecs, tables), and the segments this process loaded.

    Build one with :func:`splitinfer.compile`, or :meth:`load` one from disk.
    """

    #: Loaded segments by index; ``None`` where this process did not load one.
    segments: list[Segment | None] = field(kw_only=True)
    #: The serialized programs, kept after compile so that :meth:`save` can write them.
    _programs: list[Any] | None = field(default=None, repr=False, kw_only=True)
    #: Fused runners of segment ranges, built on first use (see :func:`fuse_segments`).
    _runners: dict[tuple[int, int], Callable[..., Sequence[torch.Tensor]]] = field(
        default_factory=dict, repr=False, compare=False, kw_only=True
    )
    #: The ONNX Runtime sessions when this bundle runs on ONNX Runtime (``runtime=`` of
    #: :meth:`load`), and the cuts ``lo..hi`` between which it may run segments.
    onnx_runner: OnnxRunner | None = field(default=None, repr=False, compare=False, kw_only=True)
    _onnx_range: tuple[int, int] = field(default=(0, 0), repr=False, compare=False, kw_only=True)
    #: The ONNX graph in pieces, kept after compile so that :meth:`save` can write it.
    _onnx_graph: OnnxGraph | None = field(default=None, repr=False, compare=False, kw_only=True)
    #: Loaded early-exit heads by cut (``exits`` in the manifest; torch runtime), and their
    #: programs kept after compile for :meth:`save`.
    exit_heads: dict[int, Segment] = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    _exit_programs: dict[int, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    _exit_onnx: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    #: Loaded networks of the trained bottlenecks (``bottlenecks`` in the manifest) by cut and
    #: codec base: ``(encoder, decoder)`` as numpy functions, None where not loaded (an edge loads
    #: the encoders of the cuts its head reaches, a cloud the decoders of its tails); their
    #: programs and ONNX models kept after compile for :meth:`save`.
    bottleneck_nets: dict[tuple[int, str], tuple[Any, Any]] = field(
        default_factory=dict, repr=False, compare=False, kw_only=True
    )
    _bottleneck_programs: dict[tuple[int, str], tuple[Any, Any]] = field(
        default_factory=dict, repr=False, compare=False, kw_only=True
    )
    _bottleneck_onnx: dict[tuple[int, str], tuple[bytes, bytes]] = field(
        default_factory=dict, repr=False, compare=False, kw_only=True
    )

    def __post_init__(self) -> None:
        if len(self.segments) != self.n_segments:
            raise ConfigError(
                f"bundle {self.name!r} has {len(self.cuts)} cuts, so {self.n_segments} segments; "
                f"got {len(self.segments)}"
            )

    def __repr__(self) -> str:
        loaded = sum(s is not None for s in self.segments)
        return f"Bundle({self._summary()}, {loaded}/{self.n_segments} segments loaded)"

    @property
    def manifest(self) -> Manifest:
        """This bundle's metadata alone, without its segments."""
        return Manifest(**{name: getattr(self, name) for name in Manifest.__dataclass_fields__})

    @property
    def runtime(self) -> str:
        """Where this bundle's segments run: ``torch`` or ``onnxruntime``."""
        return "torch" if self.onnx_runner is None else "onnxruntime"

    def can_head(self, k: int) -> bool:
        """Whether this process holds segments ``0..k-1``."""
        if self.onnx_runner is not None:
            return self._onnx_range[0] == 0 and k <= self._onnx_range[1]
        return all(s is not None for s in self.segments[:k])

    def can_tail(self, k: int) -> bool:
        """Whether this process holds segments ``k..n-1``."""
        if self.onnx_runner is not None:
            return self._onnx_range[1] == self.n_segments and k >= self._onnx_range[0]
        return all(s is not None for s in self.segments[k:])

    def flatten_inputs(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """The model inputs as frontier 0, checked against the compiled input specs."""
        if self.onnx_runner is not None:  # numpy arrays or torch tensors, without torch's pytree
            leaves = _pytree.flatten((tuple(inputs), {}), self.in_spec)
            for i, (leaf, want) in enumerate(zip(leaves, self.inputs)):
                if not hasattr(leaf, "shape") or not want.matches(TensorSpec.of(leaf)):
                    got = TensorSpec.of(leaf) if hasattr(leaf, "shape") else type(leaf).__name__
                    raise ConfigError(f"input {i} of bundle {self.name!r} must be {want}, got {got}")
            return tuple(leaves)
        import torch
        from torch.utils import _pytree as pytree

        leaves, spec = pytree.tree_flatten((tuple(inputs), {}))
        if pytree.treespec_dumps(spec) != self.in_spec:
            raise ConfigError(
                f"bundle {self.name!r} takes {len(self.inputs)} input tensor(s) "
                f"({', '.join(map(str, self.inputs))}), got {len(leaves)} leaves in another structure"
            )
        for i, (leaf, want) in enumerate(zip(leaves, self.inputs)):
            if not isinstance(leaf, torch.Tensor) or not want.matches(TensorSpec.of(leaf)):
                got = TensorSpec.of(leaf) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                hint = ""
                if type(leaf).__module__ == "numpy":
                    hint = (
                        ": this bundle runs on torch, so pass a torch tensor (torch.from_numpy(x)), "
                        "or load it with runtime='onnxruntime', which takes numpy arrays"
                    )
                raise ConfigError(f"input {i} of bundle {self.name!r} must be {want}, got {got}{hint}")
        return tuple(leaves)

    def run_segments(
        self, start: int, stop: int, frontier: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Frontier ``stop`` from frontier ``start``."""
        if self.onnx_runner is not None:
            lo, hi = self._onnx_range
            missing = [i for i in range(start, stop) if not lo <= i < hi]
        else:
            missing = [i for i in range(start, stop) if self.segments[i] is None]
        if missing:
            raise CutNotLoadedError(
                f"segments {missing[0]}..{missing[-1]} of bundle {self.name!r} are not loaded in "
                f"this process; load the bundle with a wider upto_cut/from_cut"
            )
        if start == stop:
            return tuple(frontier)
        if self.onnx_runner is not None:
            return _run_onnx(self.onnx_runner, start, stop, frontier)
        import torch

        runner = self._runners.get((start, stop))
        if runner is None:
            runner = fuse_segments(self.segments[start:stop])  # type: ignore[arg-type]
            self._runners[(start, stop)] = runner
        with torch.inference_mode():
            return tuple(runner(*frontier))

    def head(self, k: int, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """The tensors crossing cut ``k`` for these model inputs."""
        self.cut(k)
        frontier = self.run_segments(0, k, self.flatten_inputs(inputs))
        if k == 0 and self.onnx_runner is None:  # the inputs themselves: as detached as a head's outputs
            return tuple(t.detach() for t in frontier)
        return frontier

    def tail(self, k: int, frontier: Sequence[torch.Tensor]) -> Any:
        """The model outputs (same structure as ``model(*inputs)``) from cut ``k``'s frontier."""
        self.cut(k)
        self.check_frontier(k, frontier)
        leaves = self.run_segments(k, self.n_segments, frontier)
        if self.onnx_runner is not None:
            return _pytree.unflatten(list(leaves), self.out_spec)
        from torch.utils import _pytree as pytree

        return pytree.tree_unflatten(list(leaves), pytree.treespec_loads(self.out_spec))

    def exit_at(self, k: int) -> dict[str, Any] | None:
        """The manifest's entry of the early exit at cut ``k`` whose head this process loaded
        and that has a threshold (it may answer), or None."""
        for entry in self.exits:
            if entry.get("cut") == k and entry.get("threshold") is not None and k in self.exit_heads:
                return entry
        return None

    def run_exit(self, k: int, frontier: Sequence[Any]) -> tuple[Any, list[bool]]:
        """The exit head at cut ``k`` on ``frontier`` (batch first): its logits (the model's
        flattened outputs, a 1-tuple) and, per row, whether it is confident enough to answer
        (its largest softmax probability at least the exit's threshold). Numpy in, numpy out."""
        entry = self.exit_at(k)
        if entry is None:
            raise CutNotLoadedError(f"bundle {self.name!r} has no early exit loaded at cut {k}")
        import numpy as np

        x = frontier[0]
        as_numpy = type(x).__module__ == "numpy"
        if self.onnx_runner is not None:  # the head on ONNX Runtime: numpy in and out
            scores: Any = self.exit_heads[k](x if as_numpy else x.detach().cpu().numpy())[0]
            logits: Any = scores
            if not as_numpy:
                import torch

                logits = torch.from_numpy(scores)
        else:
            import torch

            with torch.no_grad():
                out: Any = self.exit_heads[k](torch.from_numpy(x) if as_numpy else x)
            logits = out[0] if isinstance(out, tuple | list) else out
            scores = logits.detach().cpu().float().numpy()
            if as_numpy:
                logits = scores
        # the same formula as partitioner._exits.exit_confidence, which calibrated the threshold
        values = np.asarray(scores, dtype=np.float64)
        z = np.exp(values - values.max(axis=1, keepdims=True))
        top = z.max(axis=1) / z.sum(axis=1)
        return (logits,), (top >= float(entry["threshold"])).tolist()

    def _bottleneck_nets(self, k: int, base: str) -> tuple[Any, Any]:
        return self.bottleneck_nets.get((k, base), (None, None))

    def check_frontier(self, k: int, frontier: Sequence[torch.Tensor]) -> None:
        """Raise ConfigError unless ``frontier`` fits cut ``k`` (count, dtypes, shapes)."""
        cut = self.cuts[k]
        if len(frontier) != len(cut.tensors):
            raise ConfigError(
                f"cut {k} of {self.name!r} carries {len(cut.tensors)} tensor(s), got {len(frontier)}"
            )
        for i, (t, want) in enumerate(zip(frontier, cut.tensors)):
            if not want.matches(TensorSpec.of(t)):
                raise ConfigError(f"tensor {i} at cut {k} must be {want}, got {TensorSpec.of(t)}")

    # -- storage -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle directory (atomically: a temporary sibling renamed into place)."""
        if self._programs is None:
            raise BundleError(
                "only a bundle made by splitinfer.compile can be saved; copy the directory instead"
            )
        import torch

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            files = {}
            for i, program in enumerate(self._programs):
                seg = tmp / segment_file(i)
                torch.export.save(program, seg)
                files[seg.name] = sha256_of(seg)
            for k, program in self._exit_programs.items():
                path = tmp / exit_file(k)
                torch.export.save(program, path)
                files[path.name] = sha256_of(path)
            for k, data in self._exit_onnx.items():
                path = tmp / exit_file(k).replace(".pt2", ".onnx")
                path.write_bytes(data)
                files[path.name] = sha256_of(path)
            for (k, base), pair in self._bottleneck_programs.items():
                for part, program in zip(("encoder", "decoder"), pair):
                    path = tmp / bottleneck_file(k, base, part)
                    torch.export.save(program, path)
                    files[path.name] = sha256_of(path)
            for (k, base), models in self._bottleneck_onnx.items():
                for part, data in zip(("encoder", "decoder"), models):
                    path = tmp / bottleneck_file(k, base, part, ".onnx")
                    path.write_bytes(data)
                    files[path.name] = sha256_of(path)
            if self._onnx_graph is not None:
                path = tmp / ONNX_FILE
                path.write_bytes(self._onnx_graph.to_bytes())
                files[path.name] = sha256_of(path)
            for cut, by_spec in self.dictionaries.items():
                for spec, dictionary in by_spec.items():
                    path = tmp / dict_file(cut, spec)
                    path.write_bytes(dictionary.data)
                    files[path.name] = sha256_of(path)
            for cut, projection in self.projections.items():
                path = tmp / projection_file(cut)
                path.write_bytes(projection.data)
                files[path.name] = sha256_of(path)
            (tmp / MANIFEST).write_text(json.dumps(self.to_json(files), indent=1) + "\n")
            if out.exists():  # the old bundle stays whole until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                old.rmdir()
                out.rename(old)
                tmp.rename(out)
                _remove_bundle_dir(old)
            else:
                tmp.rename(out)
        except BaseException:
            _remove_bundle_dir(tmp)
            raise
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        upto_cut: int | None = None,
        from_cut: int | None = None,
        device: str | torch.device | None = None,
        shared: MutableMapping[str, Segment] | None = None,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> Bundle:
        """Load a bundle directory, verifying every file's sha256.

        ``upto_cut=m`` loads segments ``0..m-1`` only (an edge that computes heads up to cut m);
        ``from_cut=m`` loads segments ``m..n-1`` only (a cloud serving tails from cut m).
        ``device`` puts the segments' weights, buffers and the devices their graphs name there
        (``torch.export.passes.move_to_device_pass``); None leaves them where they were saved.

        ``shared`` maps :func:`segment_key` (the digest of a segment's graph, weights and
        constants) to segments loaded before, by any bundle: a segment whose key is there is not
        kept twice but taken from it (models fine-tuned from one backbone share its segments and
        their memory); the segments loaded here are added. Pass the same mapping for every
        bundle of one device (a ``weakref.WeakValueDictionary`` frees a segment with its last user).
        ``runtime`` is ``torch`` (the .pt2 programs), ``onnxruntime`` (the ONNX graph, no torch
        needed: inputs and outputs are numpy arrays, or torch tensors when torch tensors go in)
        or ``auto`` (ONNX Runtime when the bundle has an ONNX graph and onnxruntime imports);
        ``threads`` is ONNX Runtime's intra-op threads per session (None: its default); on ONNX
        Runtime a CUDA ``device`` takes its CUDA execution provider (ConfigError where this
        onnxruntime has none; ``auto`` then picks torch).
        """
        root = Path(path)
        doc = read_manifest(root)
        meta = Manifest.from_json(
            doc, dictionaries=load_dictionaries(root, doc), projections=load_projections(root, doc)
        )
        n = meta.n_segments
        lo = 0 if from_cut is None else from_cut
        hi = n if upto_cut is None else upto_cut
        if not 0 <= lo <= n or not 0 <= hi <= n:
            raise ConfigError(f"upto_cut and from_cut must lie in 0..{n}, got {upto_cut}, {from_cut}")
        segments: list[Segment | None] = [None] * n
        if choose_runtime(runtime, doc, device) == "onnxruntime":
            bundle = cls.from_manifest(meta, segments)
            bundle.onnx_runner = load_onnx(root, doc, threads=threads, device=device)
            bundle._onnx_range = (lo, hi)
            for entry in meta.exits:  # heads exported to ONNX run there too
                if entry.get("onnx") and 0 < int(entry["cut"]) <= hi and lo == 0:
                    bundle.exit_heads[int(entry["cut"])] = load_onnx_head(
                        root, str(entry["onnx"]), doc["files"], threads
                    )
            bundle.bottleneck_nets = _load_bottlenecks(
                meta,
                (lo, hi),
                lambda name: _first(load_onnx_head(root, name, doc["files"], threads)),
                "_onnx",
            )
            return bundle
        for i, name in enumerate(doc["segments"]):
            if lo <= i < hi:
                segments[i] = _load_segment(root, name, doc["files"], device, shared)
        bundle = cls.from_manifest(meta, segments)
        for entry in meta.exits:  # an exit's head runs where its cut's head does
            if entry.get("file") and 0 < int(entry["cut"]) <= hi and lo == 0:
                bundle.exit_heads[int(entry["cut"])] = _load_segment(
                    root, str(entry["file"]), doc["files"], device, shared
                )
        bundle.bottleneck_nets = _load_bottlenecks(
            meta,
            (lo, hi),
            lambda name: numpy_net(_load_segment(root, name, doc["files"], device, shared), device),
            "",
        )
        return bundle

    @classmethod
    def from_manifest(cls, manifest: Manifest, segments: list[Segment | None]) -> Bundle:
        """A bundle of ``manifest`` holding ``segments`` (``None`` where none is loaded)."""
        return cls(
            **{name: getattr(manifest, name) for name in Manifest.__dataclass_fields__}, segments=segments
        )


def _load_bottlenecks(
    meta: Manifest, loaded: tuple[int, int], load: Callable[[str], Any], suffix: str
) -> dict[tuple[int, str], tuple[Any, Any]]:
    """The networks of ``meta``'s trained bottlenecks that a process holding segments
    ``loaded = (lo, hi)`` runs: the encoder of a cut its head reaches (``lo == 0``, cut <= hi),
    the decoder of a cut its tail starts from (``hi == n``, cut >= lo); ``load`` makes a numpy
    function of a file listed under ``encoder<suffix>`` / ``decoder<suffix>`` (a runtime's
    file: none, when the bundle has no ONNX of it)."""
    lo, hi = loaded
    nets: dict[tuple[int, str], tuple[Any, Any]] = {}
    for cut, by_base in meta.bottlenecks.items():
        k = int(cut)
        for base, entry in by_base.items():
            encoder = decoder = None
            if lo == 0 and k <= hi and entry.get(f"encoder{suffix}"):
                encoder = load(str(entry[f"encoder{suffix}"]))
            if hi == meta.n_segments and k >= lo and entry.get(f"decoder{suffix}"):
                decoder = load(str(entry[f"decoder{suffix}"]))
            if encoder is not None or decoder is not None:
                nets[(k, base)] = (encoder, decoder)
    return nets


def numpy_net(segment: Segment, device: str | torch.device | None = None) -> Callable[[Any], Any]:
    """A one-input, one-output torch program (a loaded bottleneck encoder or decoder) as a numpy
    function: float32 array in, float32 array out (what ``compression.TrainedBottleneck`` takes);
    its input goes to ``device`` first, where the program's weights are."""

    def run(x: Any) -> Any:
        import torch

        with torch.inference_mode():
            t_in = torch.from_numpy(x)
            out: Any = segment(t_in if device is None else t_in.to(device))
        t = out[0] if isinstance(out, tuple | list) else out
        return t.detach().cpu().float().numpy()

    return run


def _first(run: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any], Any]:
    """A function returning one output of ``run`` (ONNX Runtime returns them all)."""
    return lambda x: run(x)[0]


def _run_onnx(runner: OnnxRunner, start: int, stop: int, frontier: Sequence[Any]) -> tuple[Any, ...]:
    """Segments ``start..stop-1`` on ONNX Runtime: numpy in, numpy out; torch tensors in (the
    cloud's decoded frontiers), torch tensors out (zero-copy both ways)."""
    as_torch = any(type(t).__module__.startswith("torch") for t in frontier)
    arrays = [t.detach().cpu().numpy() if as_torch else t for t in frontier]
    outputs = runner.run(start, stop, arrays)
    if not as_torch:
        return tuple(outputs)
    import torch

    return tuple(torch.from_numpy(o) for o in outputs)


def _load_segment(
    root: Path,
    name: str,
    files: dict[str, str],
    device: str | torch.device | None,
    shared: MutableMapping[str, Segment] | None = None,
) -> Segment:
    if not isinstance(name, str) or "/" in name or name.startswith(".") or name not in files:
        raise BundleError(f"bundle {root} lists an invalid segment file {name!r}")
    path = root / name
    try:
        digest = sha256_of(path)
    except FileNotFoundError:
        raise BundleError(f"bundle {root} is missing {name}: copy the whole bundle directory") from None
    if digest != files[name]:
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was modified or "
            f"corrupted; recompile or copy the bundle again"
        )
    _refuse_pickles(path)
    import torch

    try:
        with _EXPORT_LOAD_LOCK:
            program = torch.export.load(path)
        if device is not None:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, torch.device(device))
        if shared is None:
            return fast_module(program)
        key = segment_key(program)
        segment = shared.get(key)
        if segment is None:  # the first of its kind: this one is kept (the others are dropped)
            segment = shared[key] = fast_module(program)
        return segment
    except Exception as exc:  # torch raises many types here; translate at the boundary
        raise BundleError(f"cannot load {path}: {exc}") from exc


def segment_key(program: torch.export.ExportedProgram) -> str:
    """A digest of a segment's graph, weights, buffers and constants (and the devices they are
    on): two segments with equal keys compute the same function with the same tensors."""
    import hashlib

    import torch

    h = hashlib.sha256(str(program.graph).encode())
    for table in (program.state_dict, program.constants):
        for key, value in sorted(table.items()):
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                t = value.detach()
                h.update(f"{t.dtype}{tuple(t.shape)}{t.device}".encode())
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _refuse_pickles(path: Path) -> None:
    """Refuse a .pt2 archive that would make ``torch.export.load`` unpickle anything.

    torch.export stores tensors raw, but its loader honours ``use_pickle`` flags, custom and
    opaque object constants (``pickle.loads``), and retries example inputs with
    ``weights_only=False`` when the safe load fails. A bundle that is tampered with along with
    its manifest must not run code: we check all three before torch sees the file.
    """
    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(("weights_config.json", "constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for key, meta in config.items():
                        kind = str(meta.get("path_name", ""))
                        if meta.get("use_pickle") or kind.startswith(("custom_obj", "opaque_obj")):
                            raise BundleError(f"{path}: {key} would be unpickled; refusing to load it")
                elif "/sample_inputs/" in name and archive.getinfo(name).file_size:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except BundleError:
        raise
    except Exception as exc:  # zipfile, json and torch's safe unpickler raise many types
        raise BundleError(f"{path} is not a safe torch.export archive: {exc}") from exc


def fast_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a plain callable ``f(*tensors) -> tuple``, without per-call overhead.

    ``ExportedProgram.module()`` flattens its arguments with pytree and checks input guards on
    every call; a segment is called once per request per segment, and the bundle has already
    checked the frontier against the cut's specs, so both are removed here.
    """
    import torch

    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


def fuse_segments(segments: Sequence[torch.fx.GraphModule]) -> Callable[..., Sequence[torch.Tensor]]:
    """One function running ``segments`` in order, as a single fx graph.

    Calling 160 small GraphModules costs tens of microseconds each in Python; inlining their
    graphs into one keeps the chain as fast as the original module. Weights are shared with the
    segments (each segment becomes a submodule ``s<i>`` of the fused module), not copied.
    """
    if len(segments) == 1:
        return segments[0].forward
    import torch

    root = torch.nn.Module()
    graph = torch.fx.Graph()
    values: list[torch.fx.Node] | None = None
    for i, seg in enumerate(segments):
        root.add_module(f"s{i}", seg)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        placeholders = [n for n in seg.graph.nodes if n.op == "placeholder"]
        if values is None:
            values = [graph.placeholder(f"in_{j}") for j in range(len(placeholders))]
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
    assert values is not None
    graph.output(tuple(values))
    return torch.fx.GraphModule(root, graph).forward


def _remove_bundle_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
