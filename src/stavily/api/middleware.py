"""ASGI middleware at the edge: path normalisation and the request body limit."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stavily.api.errors import error_response

_SLASHES = re.compile(r"/{2,}")
FastPath = Callable[[Scope, Receive, Send, bytes | None], Awaitable[bool]]


class EdgeMiddleware:
    """Agents join paths onto a base URL that may end in `/`, so `//agents/v1/...`
    must route; and no body larger than the limit is read into memory. Agent requests,
    once past these checks, are offered to the fast path first (api.agents_v1)."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, fast_path: FastPath | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Tried first for agent requests (api.agents_v1.serve_fast); False lets them pass.
        self.fast_path = fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if "//" in path:
            path = _SLASHES.sub("/", path)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if "\x00" in path or b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
            await error_response(422, "invalid_input", "the URL holds a NUL character")(
                scope, receive, send
            )
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_body_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await self._too_large(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._message())
            return message

        if _is_json(scope) and scope["method"] in ("POST", "PUT", "PATCH"):
            # Read the body here, refuse JSON the strict parser refuses (NaN, Infinity,
            # lone surrogates, nesting past 1024) with 422, and replay it to the app.
            body = b""
            more = True
            try:
                while more:
                    message = await limited()
                    if message["type"] != "http.request":
                        break
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
            except HTTPException:
                await self._too_large(scope, receive, send)
                return
            if body:
                try:
                    orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    await error_response(
                        422,
                        "invalid_input",
                        "the body is not valid JSON",
                        [{"path": "(root)", "message": str(exc)}],
                    )(scope, receive, send)
                    return
            fast = self._fast(path)
            if fast is not None and await fast(scope, receive, send, body):
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        fast = self._fast(path) if scope["method"] == "GET" else None
        if fast is not None and await fast(scope, receive, send, None):
            return
        await self.app(scope, limited, send)

    def _fast(self, path: str) -> FastPath | None:
        return self.fast_path if path.startswith("/agents/v1/") else None

    def _message(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> Any:
        response = error_response(413, "payload_too_large", self._message())
        await response(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return b"json" in value.lower()
    return False
