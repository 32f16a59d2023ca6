"""splitinfer.edge: the SDK that apps embed (EdgeClient)."""

from splitinfer.edge._breaker import CircuitBreaker
from splitinfer.edge._client import EdgeClient
from splitinfer.edge._config import ClientConfig
from splitinfer.edge._trace import Trace
from splitinfer.edge._transport import (
    HttpTransport,
    InProcessTransport,
    Transport,
    TransportRequest,
    TransportResponse,
)

__all__ = [
    "CircuitBreaker",
    "ClientConfig",
    "EdgeClient",
    "HttpTransport",
    "InProcessTransport",
    "Trace",
    "Transport",
    "TransportRequest",
    "TransportResponse",
]
