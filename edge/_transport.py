"""How the edge reaches the cloud: one small interface, an aiohttp implementation."""

from __future__ import annotations

import asyncio
import io
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from splitinfer.errors import CloudTimeoutError, CloudUnavailableError, ConfigError, TLSError

__all__ = [
    "HttpTransport",
    "InProcessTransport",
    "Transport",
    "TransportRequest",
    "TransportResponse",
    "make_ssl_context",
]

_STREAM_ABOVE = 512 * 1024


@dataclass(frozen=True)
class TransportResponse:
    status: int
    body: bytes
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    #: perf_counter times: request sent (start), response headers in (first byte), body read (end).
    started: float = 0.0
    first_byte: float = 0.0
    ended: float = 0.0
    #: Whether the request was sent twice because a kept-alive connection had gone stale.
    retried: bool = False


class Transport(Protocol):
    """Sends one request body to the cloud and returns its answer."""

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse: ...

    async def get(self, path: str, timeout_s: float | None) -> TransportResponse: ...

    async def close(self) -> None: ...


def make_ssl_context(
    ca_file: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (else the system's CAs), with an optional client
    certificate for mutual TLS."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if client_cert:
            context.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up TLS (ca_file={ca_file}, client_cert={client_cert}): {exc}") from exc
    if client_key and not client_cert:
        raise ConfigError("client_key needs client_cert too")
    return context


async def _speaks_tls(base_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at ``base_url`` (an http:// URL) completes a TLS handshake."""
    url = urlsplit(base_url)
    if url.hostname is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asks whether it speaks TLS
    try:
        connect = asyncio.open_connection(url.hostname, url.port or 80, ssl=context)
        _, writer = await asyncio.wait_for(connect, timeout_s)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        return False
    writer.close()
    return True


class HttpTransport:
    """HTTP/1.1 with keep-alive over one pooled aiohttp session; errors mapped to splitinfer's.

    A request whose kept-alive connection turns out to be closed by the server before any
    answer arrived (``ServerDisconnectedError``) is sent once more, and the response says so.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = 256 * 1024 * 1024,
        pool_size: int = 64,
        connect_timeout_s: float = 3.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self._max_response = max_response_bytes
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=self._ssl or True),
                headers=self._headers,
            )
        return self._session

    async def _once(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse:
        # Large bodies are streamed from a file-like object (aiohttp warns on big raw bytes).
        data = io.BytesIO(body) if body is not None and len(body) > _STREAM_ABOVE else body
        connect = self._connect_timeout if timeout_s is None else min(self._connect_timeout, timeout_s)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect)
        started = time.perf_counter()
        async with self._get_session().request(
            method, url, data=data, headers=headers, timeout=timeout
        ) as resp:
            first_byte = time.perf_counter()
            if resp.content_length is not None and resp.content_length > self._max_response:
                raise CloudUnavailableError(f"cloud answer of {resp.content_length} bytes is too large")
            # read(n) returns what has arrived so far: loop until the end of the body (a slow link
            # delivers it in many pieces).
            chunks: list[bytes] = []
            size = 0
            while size <= self._max_response:
                chunk = await resp.content.read(self._max_response + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            payload = b"".join(chunks)
            if len(payload) > self._max_response:
                raise CloudUnavailableError(f"cloud answer exceeds {self._max_response} bytes")
            return TransportResponse(
                resp.status, payload, CIMultiDict(resp.headers), started, first_byte, time.perf_counter()
            )

    async def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse:
        url = self.base_url + path
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        try:
            try:
                return await self._once(method, url, body, headers, timeout_s)
            except aiohttp.ServerDisconnectedError:
                remaining = None if deadline is None else max(0.001, deadline - time.perf_counter())
                resp = await self._once(method, url, body, headers, remaining)
                return TransportResponse(
                    resp.status, resp.body, resp.headers, resp.started, resp.first_byte, resp.ended, True
                )
        except asyncio.TimeoutError as exc:
            raise CloudTimeoutError(f"no answer from {url} within {timeout_s} s") from exc
        except aiohttp.ClientSSLError as exc:
            raise TLSError(
                f"TLS with the cloud at {self.base_url} failed: {exc}. If the server's certificate is "
                "self-signed or from a private CA, pass ca_file=<that CA's PEM file> (EdgeClient(..., "
                "ca_file=...)); otherwise check the certificate's name and dates"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if self.base_url.startswith("http://") and await _speaks_tls(self.base_url):
                https = "https://" + self.base_url[len("http://") :]
                raise TLSError(
                    f"the server at {self.base_url} speaks TLS: use {https} (with ca_file= if its "
                    "certificate is not from a CA this system trusts)"
                ) from exc
            raise CloudUnavailableError(f"cannot reach the cloud at {url}: {exc}") from exc
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


@dataclass(frozen=True)
class TransportRequest:
    """One request as an :class:`InProcessTransport` hands it to its handler."""

    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    timeout_s: float | None


class InProcessTransport:
    """A Transport that answers every request with ``handler(request)``, in this process (as
    httpx's ``MockTransport``): the edge's hedging, back-off, probing and fallback without
    sockets. The handler returns a :class:`TransportResponse` (its times are stamped here) or
    raises what a transport raises (``CloudUnavailableError`` for a cloud that cannot be
    reached); an async handler may sleep to play a slow cloud, and one slower than the
    request's timeout raises ``CloudTimeoutError``. ``requests`` lists every request seen.
    """

    def __init__(
        self, handler: Callable[[TransportRequest], Awaitable[TransportResponse] | TransportResponse]
    ):
        self.handler = handler
        self.requests: list[TransportRequest] = []
        self.closed = False

    async def _call(self, request: TransportRequest) -> TransportResponse:
        self.requests.append(request)
        started = time.perf_counter()
        try:
            resp = await asyncio.wait_for(self._answer(request), request.timeout_s)
        except asyncio.TimeoutError as exc:
            raise CloudTimeoutError(f"no answer to {request.path} within {request.timeout_s} s") from exc
        ended = time.perf_counter()
        return TransportResponse(resp.status, resp.body, resp.headers, started, ended, ended, resp.retried)

    async def _answer(self, request: TransportRequest) -> TransportResponse:
        answer = self.handler(request)
        return answer if isinstance(answer, TransportResponse) else await answer

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout_s: float | None
    ) -> TransportResponse:
        return await self._call(TransportRequest("POST", path, body, dict(headers), timeout_s))

    async def get(self, path: str, timeout_s: float | None) -> TransportResponse:
        return await self._call(TransportRequest("GET", path, b"", {}, timeout_s))

    async def close(self) -> None:
        self.closed = True
