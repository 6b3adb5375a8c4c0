"""A minimal HTTP/1.1 keep-alive client for the simulated agents of the benchmarks.

httpx spends about two milliseconds of CPU on each request here, which in a sequential
chain is added to every step and would be charged to the server. The real agents are
Go programs whose HTTP client costs a few tens of microseconds. This client does only
what the agent API needs (one connection, one request at a time, JSON bodies with
Content-Length answers) and costs a tenth of httpx, so the figures measure the server.
Its own ceiling is printed beside them (`ceiling`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson


class Response:
    __slots__ = ("body", "path", "status_code")

    def __init__(self, status_code: int, body: bytes, path: str) -> None:
        self.status_code = status_code
        self.body = body
        self.path = path

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class RawClient:
    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        lines = [f"Host: {self.host}:{self.port}", *(f"{k}: {v}" for k, v in headers.items())]
        self._headers = "".join(f"{line}\r\n" for line in lines)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        target = f"{path}?{urlencode(params)}" if params else path
        body = b"" if json is None else orjson.dumps(json)
        head = f"{method} {target} HTTP/1.1\r\n{self._headers}Content-Length: {len(body)}\r\n\r\n"
        self._writer.write(head.encode() + body)
        status = int((await self._reader.readline()).split()[1])
        length, close = 0, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
        answer = Response(status, await self._reader.readexactly(length), path)
        if close:
            await self.aclose()
        return answer

    async def get(self, path: str, params: dict[str, Any] | None = None) -> Response:
        return await self.request("GET", path, params)

    async def put(self, path: str, json: Any = None) -> Response:
        return await self.request("PUT", path, json=json)

    async def post(
        self, path: str, params: dict[str, Any] | None = None, json: Any = None
    ) -> Response:
        return await self.request("POST", path, params, json)


async def ceiling(url: str, seconds: float = 2.0) -> dict[str, float]:
    """This client's own rate and latency on GET /healthz, one request at a time: the
    least a request costs the load generator and the server's HTTP layer together."""
    async with RawClient(url, {}) as client:
        await client.get("/healthz")
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            began = time.perf_counter()
            await client.get("/healthz")
            latencies.append(time.perf_counter() - began)
    latencies.sort()
    return {
        "rate": len(latencies) / seconds,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
    }
