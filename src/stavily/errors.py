"""One error hierarchy, mapped once to HTTP statuses and CLI exit codes."""

from __future__ import annotations

from typing import Any


class StavilyError(Exception):
    status = 500
    code = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(StavilyError):
    status = 422
    code = "invalid_input"


class Unauthorized(StavilyError):
    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(StavilyError):
    status = 403
    code = "forbidden"


class NotFound(StavilyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(StavilyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.headers = {"Allow": allow}


class Conflict(StavilyError):
    status = 409
    code = "conflict"


class PayloadTooLarge(StavilyError):
    status = 413
    code = "payload_too_large"


class RateLimited(StavilyError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, {"retry_after": retry_after})
        self.headers = {"Retry-After": str(retry_after)}
