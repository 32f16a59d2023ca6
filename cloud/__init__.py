"""splitinfer.cloud: the aiohttp tail server.

``splitinfer serve --repository DIR`` runs it (:func:`serve`); :func:`create_app` returns the
aiohttp Application for embedding and tests, and :func:`create_probe_app` the small one that
serves /metrics and health on a separate port. See docs/server.md.
"""

from splitinfer.cloud._app import create_app, create_probe_app
from splitinfer.cloud._config import ServerConfig
from splitinfer.cloud._serve import serve

__all__ = ["ServerConfig", "create_app", "create_probe_app", "serve"]
