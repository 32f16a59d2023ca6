"""What a running application holds, under typed AppKeys, bound to its cleanup context."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from splitinfer.bundle import Bundle
from splitinfer.cloud._auth import TokenSet
from splitinfer.cloud._batcher import Scheduler
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._drain import Drain
from splitinfer.cloud._metrics import ServerMetrics
from splitinfer.cloud._repository import Repository
from splitinfer.cloud._service import InferenceService

__all__ = ["CONFIG", "METRICS", "SERVICE", "STATE", "TOKENS", "ServerState"]


@dataclass
class ServerState:
    """The loaded models and the machinery serving them, alive between startup and cleanup."""

    config: ServerConfig
    metrics: ServerMetrics
    repository: Repository
    pool: ThreadPoolExecutor
    scheduler: Scheduler
    drain: Drain

    @property
    def models(self) -> dict[str, Bundle]:
        """The newest served version of every model, by name."""
        return {name: s.bundle for name in self.repository.models if (s := self.repository.latest(name))}

    @property
    def ready(self) -> bool:
        return not self.drain.draining


CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", ServerMetrics)
TOKENS = web.AppKey("tokens", TokenSet)
STATE = web.AppKey("state", ServerState)
#: The inference service of a running application (set when its models have loaded).
SERVICE = web.AppKey("service", InferenceService)
