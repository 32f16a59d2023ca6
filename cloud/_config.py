"""Server configuration, checked when it is built."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from splitinfer.compression import get_codec
from splitinfer.errors import CodecError, ConfigError
from splitinfer.runtime import RUNTIMES

if TYPE_CHECKING:
    import torch

    #: Where tails run: a torch device, or the device name ONNX Runtime tails run on ("cpu",
    #: "cuda:0"), which needs no torch.
    TailDevice = torch.device | str

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "SPLITINFER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``splitinfer serve`` can be told; each field also reads ``SPLITINFER_<FIELD>``.

    ``SPLITINFER_MAX_BATCH_SIZE=32`` sets :attr:`max_batch_size`, and so on; booleans take
    ``1/true/yes/on`` or ``0/false/no/off``.
    """

    #: Directory holding one bundle per subdirectory.
    repository: Path
    host: str = "127.0.0.1"
    #: Port of the inference API (0 picks a free one).
    port: int = 8080
    #: Most rows (samples along dim 0) the tail computes at once; 1 turns batching off.
    max_batch_size: int = 16
    #: Longest a request waits for others to join its batch. The wait ends early when the batch
    #: is full or when no other request is arriving, so a lone request never waits.
    max_queue_delay_ms: float = 2.0
    #: Most requests admitted but not yet computing; beyond it requests get 503 + Retry-After.
    max_queue_length: int = 256
    #: Threads that run tails off the event loop, one batch each (0: one per usable core).
    compute_threads: int = 0
    #: Threads torch uses inside one computation (0: the usable cores shared among the compute
    #: threads, at least 1). More threads than cores in all makes OpenMP crawl on a busy machine.
    torch_threads: int = 0
    #: Where tails run: ``torch`` (the .pt2 programs), ``onnxruntime`` (the bundle's ONNX graph;
    #: ``torch_threads`` is then each session's intra-op threads) or ``auto`` (ONNX Runtime for
    #: the bundles that have ONNX, when onnxruntime imports). docs/runtimes.md.
    runtime: str = "torch"
    #: Batches whose tail is predicted to take at most this long (from the compute time measured
    #: per row so far) run on the event loop instead of a compute thread, where the handoff would
    #: cost more than the work. 0 (the default) sends every batch to the compute threads.
    inline_below_ms: float = 0.0
    #: Largest request body accepted; larger ones get 413 before they are read.
    max_body_bytes: int = 64 * 1024 * 1024
    #: Largest frontier a request may decode to (bytes of its tensors); larger ones get 413.
    max_decoded_bytes: int = 256 * 1024 * 1024
    #: Codec of the outputs sent back (lossless by default: outputs are small).
    response_codec: str = "f32"
    #: File of bearer tokens, one a line (``#`` comments and blank lines ignored). Unset: no auth.
    token_file: Path | None = None
    #: Serve health and metrics without a token even when a token file is set.
    public_probes: bool = False
    #: PEM certificate chain and private key: serve HTTPS instead of HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM bundle of CAs that sign client certificates: require mutual TLS.
    tls_client_ca: Path | None = None
    #: Serve /metrics and health on this separate plain-HTTP port (then not on the API port).
    metrics_port: int | None = None
    #: After SIGTERM: seconds to let admitted requests finish before the process exits.
    drain_timeout_s: float = 30.0
    #: Where tails run: ``cpu``, ``cuda`` or ``cuda:N``; empty (the default): cuda when torch sees
    #: a CUDA device, else cpu (:meth:`torch_device`).
    device: str = ""
    #: Keep a segment that equals one loaded already (same graph, weights and constants: models
    #: fine-tuned from one backbone) once, shared by the models that have it.
    share_weights: bool = True
    #: Serve only the newest N versions of each model (0: every version in the repository).
    max_versions: int = 0
    #: Rescan the repository every S seconds and hot-reload what changed (0: only on SIGHUP or
    #: POST /v2/repository/models/{name}/load).
    poll_repository_s: float = 0.0
    #: Longest a client may take to send a request's body (and, under ``serve``, its headers;
    #: idle kept-alive connections close after it too): a slow client gets 408 and is cut off.
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("repository", "token_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if not self.repository.is_dir():
            raise ConfigError(
                f"model repository {str(self.repository)!r} is not a directory; pass "
                "--repository DIR holding one bundle per subdirectory"
            )
        if (self.repository / "manifest.json").is_file():
            raise ConfigError(
                f"{str(self.repository)!r} is a bundle, not a model repository: pass its parent "
                f"(--repository {str(self.repository.resolve().parent)!r}), which holds one bundle per "
                "subdirectory"
            )
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be 0..65535 (0 picks a free port), got {port}")
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            raise ConfigError(f"metrics_port must differ from port ({self.port}); or leave it unset")
        _at_least("max_batch_size", self.max_batch_size, 1, "1 turns batching off")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ConfigError(
                f"max_queue_delay_ms must be 0..10000 ms, got {self.max_queue_delay_ms}; "
                "a few ms is typical, 0 batches only what is already queued"
            )
        _at_least("max_queue_length", self.max_queue_length, 1, "it bounds the requests waiting")
        if not 0 <= self.inline_below_ms <= 50:
            raise ConfigError(
                f"inline_below_ms must be 0..50 ms, got {self.inline_below_ms}; it bounds how long one "
                "batch may hold the event loop (0 never does)"
            )
        for name in ("compute_threads", "torch_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
                raise ConfigError(f"{name} must be 0 (automatic) to 1024, got {value!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        _at_least("max_body_bytes", self.max_body_bytes, 1024, "frames carry a header of their own")
        _at_least("max_decoded_bytes", self.max_decoded_bytes, 1024, "it bounds one request's frontier")
        if self.device and not re.fullmatch(r"cpu|cuda(:\d{1,3})?", self.device):
            raise ConfigError(
                f"device must be cpu, cuda or cuda:N (or empty: cuda when available), got {self.device!r}"
            )
        if (
            isinstance(self.max_versions, bool)
            or not isinstance(self.max_versions, int)
            or self.max_versions < 0
        ):
            raise ConfigError(f"max_versions must be 0 (every version) or more, got {self.max_versions!r}")
        if not (self.poll_repository_s == 0 or 0.1 <= self.poll_repository_s <= 86400):
            raise ConfigError(
                f"poll_repository_s must be 0 (no polling) or 0.1..86400 s, got {self.poll_repository_s}"
            )
        if not 0 < self.drain_timeout_s <= 3600:
            raise ConfigError(f"drain_timeout_s must be in (0, 3600] seconds, got {self.drain_timeout_s}")
        if not 0 < self.read_timeout_s <= 3600:
            raise ConfigError(
                f"read_timeout_s must be in (0, 3600] seconds, got {self.read_timeout_s}; allow the "
                "largest body over the slowest uplink you serve"
            )
        try:
            get_codec(self.response_codec)
        except CodecError as exc:
            raise ConfigError(f"response_codec: {exc}") from None
        self._check_files()

    def _check_files(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (PEM files); pass both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key too"
            )
        if self.public_probes and self.token_file is None:
            raise ConfigError("public_probes only matters with a token file; set --token-file or drop it")
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {str(path)!r} is not a readable file; check the path")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def torch_device(self) -> TailDevice:
        """The device tails run on; ConfigError for a CUDA device torch cannot see, or, with
        runtime ``onnxruntime``, that ONNX Runtime has no CUDA provider for (it places the tails
        itself: the default is cuda when it has one, docs/runtimes.md). With runtime
        ``onnxruntime`` that is the device's name and torch is not imported; otherwise a
        ``torch.device`` (ConfigError naming ``splitinfer[torch]`` where torch is not installed)."""
        from splitinfer.runtime import onnx_device, require_torch

        if self.runtime == "onnxruntime":
            return onnx_device(self.device)

        try:
            torch = require_torch(f"runtime {self.runtime!r}")
        except ConfigError:
            if self.runtime == "auto":  # no torch: auto can only mean ONNX Runtime
                return onnx_device(self.device)
            raise ConfigError(
                "serving tails on torch needs torch, which is not installed here: pass --runtime "
                "onnxruntime (bundles compiled with ONNX), or pip install 'splitinfer[torch]'"
            ) from None
        if not self.device:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ConfigError(
                    f"device {self.device} is not available: torch sees {count} CUDA device(s) "
                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); pass "
                    "--device cpu or install a CUDA build of torch"
                )
        return device

    def threads(self) -> tuple[int, int]:
        """The compute threads and torch threads to use, with 0 resolved against the usable cores."""
        cores = usable_cores()
        compute = self.compute_threads or cores
        return compute, self.torch_threads or max(1, cores // compute)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ServerConfig:
        """Fields from ``SPLITINFER_*`` variables, then ``overrides`` (that are not None) on top."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = environ.get(key)
            if raw is None or not raw.strip():  # unset or empty: the default
                continue
            values[f.name] = _parse(key, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "repository" not in values:
            raise ConfigError("no model repository: pass --repository DIR or set SPLITINFER_REPOSITORY")
        return cls(**values)  # type: ignore[arg-type]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the platform tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _at_least(name: str, value: int, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r} ({hint})")


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(raw)


_PARSERS: dict[str, tuple[Callable[[str], object], str]] = {
    "int": (int, "an integer"),
    "int | None": (int, "an integer"),
    "float": (float, "a number"),
    "bool": (_parse_bool, "1/true/yes/on or 0/false/no/off"),
    "Path": (Path, "a path"),
    "Path | None": (Path, "a path"),
    "str": (str, "a string"),
}


def _parse(key: str, kind: str, raw: str) -> object:
    parse, what = _PARSERS.get(kind, (str, "a string"))
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"{key} must be {what}, got {raw!r}") from None
