"""Server configuration, checked when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from splitinfer.compression import get_codec
from splitinfer.errors import CodecError, ConfigError

__all__ = ["ServerConfig"]

ENV_PREFIX = "SPLITINFER_"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``splitinfer serve`` can be told; each field also reads ``SPLITINFER_<FIELD>``."""

    repository: Path
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest request body accepted; larger ones get 413 before they are read.
    max_body_bytes: int = 64 * 1024 * 1024
    #: Threads that run decode and tail compute off the event loop.
    compute_threads: int = 1
    #: Threads torch may use inside one computation (0 leaves torch's default).
    torch_threads: int = 0
    #: Codec of the outputs sent back (lossless by default: outputs are small).
    response_codec: str = "f32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if not self.repository.is_dir():
            raise ConfigError(
                f"model repository {str(self.repository)!r} is not a directory; pass "
                "--repository DIR holding one bundle per subdirectory"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.compute_threads < 1:
            raise ConfigError(f"compute_threads must be at least 1, got {self.compute_threads}")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be 0 (torch's default) or more, got {self.torch_threads}")
        try:
            get_codec(self.response_codec)
        except CodecError as exc:
            raise ConfigError(f"response_codec: {exc}") from None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> ServerConfig:
        """Fields from ``SPLITINFER_*`` variables, then ``overrides`` (that are not None) on top."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = f.type if isinstance(f.type, type) else str(f.type)
            if kind in (int, "int"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"{ENV_PREFIX}{f.name.upper()} must be an integer, got {raw!r}"
                    ) from None
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "repository" not in values:
            raise ConfigError("no model repository: pass --repository DIR or set SPLITINFER_REPOSITORY")
        return cls(**values)  # type: ignore[arg-type]
