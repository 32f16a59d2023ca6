"""The manifest: everything a bundle says about itself, readable without torch.

``manifest.json`` holds the model's name, version and graph hash, its input specs and output
structure, the cuts with their frontier specs, the segment files, the codecs offered, the
fidelity table, calibration ranges, device profiles, zstd dictionaries and the sha256 of every
file (docs/bundle-format.md). :class:`Manifest` is that file as an object: the partitioner's
decision side, the load-test users and ``splitinfer inspect`` work from it alone, and
:class:`splitinfer.Bundle` is a Manifest plus the segments a process loaded.

This module imports no torch (the ground floor, docs/DESIGN.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitinfer._version import __version__
from splitinfer.compression import (
    MAX_DICTIONARY_BYTES,
    MAX_PROJECTION_CHANNELS,
    ChannelProjection,
    ClipRanges,
    Codec,
    TrainedBottleneck,
    ZstdDictionary,
    get_codec,
    parse_spec,
)
from splitinfer.errors import BundleError, CodecError, ConfigError
from splitinfer.tensors import TensorSpec

__all__ = ["Cut", "Manifest", "read_manifest", "update_manifest"]

MANIFEST = "manifest.json"
FORMAT = "splitinfer-bundle"
FORMAT_VERSION = 1

#: Fields every manifest has.
REQUIRED_FIELDS = ("name", "graph_hash", "inputs", "in_spec", "out_spec", "cuts", "segments", "files")
#: Manifest fields that describe a bundle without changing its graph (updatable in place).
METADATA_FIELDS = ("codecs", "fidelity", "profiles", "calibration")


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
    def from_json(cls, obj: Mapping[str, Any]) -> Cut:
        return cls(
            index=int(obj["index"]),
            name=str(obj["name"]),
            tensors=tuple(TensorSpec.from_json(t) for t in obj["tensors"]),
            nbytes=int(obj["nbytes"]),
        )


def frontier_nbytes(specs: Sequence[TensorSpec]) -> int:
    """Float32 bytes of a frontier at batch 1 (what crosses the wire uncompressed)."""
    return sum(TensorSpec(s.shape, "float32").nbytes(1) for s in specs)


def sha256_of(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def segment_file(i: int) -> str:
    """The file name of segment ``i`` in a bundle directory."""
    return f"segment_{i:03d}.pt2"


def exit_file(cut: int) -> str:
    """The file name of the early-exit head at ``cut`` in a bundle directory (issue 32)."""
    return f"exit_{int(cut):03d}.pt2"


def projection_file(cut: str) -> str:
    """The file name of the channel projection of ``cut`` (the pca codecs) in a bundle directory."""
    return f"proj_{int(cut):03d}.bin"


def bottleneck_file(cut: int, base: str, part: str, suffix: str = ".pt2") -> str:
    """The file name of the trained bottleneck ``base`` (``bn8q2``) at ``cut``: its ``part``
    (``encoder`` or ``decoder``) as a torch.export program (``.pt2``) or ONNX model (``.onnx``)."""
    return f"bn_{int(cut):03d}_{base}_{part}{suffix}"


def dict_file(cut: str, spec: str) -> str:
    """The file name of the zstd dictionary of ``spec`` at ``cut`` in a bundle directory."""
    return f"dict_{int(cut):03d}_{spec.replace('+', '-')}.zstd"


@dataclass
class Manifest:
    """A bundle's metadata: its cuts, codecs, fidelity table, profiles and calibration.

    :meth:`load` reads one from a bundle directory (checked, dictionaries verified against
    their sha256) without torch; :class:`splitinfer.Bundle` adds the segments.
    """

    name: str
    cuts: list[Cut]
    inputs: tuple[TensorSpec, ...]
    #: The pytree structures of the inputs and outputs (torch's ``treespec_dumps``), opaque here.
    in_spec: str
    out_spec: str
    graph_hash: str
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
    #: Calibrated channel projections of the pca codecs by cut index (as a string).
    projections: dict[str, ChannelProjection] = field(default_factory=dict)
    #: The ONNX graph, when compiled with one (docs/runtimes.md): ``file``, ``opset`` and the
    #: chain's ``max_abs_error`` against torch per cut; or ``refused``, why ONNX could not
    #: export the model. Empty for older bundles and ``runtimes=("torch",)``.
    onnx: dict[str, Any] = field(default_factory=dict)
    #: Early exits (docs/learning.md): per exit its cut, head file, confidence threshold, exit
    #: rate and the agreement of its answers with their n and interval; empty without training.
    exits: list[dict[str, Any]] = field(default_factory=list)
    #: Trained bottlenecks of the ``bn<latent>q<bits>`` codecs (docs/learning.md) by cut index (as
    #: a string) and codec base (``bn8q2``): their id, files, shapes and training record.
    bottlenecks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes every head and tail of this bundle can run on."""
        return ("torch", "onnxruntime") if self.onnx.get("file") else ("torch",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()})"

    def _summary(self) -> str:
        """One line: name, version, graph, cuts, codecs, profiles (a repr, not the manifest)."""
        profiles = ", ".join(self.profiles) or "none"
        return (
            f"{self.name!r} v{self.version}, graph {self.graph_hash[:12]}, {len(self.cuts)} cuts, "
            f"codecs {' '.join(self.codecs)}, profiles {profiles}"
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

    def tensor_names(self, k: int) -> list[str]:
        """Names of the tensors crossing cut ``k`` (the /v2 inputs of the tail from ``k``):
        ``input_<i>`` at cut 0 (the model's inputs), ``cut<k>_<i>`` at the others."""
        n = len(self.cut(k).tensors)
        return [f"input_{i}" if k == 0 else f"cut{k}_{i}" for i in range(n)]

    def output_names(self) -> list[str]:
        """Names of the model's outputs, ``output_<i>`` (the last cut's tensors, flattened)."""
        return [f"output_{i}" for i in range(len(self.cuts[self.last_cut].tensors))]

    def codec_for(self, k: int, spec: str) -> Codec:
        """The codec ``spec`` as the edge uses it at cut ``k``: bound to the calibrated ranges."""
        self.cut(k)
        if spec not in self.codecs:
            raise ConfigError(f"bundle {self.name!r} offers codecs {', '.join(self.codecs)}; not {spec!r}")
        if parse_spec(spec).kind in ("pca", "bn"):
            return self.decoder_for(k, spec)
        ranges = self.calibration.get(str(k), {}).get(spec.split("+", 1)[0])
        return get_codec(
            spec,
            clip=None if ranges is None else ClipRanges.from_json(ranges),
            dictionary=self.dictionaries.get(str(k), {}).get(spec),
        )

    def decoder_for(self, k: int, spec: str) -> Codec:
        """The codec that decodes what :meth:`codec_for` encodes at cut ``k`` (its dictionary and
        calibrated ranges, which its blobs name instead of carrying, or for a pca codec its
        projection, for a bn codec its trained bottleneck); it decodes blobs that carry their own
        ranges too."""
        kind = parse_spec(spec).kind
        if kind == "pca":
            return get_codec(spec, projection=self.projections.get(str(k)))
        if kind == "bn":
            return get_codec(spec, bottleneck=self.bottleneck_at(k, spec))
        ranges = self.calibration.get(str(k), {}).get(spec.split("+", 1)[0])
        return get_codec(
            spec,
            clip=None if ranges is None else ClipRanges.from_json(ranges),
            dictionary=self.dictionaries.get(str(k), {}).get(spec),
        )

    def bottleneck_at(self, k: int, spec: str) -> TrainedBottleneck | None:
        """The trained bottleneck a ``bn<latent>q<bits>`` codec ``spec`` is bound to at cut ``k``,
        with the networks this process loaded (a bare manifest loads none: :class:`splitinfer.Bundle`
        does), or None where the bundle has none there."""
        base = parse_spec(spec).base
        entry = self.bottlenecks.get(str(k), {}).get(base)
        if entry is None:
            return None
        encoder, decoder = self._bottleneck_nets(k, base)
        return _bottleneck_of(entry, encoder, decoder)

    def _bottleneck_nets(self, k: int, base: str) -> tuple[Any, Any]:
        """The encoder and decoder of the bottleneck ``base`` at cut ``k`` this process loaded."""
        return None, None

    # -- storage -------------------------------------------------------------------------

    def to_json(self, files: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The manifest.json document; ``files`` maps every file name to its sha256."""
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
            "segments": [segment_file(i) for i in range(self.n_segments)],
            "codecs": self.codecs,
            "fidelity": self.fidelity,
            "profiles": self.profiles,
            "calibration": self.calibration,
            "dictionaries": {
                cut: {spec: {"file": dict_file(cut, spec), "id": d.id} for spec, d in by_spec.items()}
                for cut, by_spec in self.dictionaries.items()
            },
            **(
                {
                    "projections": {
                        cut: {
                            "file": projection_file(cut),
                            "id": p.id,
                            "channels": p.channels,
                            "components": p.count,
                        }
                        for cut, p in self.projections.items()
                    }
                }
                if self.projections
                else {}
            ),
            **({"onnx": self.onnx} if self.onnx else {}),
            **({"exits": self.exits} if self.exits else {}),
            **({"bottlenecks": self.bottlenecks} if self.bottlenecks else {}),
            "files": dict(files or {}),
        }

    @classmethod
    def from_json(
        cls,
        obj: Mapping[str, Any],
        *,
        dictionaries: dict[str, dict[str, ZstdDictionary]] | None = None,
        projections: dict[str, ChannelProjection] | None = None,
    ) -> Manifest:
        """A manifest from its JSON document (the dictionaries' and projections' bytes come
        separately)."""
        try:
            return cls(
                name=str(obj["name"]),
                cuts=[Cut.from_json(c) for c in obj["cuts"]],
                inputs=tuple(TensorSpec.from_json(s) for s in obj["inputs"]),
                in_spec=str(obj["in_spec"]),
                out_spec=str(obj["out_spec"]),
                graph_hash=str(obj["graph_hash"]),
                version=str(obj.get("version", "1")),
                codecs=[str(c) for c in obj.get("codecs", [])],
                fidelity=dict(obj.get("fidelity") or {}),
                profiles=dict(obj.get("profiles") or {}),
                calibration=dict(obj.get("calibration") or {}),
                dictionaries=dictionaries or {},
                projections=projections or {},
                onnx=dict(obj.get("onnx") or {}),
                exits=[dict(e) for e in obj.get("exits") or []],
                bottlenecks=_checked_bottlenecks(obj.get("bottlenecks") or {}),
            )
        except (KeyError, TypeError, ValueError, CodecError) as exc:
            raise BundleError(f"bundle {obj.get('name', '?')!r}: manifest field is invalid ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and check the manifest of the bundle directory ``path`` (no torch needed).

        Its dictionaries are read and verified against their sha256; segment files are checked
        when a :class:`splitinfer.Bundle` loads them.
        """
        root = Path(path)
        doc = read_manifest(root)
        return cls.from_json(
            doc, dictionaries=load_dictionaries(root, doc), projections=load_projections(root, doc)
        )


def _bottleneck_of(entry: Mapping[str, Any], encoder: Any = None, decoder: Any = None) -> TrainedBottleneck:
    return TrainedBottleneck(
        entry["id"], tuple(entry["frontier"]), tuple(entry["code"]), entry["bits"], encoder, decoder
    )


def _checked_bottlenecks(obj: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The manifest's ``bottlenecks``, each entry checked (ids, shapes, bits, file names)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for cut, by_base in dict(obj).items():
        for base, entry in dict(by_base).items():
            spec = parse_spec(base)
            b = _bottleneck_of(entry)
            if spec.kind != "bn" or spec.base != base or (b.latent, b.bits) != (spec.latent, spec.bits):
                raise ValueError(f"bottleneck {base!r} at cut {cut} is not a bn<latent>q<bits> of its shapes")
            for part in ("encoder", "decoder"):
                for key, suffix in ((part, ".pt2"), (f"{part}_onnx", ".onnx")):
                    if entry.get(key) not in (None, bottleneck_file(int(cut), base, part, suffix)):
                        raise ValueError(
                            f"bottleneck {base!r} at cut {cut} names an invalid file {entry[key]!r}"
                        )
            out.setdefault(str(int(cut)), {})[base] = dict(entry)
    return out


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest document of the bundle at ``root``, checked for its format and fields."""
    path = Path(root) / MANIFEST
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
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks the field(s) {', '.join(missing)}")
    if not isinstance(manifest["cuts"], list) or not isinstance(manifest["segments"], list):
        raise BundleError(f"{path}: 'cuts' and 'segments' must be lists")
    if len(manifest["segments"]) != len(manifest["cuts"]) - 1:
        raise BundleError(f"{path}: {len(manifest['cuts'])} cuts need {len(manifest['cuts']) - 1} segments")
    if not isinstance(manifest["files"], dict):
        raise BundleError(f"{path}: 'files' must map file names to their sha256")
    return manifest


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


def _read_listed(root: Path, name: str, manifest: Mapping[str, Any], limit: int) -> bytes:
    """The bytes of the listed bundle file ``name`` (at most ``limit``), checked against its
    sha256 in ``files``; an empty, oversized or altered file is refused alike."""
    path = root / name
    try:
        size = path.stat().st_size
        data = path.read_bytes() if 0 < size <= limit else b""
    except OSError:
        raise BundleError(f"bundle {root} is missing {name}: copy the bundle directory") from None
    if not data or hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was modified or "
            f"corrupted; recompile or copy the bundle again"
        )
    return data


def load_dictionaries(root: Path, manifest: Mapping[str, Any]) -> dict[str, dict[str, ZstdDictionary]]:
    """The zstd dictionaries the manifest lists, each checked against its sha256 in ``files``."""
    out: dict[str, dict[str, ZstdDictionary]] = {}
    listed = manifest.get("dictionaries") or {}
    if not isinstance(listed, dict):
        raise BundleError(f"bundle {root}: 'dictionaries' must be a map of cut to codec to file")
    for cut, by_spec in listed.items():
        for spec, entry in (by_spec or {}).items():
            name = entry.get("file") if isinstance(entry, dict) else None
            try:
                expected = dict_file(str(cut), get_codec(str(spec)).spec)
            except (ValueError, TypeError):  # CodecError, or a cut that is not a number
                expected = None
            if expected is None or name != expected:
                raise BundleError(f"bundle {root} lists an invalid dictionary file {name!r}")
            data = _read_listed(root, name, manifest, MAX_DICTIONARY_BYTES)
            out.setdefault(str(cut), {})[str(spec)] = ZstdDictionary(data)
    return out


def load_projections(root: Path, manifest: Mapping[str, Any]) -> dict[str, ChannelProjection]:
    """The channel projections the manifest lists (none in bundles made before the projection
    codecs), each checked against its sha256 in ``files`` and parsed without pickle
    (``compression/_projection.py``)."""
    out: dict[str, ChannelProjection] = {}
    listed = manifest.get("projections") or {}
    if not isinstance(listed, dict):
        raise BundleError(f"bundle {root}: 'projections' must be a map of cut to file")
    limit = 16 + 4 * (MAX_PROJECTION_CHANNELS + 4) * MAX_PROJECTION_CHANNELS
    for cut, entry in listed.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        try:
            expected = projection_file(str(cut))
        except ValueError:  # a cut that is not a number
            expected = None
        if expected is None or name != expected:
            raise BundleError(f"bundle {root} lists an invalid projection file {name!r}")
        data = _read_listed(root, name, manifest, limit)
        try:
            out[str(cut)] = ChannelProjection.from_bytes(data)
        except ValueError as exc:  # CodecError
            raise BundleError(f"{root / name} is not a valid channel projection: {exc}") from None
    return out
