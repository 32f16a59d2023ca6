"""Execution runtimes of a bundle's segments: torch (the .pt2 programs) or ONNX Runtime.

A bundle compiled with ONNX (``si.compile(..., runtimes=("torch", "onnxruntime"))``, the
default when ``onnx`` and ``onnxscript`` import) stores its ONNX graph in pieces, one per
segment (:class:`OnnxGraph`, file :data:`ONNX_FILE` with its sha256 in ``files``;
docs/bundle-format.md, docs/runtimes.md). :class:`OnnxRunner` runs any range of segments as
one fused graph in an ONNX Runtime session, on numpy arrays. This module imports neither
torch nor onnxruntime at import time: a device with only ``splitinfer[edge]`` installed runs
its head, its fallback and its codecs without torch.

Hostile bundles: the ONNX file is read once, its bytes hashed and compared with the manifest,
and the sessions built from those same bytes (never from a path, so a graph cannot name external
data files to read, and nothing is read twice). No custom-op library is ever registered.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitinfer.errors import BundleError, ConfigError

__all__ = [
    "ONNX_FILE",
    "RUNTIMES",
    "OnnxGraph",
    "OnnxRunner",
    "choose_runtime",
    "has_onnx",
    "load_onnx",
    "onnx_available",
    "onnx_device",
    "providers_for",
    "require_torch",
    "session_options",
]

#: The runtimes a bundle's segments can run on, and what ``auto`` picks between.
RUNTIMES = ("auto", "onnxruntime", "torch")
#: ONNX graphs larger than this are refused before they are read (a hostile size).
MAX_ONNX_BYTES = 2 << 30


#: The bundle file holding the ONNX graph in pieces (:class:`OnnxGraph`).
ONNX_FILE = "graph.onnx.msgpack"


def onnx_available() -> bool:
    """Whether onnxruntime imports in this process."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_torch(purpose: str) -> Any:
    """The torch module, imported now; ConfigError naming the extra to install where torch is
    not installed (a torch-free ``splitinfer[serve]`` or ``splitinfer[edge]`` environment)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{purpose} needs torch, which is not installed here: pip install 'splitinfer[torch]'"
        ) from None
    return torch


def has_onnx(doc: Mapping[str, Any]) -> bool:
    """Whether the manifest document lists an ONNX graph (older bundles, and those compiled
    with ``runtimes=("torch",)`` or a model ONNX cannot export, have none)."""
    entry = doc.get("onnx")
    return isinstance(entry, dict) and entry.get("file") == ONNX_FILE


def choose_runtime(runtime: str, doc: Mapping[str, Any], device: object = None) -> str:
    """``onnxruntime`` or ``torch`` for the bundle ``doc`` describes, its segments on ``device``.

    ``auto`` takes ONNX Runtime when the bundle has an ONNX graph, onnxruntime imports and, for
    a CUDA ``device``, has its CUDA execution provider (else torch, which runs there);
    ``onnxruntime`` requires all of them (ConfigError naming what is missing and the fix).
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return "torch"
    if runtime == "auto":
        if not has_onnx(doc) or not onnx_available():
            return "torch"
        if _is_cuda(device) and _CUDA_EP not in _available_providers():
            return "torch"
        return "onnxruntime"
    if not has_onnx(doc):
        raise ConfigError(
            f"bundle {doc.get('name', '?')!r} has no ONNX graph: recompile it with onnx and "
            f"onnxscript installed (pip install 'splitinfer[onnx]'), or use runtime='torch'"
        )
    if not onnx_available():
        raise ConfigError("runtime 'onnxruntime' needs onnxruntime: pip install 'splitinfer[edge]'")
    providers_for(device)  # a CUDA device this onnxruntime cannot run on is refused here
    return "onnxruntime"


#: ONNX Runtime's execution provider for NVIDIA GPUs (the onnxruntime-gpu package has it).
_CUDA_EP = "CUDAExecutionProvider"


