"""splitinfer.cloud: the aiohttp tail server.

``splitinfer serve --repository DIR`` runs it (:func:`serve`); :func:`create_app` returns the
aiohttp Application for embedding and tests, and :func:`create_probe_app` the small one that
serves /metrics and health on a separate port. See docs/server.md.

The names load on first use, so that the ``splitinfer`` dispatcher can register ``serve``
(``splitinfer.cloud._cli``) without importing aiohttp and torch for every other command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitinfer.cloud._app import create_app, create_probe_app
    from splitinfer.cloud._config import ServerConfig
    from splitinfer.cloud._serve import serve

__all__ = ["ServerConfig", "create_app", "create_probe_app", "serve"]

_WHERE = {
    "ServerConfig": "_config",
    "create_app": "_app",
    "create_probe_app": "_app",
    "serve": "_serve",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"splitinfer.cloud.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'splitinfer.cloud' has no attribute {name!r}")
