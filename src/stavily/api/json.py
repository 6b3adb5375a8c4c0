"""The JSON response class: orjson, integers stay integers (`30`, never `30.0`)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        # SQLAlchemy row keys are str subclasses, which orjson accepts only with this option.
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