def _is_cuda(device: object) -> bool:
    return device is not None and str(device).split(":", 1)[0] == "cuda"


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(device: object = None) -> list[Any]:
    """ONNX Runtime's execution providers for ``device`` (None, ``cpu``, ``cuda`` or ``cuda:N``,
    as a string or a torch.device): the CPU provider, or the CUDA provider on GPU N with the CPU
    provider for what it lacks. ConfigError for a CUDA device when this onnxruntime has no CUDA
    provider (the plain ``onnxruntime`` package has none: ``onnxruntime-gpu`` does), never a
    silent run on the CPU."""
    text = "cpu" if device is None or str(device) == "" else str(device)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device must be cpu, cuda or cuda:N for ONNX Runtime, got {text!r}")
    available = _available_providers()
    if _CUDA_EP not in available:
        import onnxruntime as ort

        raise ConfigError(
            f"device {text} with runtime 'onnxruntime' needs ONNX Runtime's {_CUDA_EP}, and "
            f"onnxruntime {ort.__version__} here has only {', '.join(available)}: install "
            "onnxruntime-gpu instead of onnxruntime, or run on the CPU (device cpu), or on torch "
            "(runtime torch)"
        )
    return [(_CUDA_EP, {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def onnx_device(device: str) -> str:
    """Where ONNX Runtime runs for a device setting (``""``: cuda when this onnxruntime has the
    CUDA provider, else cpu; ``cpu``; ``cuda[:N]``, refused without that provider)."""
    if device == "":
        return "cuda" if onnx_available() and _CUDA_EP in _available_providers() else "cpu"
    providers_for(device)
    return device


def load_onnx(
    root: Path, doc: Mapping[str, Any], *, threads: int | None = None, device: object = None
) -> OnnxRunner:
    """The runner of the ONNX graph of the bundle at ``root`` on ``device`` (None: the CPU),
    its file verified first."""
    providers = providers_for(device)
    data = read_verified(root, ONNX_FILE, doc["files"])
    graph = OnnxGraph.from_bytes(data, len(doc["segments"]), str(root / ONNX_FILE))
    return OnnxRunner(graph, threads=threads, name=str(doc.get("name", "?")), providers=providers)


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads (None: ORT's default, the
    cores), one inter-op thread (segments are chains), and the full graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        if threads == 1:  # no thread pool to spin: a request's chain runs in the caller's thread
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def read_verified(root: Path, name: str, files: Mapping[str, str]) -> bytes:
    """The bytes of the bundle file ``name``, checked against its sha256 in ``files``."""
    if not isinstance(name, str) or "/" in name or name.startswith(".") or name not in files:
        raise BundleError(f"bundle {root} lists an invalid ONNX file {name!r}")
    path = root / name
    try:
        size = path.stat().st_size
        if size > MAX_ONNX_BYTES:
            raise BundleError(f"{path} is {size} bytes, more than an ONNX graph may be here")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {root} is missing {name}: copy the whole bundle directory") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != files[name]:
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was modified or "
            f"corrupted; recompile or copy the bundle again"
        )
    return data


def load_onnx_head(root: Path, name: str, files: Mapping[str, str], threads: int | None = None) -> Any:
    """An ONNX model of one input and output in the bundle (an early-exit head: docs/learning.md)
    as a function ``f(array) -> (array,)`` on ONNX Runtime, its file verified first."""
    import onnxruntime as ort

    data = read_verified(root, name, files)
    try:
        session = ort.InferenceSession(data, session_options(threads), providers=providers_for(None))
    except Exception as exc:  # onnxruntime raises its own types
        raise BundleError(f"cannot load {root / name}: {exc}") from None
    first = session.get_inputs()[0].name

    def run(x: Any) -> tuple[Any, ...]:
        return tuple(session.run(None, {first: x}))

    return run


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


#: ModelProto.graph and GraphProto.name (onnx.proto).
_MODEL_GRAPH, _GRAPH_NAME = 7, 2


@dataclass(frozen=True)
class OnnxGraph:
    """A bundle's ONNX graph in pieces (partitioner/_onnx.py): the model's header (a ModelProto
    without its graph), each segment's nodes and initializers, and each cut's inputs and outputs
    (GraphProto fragments). Protobuf fragments of one message concatenate, so the graph of any
    range of segments is a join of bytes (:meth:`fuse`)."""

    header: bytes
    bodies: list[bytes]
    inputs: list[bytes]
    outputs: list[bytes]

    def fuse(self, start: int, stop: int) -> bytes:
        """The ModelProto computing frontier ``stop`` from frontier ``start``."""
        graph = b"".join(
            [_field(_GRAPH_NAME, f"s{start}_{stop}".encode()), self.inputs[start], *self.bodies[start:stop]]
        )
        return self.header + _field(_MODEL_GRAPH, graph + self.outputs[stop])

    def to_bytes(self) -> bytes:
        import msgpack

        return msgpack.packb(
            {
                "format": "splitinfer-onnx",
                "version": 1,
                "header": self.header,
                "bodies": self.bodies,
                "inputs": self.inputs,
                "outputs": self.outputs,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, n_segments: int, where: str) -> OnnxGraph:
        """The pieces stored in a bundle's ONNX file (BundleError unless well formed)."""
        import msgpack

        try:
            doc = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_bin_len=len(data), max_array_len=1 << 20
            )
        except Exception:  # msgpack raises several types on hostile bytes
            raise BundleError(f"{where} is not a splitinfer ONNX file") from None
        ok = isinstance(doc, dict) and doc.get("format") == "splitinfer-onnx" and doc.get("version") == 1
        pieces = [doc.get(k) for k in ("bodies", "inputs", "outputs")] if ok else []
        sizes = (n_segments, n_segments + 1, n_segments + 1)
        if (
            not ok
            or not isinstance(doc.get("header"), bytes)
            or any(
                not isinstance(p, list) or len(p) != n or not all(isinstance(b, bytes) for b in p)
                for p, n in zip(pieces, sizes)
            )
        ):
            raise BundleError(f"{where} is not a splitinfer ONNX file for {n_segments} segments")
        return cls(doc["header"], *pieces)


class OnnxRunner:
    """ONNX Runtime sessions over ranges of a bundle's segments, built on first use.

    ``run(start, stop, frontier)`` runs the fused graph of segments ``start..stop-1`` in one
    session: chaining one session per segment cost 2.5x the fused graph for EfficientNet-Lite0
    (per-run overhead times hundreds of segments; docs/runtimes.md). A process uses a few ranges
    (the edge: its heads and the whole model; the cloud: the tails of the cuts it is sent), each
    a session of its own holding the weights it needs.
    """

    def __init__(
        self,
        graph: OnnxGraph,
        *,
        threads: int | None = None,
        name: str = "?",
        providers: Sequence[Any] = ("CPUExecutionProvider",),
    ):
        self.graph = graph
        self.threads = threads
        self.name = name
        #: ONNX Runtime's execution providers, in order of preference (:func:`providers_for`).
        self.providers = list(providers)
        self._sessions: dict[tuple[int, int], tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()

    def session(self, start: int, stop: int) -> tuple[Any, list[str]]:
        """The session of range ``start..stop`` and its input names (built once, thread-safe)."""
        found = self._sessions.get((start, stop))
        if found is not None:
            return found
        import onnxruntime as ort

        with self._lock:
            found = self._sessions.get((start, stop))
            if found is None:
                try:
                    session = ort.InferenceSession(
                        self.graph.fuse(start, stop),
                        session_options(self.threads),
                        providers=self.providers,
                    )
                except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
                    raise BundleError(
                        f"cannot load the ONNX graph of segments {start}..{stop - 1} of {self.name!r}: {exc}"
                    ) from None
                found = (session, [x.name for x in session.get_inputs()])
                self._sessions[(start, stop)] = found
        return found

    def run(self, start: int, stop: int, frontier: Sequence[Any]) -> list[Any]:
        """Frontier ``stop`` (numpy arrays) from frontier ``start`` (numpy arrays)."""
        import numpy as np

        session, names = self.session(start, stop)
        feeds = dict(zip(names, (np.ascontiguousarray(v) for v in frontier), strict=True))
        return list(session.run(None, feeds))
