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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from splitinfer._version import __version__
from splitinfer.compression import ClipRanges, Codec, get_codec
from splitinfer.compression._dictionary import MAX_SIZE as _MAX_DICT_BYTES
from splitinfer.compression._dictionary import ZstdDictionary
from splitinfer.errors import BundleError, ConfigError, CutNotLoadedError
from splitinfer.tensors import TensorSpec

__all__ = ["Bundle", "Cut"]

MANIFEST = "manifest.json"
FORMAT = "splitinfer-bundle"
FORMAT_VERSION = 1

#: torch.export.load is not thread-safe (its deserializer keeps module-level state and fails
#: with "_CURRENT_DESERIALIZER is already set" when two threads load at once): segments of all
#: bundles in a process are deserialized one at a time (hashing and checks still run in parallel).
_EXPORT_LOAD_LOCK = threading.Lock()

Segment = Callable[..., Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Cut:
    """A place where the model may be split: ``index`` segments run before it."""

    index: int
    name: str
    tensors: tuple[TensorSpec, ...]
    #: Bytes of the frontier as float32 at batch 1 (the uncompressed transfer size).
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "tensors": [t.to_json() for t in self.tensors],
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Cut:
        return cls(
            index=int(obj["index"]),
            name=str(obj["name"]),
            tensors=tuple(TensorSpec.from_json(t) for t in obj["tensors"]),
            nbytes=int(obj["nbytes"]),
        )


def frontier_nbytes(specs: Sequence[TensorSpec]) -> int:
    """Float32 bytes of a frontier at batch 1 (what crosses the wire uncompressed)."""
    return sum(TensorSpec(s.shape, "float32").nbytes(1) for s in specs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A compiled model: its cuts, and the segments this process loaded.

    Build one with :func:`splitinfer.compile`, or :meth:`load` one from disk.
    """

    name: str
    cuts: list[Cut]
    inputs: tuple[TensorSpec, ...]
    in_spec: str
    out_spec: str
    graph_hash: str
    #: Loaded segments by index; ``None`` where this process did not load one.
    segments: list[Segment | None]
    version: str = "1"
    codecs: list[str] = field(default_factory=lambda: ["f32", "f32+zstd1"])
    #: Fidelity table (docs/bundle-format.md): agreement with the uncompressed model and mean
    #: encoded bytes per (cut, codec), measured on calibration inputs.
    fidelity: dict[str, Any] = field(default_factory=dict)
    #: Device profiles by name: segment latencies and codec costs measured on a machine.
    profiles: dict[str, Any] = field(default_factory=dict)
    #: Calibrated clip ranges of quantizing codecs, by cut index (as a string) and codec spec.
    calibration: dict[str, Any] = field(default_factory=dict)
    #: zstd dictionaries by cut index (as a string) and codec spec (docs/bundle-format.md).
    dictionaries: dict[str, dict[str, ZstdDictionary]] = field(default_factory=dict)
    #: The serialized programs, kept after compile so that :meth:`save` can write them.
    _programs: list[Any] | None = field(default=None, repr=False)
    #: Fused runners of segment ranges, built on first use (see :func:`fuse_segments`).
    _runners: dict[tuple[int, int], Callable[..., Sequence[torch.Tensor]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def n_segments(self) -> int:
        return len(self.cuts) - 1

    @property
    def last_cut(self) -> int:
        """Index of the cut that keeps everything on the device."""
        return len(self.cuts) - 1

    def cut(self, k: int) -> Cut:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.last_cut:
            raise ConfigError(f"cut must be an int in 0..{self.last_cut}, got {k!r}")
        return self.cuts[k]

    def codec_for(self, k: int, spec: str) -> Codec:
        """The codec ``spec`` as the edge uses it at cut ``k``: bound to the calibrated ranges."""
        self.cut(k)
        if spec not in self.codecs:
            raise ConfigError(f"bundle {self.name!r} offers codecs {', '.join(self.codecs)}; not {spec!r}")
        ranges = self.calibration.get(str(k), {}).get(spec.split("+", 1)[0])
        return get_codec(
            spec,
            clip=None if ranges is None else ClipRanges.from_json(ranges),
            dictionary=self.dictionaries.get(str(k), {}).get(spec),
        )

    def decoder_for(self, k: int, spec: str) -> Codec:
        """The codec that decodes what :meth:`codec_for` encodes at cut ``k`` (its dictionary)."""
        return get_codec(spec, dictionary=self.dictionaries.get(str(k), {}).get(spec))

    def can_head(self, k: int) -> bool:
        """Whether this process holds segments ``0..k-1``."""
        return all(s is not None for s in self.segments[:k])

    def can_tail(self, k: int) -> bool:
        """Whether this process holds segments ``k..n-1``."""
        return all(s is not None for s in self.segments[k:])

    def flatten_inputs(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """The model inputs as frontier 0, checked against the compiled input specs."""
        leaves, spec = pytree.tree_flatten((tuple(inputs), {}))
        if pytree.treespec_dumps(spec) != self.in_spec:
            raise ConfigError(
                f"bundle {self.name!r} takes {len(self.inputs)} input tensor(s) "
                f"({', '.join(map(str, self.inputs))}), got {len(leaves)} leaves in another structure"
            )
        for i, (leaf, want) in enumerate(zip(leaves, self.inputs)):
            if not isinstance(leaf, torch.Tensor) or not want.matches(TensorSpec.of(leaf)):
                got = TensorSpec.of(leaf) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ConfigError(f"input {i} of bundle {self.name!r} must be {want}, got {got}")
        return tuple(leaves)

    def run_segments(
        self, start: int, stop: int, frontier: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Frontier ``stop`` from frontier ``start``."""
        missing = [i for i in range(start, stop) if self.segments[i] is None]
        if missing:
            raise CutNotLoadedError(
                f"segments {missing[0]}..{missing[-1]} of bundle {self.name!r} are not loaded in "
                f"this process; load the bundle with a wider upto_cut/from_cut"
            )
        if start == stop:
            return tuple(frontier)
        runner = self._runners.get((start, stop))
        if runner is None:
            runner = fuse_segments(self.segments[start:stop])  # type: ignore[arg-type]
            self._runners[(start, stop)] = runner
        with torch.inference_mode():
            return tuple(runner(*frontier))

    def head(self, k: int, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """The tensors crossing cut ``k`` for these model inputs."""
        self.cut(k)
        return self.run_segments(0, k, self.flatten_inputs(inputs))

    def tail(self, k: int, frontier: Sequence[torch.Tensor]) -> Any:
        """The model outputs (same structure as ``model(*inputs)``) from cut ``k``'s frontier."""
        self.cut(k)
        self.check_frontier(k, frontier)
        leaves = self.run_segments(k, self.n_segments, frontier)
        return pytree.tree_unflatten(list(leaves), pytree.treespec_loads(self.out_spec))

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

    def manifest(self, files: dict[str, str]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"splitinfer {__version__}",
            "name": self.name,
            "version": self.version,
            "graph_hash": self.graph_hash,
            "inputs": [s.to_json() for s in self.inputs],
            "in_spec": self.in_spec,
            "out_spec": self.out_spec,
            "cuts": [c.to_json() for c in self.cuts],
            "segments": [f"segment_{i:03d}.pt2" for i in range(self.n_segments)],
            "codecs": self.codecs,
            "fidelity": self.fidelity,
            "profiles": self.profiles,
            "calibration": self.calibration,
            "dictionaries": {
                cut: {spec: {"file": _dict_file(cut, spec), "id": d.id} for spec, d in by_spec.items()}
                for cut, by_spec in self.dictionaries.items()
            },
            "files": files,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle directory (atomically: a temporary sibling renamed into place)."""
        if self._programs is None:
            raise BundleError(
                "only a bundle made by splitinfer.compile can be saved; copy the directory instead"
            )
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            files = {}
            for i, program in enumerate(self._programs):
                seg = tmp / f"segment_{i:03d}.pt2"
                torch.export.save(program, seg)
                files[seg.name] = _sha256(seg)
            for cut, by_spec in self.dictionaries.items():
                for spec, dictionary in by_spec.items():
                    path = tmp / _dict_file(cut, spec)
                    path.write_bytes(dictionary.data)
                    files[path.name] = _sha256(path)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(files), indent=1) + "\n")
            if out.exists():
                _remove_bundle_dir(out)
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
    ) -> Bundle:
        """Load a bundle directory, verifying every file's sha256.

        ``upto_cut=m`` loads segments ``0..m-1`` only (an edge that computes heads up to cut m);
        ``from_cut=m`` loads segments ``m..n-1`` only (a cloud serving tails from cut m).
        """
        root = Path(path)
        manifest = read_manifest(root)
        cuts = [Cut.from_json(c) for c in manifest["cuts"]]
        n = len(cuts) - 1
        lo = 0 if from_cut is None else from_cut
        hi = n if upto_cut is None else upto_cut
        if not 0 <= lo <= n or not 0 <= hi <= n:
            raise ConfigError(f"upto_cut and from_cut must lie in 0..{n}, got {upto_cut}, {from_cut}")
        segments: list[Segment | None] = [None] * n
        for i, name in enumerate(manifest["segments"]):
            if lo <= i < hi:
                segments[i] = _load_segment(root, name, manifest["files"])
        return cls(
            name=manifest["name"],
            cuts=cuts,
            inputs=tuple(TensorSpec.from_json(s) for s in manifest["inputs"]),
            in_spec=manifest["in_spec"],
            out_spec=manifest["out_spec"],
            graph_hash=manifest["graph_hash"],
            segments=segments,
            version=str(manifest.get("version", "1")),
            codecs=list(manifest.get("codecs", [])),
            fidelity=dict(manifest.get("fidelity", {})),
            profiles=dict(manifest.get("profiles", {})),
            calibration=dict(manifest.get("calibration", {})),
            dictionaries=_load_dictionaries(root, manifest),
        )


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the bundle at ``root``, checked for its format and fields."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a splitinfer bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {manifest.get('format_version')!r}; this splitinfer "
            f"reads version {FORMAT_VERSION}: recompile the model with this version"
        )
    required = ("name", "graph_hash", "inputs", "in_spec", "out_spec", "cuts", "segments", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks the field(s) {', '.join(missing)}")
    if len(manifest["segments"]) != len(manifest["cuts"]) - 1:
        raise BundleError(f"{path}: {len(manifest['cuts'])} cuts need {len(manifest['cuts']) - 1} segments")
    return manifest


#: Manifest fields that describe a bundle without changing its graph (updatable in place).
METADATA_FIELDS = ("codecs", "fidelity", "profiles", "calibration")


def update_manifest(root: str | os.PathLike[str], **fields: Any) -> None:
    """Replace metadata fields (codecs, fidelity, profiles, calibration) of a saved bundle.

    The graph and its hash stay as they are; the manifest is rewritten atomically.
    """
    unknown = set(fields) - set(METADATA_FIELDS)
    if unknown:
        raise ConfigError(f"only {', '.join(METADATA_FIELDS)} can be updated in place, not {sorted(unknown)}")
    path = Path(root)
    manifest = read_manifest(path)
    manifest.update(fields)
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path / MANIFEST)


def _dict_file(cut: str, spec: str) -> str:
    return f"dict_{int(cut):03d}_{spec.replace('+', '-')}.zstd"


def _load_dictionaries(root: Path, manifest: dict[str, Any]) -> dict[str, dict[str, ZstdDictionary]]:
    """The zstd dictionaries the manifest lists, each checked against its sha256 in ``files``."""
    out: dict[str, dict[str, ZstdDictionary]] = {}
    listed = manifest.get("dictionaries") or {}
    if not isinstance(listed, dict):
        raise BundleError(f"bundle {root}: 'dictionaries' must be a map of cut to codec to file")
    for cut, by_spec in listed.items():
        for spec, entry in (by_spec or {}).items():
            name = entry.get("file") if isinstance(entry, dict) else None
            try:
                expected = _dict_file(str(cut), get_codec(str(spec)).spec)
            except (ValueError, TypeError):  # CodecError, or a cut that is not a number
                expected = None
            if expected is None or name != expected:
                raise BundleError(f"bundle {root} lists an invalid dictionary file {name!r}")
            path = root / name
            try:
                size = path.stat().st_size
                data = path.read_bytes() if 0 < size <= _MAX_DICT_BYTES else b""
            except OSError:
                raise BundleError(f"bundle {root} is missing {name}: copy the bundle directory") from None
            if not data or hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
                raise BundleError(
                    f"{path} does not match the sha256 in its manifest: the file was modified or "
                    f"corrupted; recompile or copy the bundle again"
                )
            out.setdefault(str(cut), {})[str(spec)] = ZstdDictionary(data)
    return out


def _load_segment(root: Path, name: str, files: dict[str, str]) -> Segment:
    if not isinstance(name, str) or "/" in name or name.startswith(".") or name not in files:
        raise BundleError(f"bundle {root} lists an invalid segment file {name!r}")
    path = root / name
    try:
        digest = _sha256(path)
    except FileNotFoundError:
        raise BundleError(f"bundle {root} is missing {name}: copy the whole bundle directory") from None
    if digest != files[name]:
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was modified or "
            f"corrupted; recompile or copy the bundle again"
        )
    _refuse_pickles(path)
    try:
        with _EXPORT_LOAD_LOCK:
            return fast_module(torch.export.load(path))
    except Exception as exc:  # torch raises many types here; translate at the boundary
        raise BundleError(f"cannot load {path}: {exc}") from exc


def _refuse_pickles(path: Path) -> None:
    """Refuse a .pt2 archive that would make ``torch.export.load`` unpickle anything.

    torch.export stores tensors raw, but its loader honours ``use_pickle`` flags, custom and
    opaque object constants (``pickle.loads``), and retries example inputs with
    ``weights_only=False`` when the safe load fails. A bundle that is tampered with along with
    its manifest must not run code: we check all three before torch sees the file.
    """
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
                env[node] = graph.node_copy(node, lambda n, env=env: env[n])
    assert values is not None
    graph.output(tuple(values))
    return torch.fx.GraphModule(root, graph).forward


def _remove_bundle_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
