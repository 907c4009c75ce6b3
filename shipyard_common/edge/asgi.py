"""What the edge's ASGI layers share: the ASGI types, header lookups, and a refusal in the
platform's error body (``{"error": {"code", "message"}}``, as :mod:`shipyard_common.web` answers),
or in another shape where a service's protocols have their own (serving's OIP v2: ``ErrorBody``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from shipyard_common.errors import ShipyardError
from shipyard_common.metrics import HttpMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The route label of refusals in shipyard_http_requests: they never reach a route.
EDGE_ROUTE = "(edge)"

# The bytes of a refusal's JSON body for a request (its path may say which protocol it speaks).
ErrorBody = Callable[[Scope, ShipyardError], bytes]


def platform_error_body(scope: Scope, error: ShipyardError) -> bytes:
    """``{"error": {"code", "message"}}``: every service's own routes answer errors so."""
    return json.dumps(error.to_body()).encode()


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def has_body(scope: Scope) -> bool:
    """Whether the request carries a body still to be read (declared, or chunked)."""
    length = header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return header(scope, b"transfer-encoding") is not None


async def refuse(
    scope: Scope,
    send: Send,
    error: ShipyardError,
    *,
    close: bool,
    headers: list[tuple[bytes, bytes]] | None = None,
    metrics: HttpMetrics | None = None,
    error_body: ErrorBody = platform_error_body,
) -> None:
    """Answer ``error`` (in ``error_body``'s shape); ``close`` ends the connection, so that a body left
    unread is never read (uvicorn would otherwise read and drop the rest to keep the connection)."""
    body = error_body(scope, error)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += headers or []
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": head})
    await send({"type": "http.response.body", "body": body})
    if metrics is not None:
        metrics.observe(scope.get("method", ""), EDGE_ROUTE, error.status_code, 0.0)
