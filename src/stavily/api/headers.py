"""Security headers on every answer, and CORS for the private API when configured."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers as RequestHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stavily.api.errors import error_response

# The API answers JSON: nothing in an answer may load, run or be framed.
API_POLICY = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI starts from an inline script, ReDoc styles inline and parses in a blob:
# worker; both load only from this server and call only it (the OpenAPI document, "Try it
# out").
DOCS_POLICY = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# Browsers heed it only over HTTPS; sent when the request came over it (directly, or
# through a proxy uvicorn trusts, whose X-Forwarded-Proto says so).
HSTS = (b"strict-transport-security", b"max-age=31536000")
_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    """Appends precomputed headers to each answer's start: the agents' hot path pays a
    few prefix tests and a list copy. `pages` are the path prefixes of HTML pages (the API
    docs), which get a looser policy; under `static` (their scripts and styles) answers
    may be cached; every other answer is no-store, unless it says its own Cache-Control.

    With `cors_origins`, browsers on those origins may call the private API (/api/) with
    an API token in Authorization; no cookies cross (no credentials mode)."""

    def __init__(
        self,
        app: ASGIApp,
        pages: Sequence[str] = (),
        static: str | None = None,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.cors = _Cors(app, cors_origins) if cors_origins else None
        self.pages = tuple(pages)
        self.static = static
        api = [*_COMMON, (b"content-security-policy", API_POLICY)]
        docs = [*_COMMON, (b"content-security-policy", DOCS_POLICY)]
        # each: (over HTTP, over HTTPS)
        self._api = (api, [*api, HSTS])
        self._docs = (docs, [*docs, HSTS])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        static = self.static is not None and path.startswith(self.static)
        added = (self._docs if path.startswith(self.pages) else self._api)[
            scope.get("scheme") == "https"
        ]
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                if not static and not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append(_NO_STORE)
                message["headers"] = headers + added
            await send(message)

        app = self.cors if self.cors is not None and path.startswith("/api/") else self.app
        try:
            await app(scope, receive, sending)
        except Exception:
            # Starlette answers an unhandled error outside every middleware, so without
            # these headers: the same answer, given here. It still logs and re-raises.
            if not started:
                response = error_response(500, "internal_error", "an internal error occurred")
                await response(scope, receive, sending)
            raise


class _Cors(CORSMiddleware):
    """Starlette's CORS, its refused preflights in our error shape."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )

    def preflight_response(self, request_headers: RequestHeaders) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        return error_response(400, "bad_request", bytes(answer.body).decode())
