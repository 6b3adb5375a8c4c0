"""The JSON response class: orjson, integers stay integers (`30`, never `30.0`)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        # SQLAlchemy row keys are str subclasses, which orjson accepts only with this option.
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            # What orjson cannot write (integers past 64 bits, lone surrogates, very deep
            # nesting) the standard library can, as valid (escaped) JSON.
            return json.dumps(content, ensure_ascii=True, default=str).encode()
