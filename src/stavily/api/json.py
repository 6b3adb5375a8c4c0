"""The JSON response class: orjson, integers stay integers (`30`, never `30.0`)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.types import Send


def render(content: Any) -> bytes:
    # SQLAlchemy row keys are str subclasses, which orjson accepts only with this option.
    try:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        # What orjson cannot write (integers past 64 bits, lone surrogates, very deep
        # nesting) the standard library can, as valid (escaped) JSON.
        return json.dumps(content, ensure_ascii=True, default=str).encode()


class JSONResponse(StarletteJSONResponse):
    """Starlette's, rendered with orjson (a subclass of it, so FastAPI documents the
    response models of routes that answer with it)."""

    def render(self, content: Any) -> bytes:
        return render(content)


async def send_json(
    send: Send, content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> None:
    """What JSONResponse(content, status, headers) sends, sent straight (the agent API's
    fast path answers thousands of these a second)."""
    body = render(content)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
