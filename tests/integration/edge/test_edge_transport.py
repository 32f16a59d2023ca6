"""The HTTP transport: one retry when a kept-alive connection turns out dead, recorded."""

from __future__ import annotations

import asyncio

import pytest

from splitinfer.edge import HttpTransport
from splitinfer.errors import CloudUnavailableError, ConfigError

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def _read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return True


async def test_a_stale_keep_alive_connection_is_retried_once_and_says_so():
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(OK)  # keep-alive answer
        await writer.drain()
        if len(connections) == 1:
            await _read_request(reader)  # the next request on this connection...
            writer.transport.abort()  # ...dies unanswered, as on a server that timed it out
            return
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(OK)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = HttpTransport(f"http://127.0.0.1:{port}")
    try:
        first = await transport.post("/x", b"one", {}, 5.0)
        assert (first.status, first.body, first.retried) == (200, b"ok", False)
        second = await transport.post("/x", b"two", {}, 5.0)
        assert (second.status, second.body, second.retried) == (200, b"ok", True)
        assert len(connections) == 2
        assert first.started <= first.first_byte <= first.ended
    finally:
        await transport.close()
        for writer in connections:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)


async def test_a_dead_server_is_not_retried_forever():
    server = await asyncio.start_server(lambda r, w: w.transport.abort(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = HttpTransport(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(CloudUnavailableError, match="cannot reach"):
            await transport.post("/x", b"one", {}, 5.0)
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


def test_url_must_be_http():
    with pytest.raises(ConfigError, match="http://"):
        HttpTransport("ftp://example")
