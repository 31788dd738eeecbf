"""A lean HTTP/1.1 client for load generation on the machine under test.

On a 2-core box the load generator takes its CPU from the system it measures:
aiohttp's client (headers as multidicts, cookie jar, tracing hooks, timeouts per
request) cost ~0.7 ms of CPU a request at 160 requests/s, most of it for 429s
that the gateway answers in a fraction of that. This client only writes
pre-rendered request bytes on pooled keep-alive connections and reads the status
line, the headers it needs and a Content-Length body: what an open loop needs,
nothing else (no chunked bodies, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class _Stale(ConnectionError):
    """A pooled connection the server had closed: nothing was answered on it."""


class RawClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @staticmethod
    def render(path: str, body: dict[str, Any]) -> bytes:
        """One JSON POST, rendered once (the open loop sends it as is)."""
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one rendered request."""
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._exchange(reader, writer, request)
            except (_Stale, ConnectionResetError, BrokenPipeError):  # closed while idle: next
                continue
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, request)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> tuple[int, bytes]:
        try:
            writer.write(request)
            line = await reader.readline()
            if not line:
                raise _Stale
            status = int(line.split(b" ", 2)[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, body

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
