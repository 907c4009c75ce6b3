"""Bounded request bodies, refused before routing, auth or parsing.

A Content-Length over the limit is answered 413 at once, without reading a byte of the body. A
chunked body is counted as it arrives and refused as soon as it passes the limit, so at most the
limit is ever held. JSON bodies (``application/json``, ``*+json``, or no Content-Type, which
FastAPI parses as JSON) are read here, still within the limit, and their nesting and number of
values checked (:mod:`shipyard_common.edge.jsonscan`) before the app parses them: 400 with a
sentence rather than a RecursionError. Other bodies with a Content-Length pass through unread.
Some routes take larger bodies (the trainer's dataset uploads): :class:`BodyRoute`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from shipyard_common.edge.asgi import (
    ASGIApp,
    ErrorBody,
    Message,
    Receive,
    Scope,
    Send,
    header,
    platform_error_body,
    refuse,
)
from shipyard_common.edge.jsonscan import JsonLimits, check_json_shape
from shipyard_common.errors import BadRequest, PayloadTooLarge
from shipyard_common.metrics import HttpMetrics


@dataclass(frozen=True)
class BodyRoute:
    """A route family with a body limit of its own: ``method`` and a full-match path pattern."""

    method: str
    path: str
    max_bytes: int

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.fullmatch(self.path, path) is not None


def is_json(scope: Scope) -> bool:
    content_type = header(scope, b"content-type")
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def declared_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


class BodyLimit:
    """413 over ``max_bytes`` (or a :class:`BodyRoute`'s), 400 for JSON beyond ``json_limits``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        json_limits: JsonLimits | None = None,
        routes: Sequence[BodyRoute] = (),
        metrics: HttpMetrics | None = None,
        error_body: ErrorBody = platform_error_body,
    ) -> None:
        self.app = app
        self.error_body = error_body
        self.max_bytes = max_bytes
        self.json_limits = json_limits or JsonLimits(max_depth=0, max_values=0)
        self.routes = tuple(routes)
        self.metrics = metrics

    def limit_for(self, scope: Scope) -> int:
        for route in self.routes:
            if route.matches(scope["method"], scope["path"]):
                return route.max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length = declared_length(scope)
        if length is not None and length > limit:
            message = f"the request body is {length} bytes, over the limit of {limit} bytes"
            await self._too_large(scope, send, message)
            return
        chunked = length is None and header(scope, b"transfer-encoding") is not None
        check_json = self.json_limits.enabled and bool(length or chunked) and is_json(scope)
        if not (chunked or check_json):
            await self.app(scope, receive, send)  # no body, or one the server bounds by its length
            return
        messages = await self._read(receive, limit)
        if messages is None:
            await self._too_large(scope, send, f"the request body is larger than the limit of {limit} bytes")
            return
        if check_json:
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
            problem = check_json_shape(body, self.json_limits)
            if problem is not None:
                await refuse(scope, send, BadRequest(problem), close=False, metrics=self.metrics,
                             error_body=self.error_body)
                return
            messages = deque([{"type": "http.request", "body": body, "more_body": False}])

        async def replay() -> Message:
            return messages.popleft() if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive: Receive, limit: int) -> deque[Message] | None:
        """The body's messages, or None as soon as they pass ``limit`` bytes (the rest unread)."""
        messages: deque[Message] = deque()
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # a disconnect: the app sees it too
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, scope: Scope, send: Send, message: str) -> None:
        await refuse(scope, send, PayloadTooLarge(message), close=True, metrics=self.metrics,
                     error_body=self.error_body)
