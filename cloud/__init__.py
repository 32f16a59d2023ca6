"""splitinfer.cloud: the aiohttp tail server."""

from splitinfer.cloud._app import create_app
from splitinfer.cloud._config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
