"""ASGI middleware at the edge: path normalisation, rate limits per source address and
webhook, the request body limit, strict JSON and its nesting limit."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stavily.api.errors import error_response
from stavily.api.ratelimits import RateLimits, source_of
from stavily.errors import RateLimited

_SLASHES = re.compile(r"/{2,}")
FastPath = Callable[[Scope, Receive, Send, bytes | None], Awaitable[bool]]
# Told of an agent's result refused at the edge for its nesting (its scope, the agent and
# instruction ids of its path, the body, and why), so the step does not wait for its
# lease: official agents never send it again.
RefusedResult = Callable[[Scope, str, str, bytes, str], Awaitable[None]]
# Bodies larger than this have their nesting measured on a worker thread.
_DEPTH_ON_THREAD = 64 * 1024
# What a request presents as its credential: a bearer token, a webhook's signature.
_CREDENTIALS = (b"authorization", b"x-stavily-signature", b"x-hub-signature-256")


def nesting_problem(body: bytes, value: Any, limit: int) -> str | None:
    """Why `value` (parsed from `body`) nests too deeply, or None. Counting brackets
    first makes the common, small body cost nothing more."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return f"the body nests deeper than {limit} levels"
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return None


class EdgeMiddleware:
    """Agents join paths onto a base URL that may end in `/`, so `//agents/v1/...`
    must route; a source address past its rate limit, or blocked for its refused
    credentials, is refused before any credential is looked up (and every 401 answered
    to a request that presented one is counted against its source); and no body larger
    than the limit is read into memory. Agent requests, once past these checks, are
    offered to the fast path first (api.agents_v1)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        fast_path: FastPath | None = None,
        max_json_depth: int = 128,
        refused_result: RefusedResult | None = None,
        large_bodies: dict[str, int] | None = None,
        hooks: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Tried first for agent requests (api.agents_v1.serve_fast); False lets them pass.
        self.fast_path = fast_path
        # One nesting limit for every JSON body: deeper values cannot be stored or written
        # back (orjson writes 254 levels) and walking them recursively fails.
        self.max_json_depth = max_json_depth
        self.refused_result = refused_result
        # Paths that take a large body that is not JSON (a plugin archive), and its limit.
        self.large_bodies = large_bodies or {}
        # `/hooks/...`: given the request as it came (its raw body is what is signed);
        # it reads, limits and refuses the body itself, recording what it refuses.
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if "//" in path:
            path = _SLASHES.sub("/", path)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        limits: RateLimits = scope["app"].state.stavily.rate_limits
        client = scope.get("client")
        source = client[0] if client else "unknown"
        api = _api(path)
        try:
            await limits.admit(api, source)
            if api == "hooks" and path.count("/") == 2:
                # per sender: a flood of forged requests does not spend the real sender's
                await limits.hit("webhook", f"{path[7:107]}:{source_of(source)}")
        except RateLimited as exc:
            await error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)(
                scope, receive, send
            )
            return
        send = _counting_refusals(send, scope, limits, source, api == "hooks")
        if self.hooks is not None and api == "hooks":
            await self.hooks(scope, receive, send)
            return
        if "\x00" in path or b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
            await error_response(422, "invalid_input", "the URL holds a NUL character")(
                scope, receive, send
            )
            return
        declared = _is_json(scope)
        limit = self.max_body_bytes
        if declared is False and scope["method"] == "POST":
            limit = self.large_bodies.get(path, limit)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_large = int(value) > limit
                except ValueError:
                    too_large = False
                if too_large:
                    await self._too_large(scope, receive, send, limit)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, self._message(limit))
            return message

        if declared is not False and scope["method"] in ("POST", "PUT", "PATCH"):
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
                    value = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    if declared is None:  # not JSON, and not said to be: the route decides
                        await self.app(scope, _replaying(body, receive), send)
                        return
                    await error_response(
                        422,
                        "invalid_input",
                        "the body is not valid JSON",
                        [{"path": "(root)", "message": str(exc)}],
                    )(scope, receive, send)
                    return
                problem = (
                    await asyncio.to_thread(nesting_problem, body, value, self.max_json_depth)
                    if len(body) > _DEPTH_ON_THREAD
                    else nesting_problem(body, value, self.max_json_depth)
                )
                del value
                if problem:
                    await self._refused(scope, body, problem)
                    await error_response(
                        422,
                        "invalid_input",
                        "the body is nested too deeply",
                        [{"path": "(root)", "message": problem}],
                    )(scope, receive, send)
                    return
            fast = self._fast(path)
            if fast is not None and await fast(scope, receive, send, body):
                return
            await self.app(scope, _replaying(body, receive), send)
            return
        fast = self._fast(path) if scope["method"] == "GET" else None
        if fast is not None and await fast(scope, receive, send, None):
            return
        await self.app(scope, limited, send)

    async def _refused(self, scope: Scope, body: bytes, problem: str) -> None:
        if self.refused_result is not None and scope["method"] == "POST":
            parts = scope["path"].split("/")
            if (
                len(parts) == 7
                and parts[1:3] == ["agents", "v1"]
                and parts[4] == "instructions"
                and parts[6] == "result"
            ):
                await self.refused_result(scope, parts[3], parts[5], body, problem)

    def _fast(self, path: str) -> FastPath | None:
        return self.fast_path if path.startswith("/agents/v1/") else None

    def _message(self, limit: int | None = None) -> str:
        return f"the request body is larger than {limit or self.max_body_bytes} bytes"

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, limit: int | None = None
    ) -> Any:
        response = error_response(413, "payload_too_large", self._message(limit))
        await response(scope, receive, send)


def _api(path: str) -> str:
    """Which API a path is of: each has its own budget per source address."""
    if path.startswith("/agents/"):
        return "agents"
    return "hooks" if path.startswith("/hooks/") else "api"


def _counting_refusals(
    send: Send, scope: Scope, limits: RateLimits, source: str, hook: bool
) -> Send:
    """`send`, counting a 401 against the source when the request presented a credential
    (none at all is no guess: a client that forgot its token is not blocked for it), or
    was sent to a webhook (which only signed requests may call)."""

    async def counting(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 401:
            credential = next((v for n, v in scope["headers"] if n in _CREDENTIALS), None)
            if credential is not None:
                await limits.failed(source, credential.decode("latin-1"))
            elif hook:
                await limits.failed(source)
        await send(message)

    return counting


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The body read here, given to the app as if it came now."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(scope: Scope) -> bool | None:
    """True for a JSON content type, None for none at all (FastAPI reads such a body as
    JSON when it can), False for any other."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return b"json" in value.lower()
    return None
