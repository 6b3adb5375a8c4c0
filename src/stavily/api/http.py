"""uvicorn's HTTP protocol (httptools), each response sent in one write.

uvicorn writes a response's status line and headers, then its body, each with a write of
its own: two system calls, two TCP segments and two wake-ups of the client for one
answer. On this machine's loopback a write costs about 30 microseconds, and an agent step
is three answers. The transport given to uvicorn here holds a response's head back until
its body follows, in the same turn of the event loop as it does, and sends both together;
a head with no body after it (a HEAD request, a 100 Continue) goes at the loop's next turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescedWrites:
    """A transport that sends a response's head with what is written next."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head is not None:
            data = self._head + data
            self._head = None
            self._cancel_flush()
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._head = bytes(data)
            self._flush = asyncio.get_running_loop().call_soon(self._send_head)
            return
        self._transport.write(data)

    def _send_head(self) -> None:
        self._flush = None
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def _cancel_flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def close(self) -> None:
        self._cancel_flush()
        self._send_head()
        self._transport.close()

    def abort(self) -> None:
        self._cancel_flush()
        self._head = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescedWrites transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport))  # type: ignore[arg-type]
