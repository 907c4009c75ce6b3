"""Protocol codecs: bytes and headers in, bytes and headers out, the data plane in between.

They take no web-framework objects, so a leaner ASGI hot path can call them as the routers do.
Each module maps :class:`~shipyard_common.errors.ShipyardError` to its protocol's error shape
in one function, ``error_response``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from shipyard_common.errors import InvalidInput


class NestedTooDeeply(InvalidInput):
    """A JSON body nested deeper than :data:`MAX_JSON_DEPTH`: refused before any recursive parse."""


#: orjson's own limit on nesting: deeper bodies are refused, never parsed recursively.
MAX_JSON_DEPTH = 1024


def loads(body: bytes | str, *, what: str = "the request body") -> Any:
    """Parse JSON fast; NaN/Infinity literals, which orjson refuses, through the slow parser.

    They then reach the validator, which refuses them with a message naming the input (or lets
    them through when ``allow_non_finite`` is set), instead of a bare parse error here.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as fast_error:
        if "depth limit" in str(fast_error):  # orjson stops at 1,024 levels; json.loads would recurse
            raise NestedTooDeeply(f"{what} is nested too deeply (over {MAX_JSON_DEPTH} levels)") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidInput(f"{what} is not valid JSON: {fast_error}") from None


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
