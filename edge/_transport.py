"""How the edge reaches the cloud: one small interface, an aiohttp implementation."""

from __future__ import annotations

import asyncio
import io
import ssl
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from splitinfer.errors import CloudTimeoutError, CloudUnavailableError, ConfigError

__all__ = ["HttpTransport", "Transport", "TransportResponse"]

_STREAM_ABOVE = 512 * 1024


@dataclass(frozen=True)
class TransportResponse:
    status: int
    body: bytes
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)


class Transport(Protocol):
    """Sends one request body to the cloud and returns its answer."""

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse: ...

    async def get(self, path: str, timeout_s: float | None) -> TransportResponse: ...

    async def close(self) -> None: ...


class HttpTransport:
    """HTTP/1.1 with keep-alive over one aiohttp session; errors mapped to splitinfer's."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = 256 * 1024 * 1024,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self._max_response = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=self._ssl if self._ssl else True),
                headers=self._headers,
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout_s: float | None,
    ) -> TransportResponse:
        url = self.base_url + path
        # Large bodies are streamed from a file-like object (aiohttp sends bytes in one write).
        data = io.BytesIO(body) if body is not None and len(body) > _STREAM_ABOVE else body
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._get_session().request(
                method, url, data=data, headers=headers, timeout=timeout
            ) as resp:
                if resp.content_length is not None and resp.content_length > self._max_response:
                    raise CloudUnavailableError(f"cloud answer of {resp.content_length} bytes is too large")
                data = await resp.content.read(self._max_response + 1)
                if len(data) > self._max_response:
                    raise CloudUnavailableError(f"cloud answer exceeds {self._max_response} bytes")
                return TransportResponse(resp.status, data, CIMultiDict(resp.headers))
        except asyncio.TimeoutError as exc:
            raise CloudTimeoutError(f"no answer from {url} within {timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise CloudUnavailableError(f"cannot reach the cloud at {url}: {exc}") from exc

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse:
        return await self._request("POST", path, body, headers, timeout_s)

    async def get(self, path: str, timeout_s: float | None) -> TransportResponse:
        return await self._request("GET", path, None, {}, timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
