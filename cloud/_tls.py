"""TLS and mutual TLS for the API port, through a standard-library ssl context."""

from __future__ import annotations

import ssl

from splitinfer.cloud._config import ServerConfig
from splitinfer.errors import ConfigError

__all__ = ["server_ssl_context"]


def server_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's ssl context, or None to serve plain HTTP.

    TLS 1.2 at least; with ``tls_client_ca`` every client must present a certificate signed by
    one of those CAs (mutual TLS), else the handshake fails.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {config.tls_cert} with key {config.tls_key}: {exc}; "
            "both must be PEM and the key must match the certificate"
        ) from None
    if config.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the client CA bundle {config.tls_client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
