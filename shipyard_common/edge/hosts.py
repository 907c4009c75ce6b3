"""Trusted hosts: a request whose Host header names none of the allowed hosts is refused (400).

Against DNS rebinding: a page on another site that points its own name at 127.0.0.1 reaches a
service on a laptop, but its requests carry that name as their Host. The same idea as Starlette's
TrustedHostMiddleware and MLflow's ``--allowed-hosts``, answering in the platform's error body.
Entries are host names or addresses without a port, ``*.example.com`` for a domain's subdomains,
or ``*`` for any host (then this layer is not installed at all).
"""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_common.edge.asgi import (
    ASGIApp,
    ErrorBody,
    Receive,
    Scope,
    Send,
    has_body,
    header,
    platform_error_body,
    refuse,
)
from shipyard_common.errors import BadRequest
from shipyard_common.metrics import HttpMetrics


def host_name(value: bytes) -> str:
    """The host of a Host header, without its port: ``[::1]:8001`` → ``::1``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class TrustedHosts:
    """400 for a Host header that none of ``allowed`` names."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed: Iterable[str],
        metrics: HttpMetrics | None = None,
        error_body: ErrorBody = platform_error_body,
    ) -> None:
        self.app = app
        self.error_body = error_body
        names = {host.strip().lower().strip("[]") for host in allowed if host.strip()}
        self.exact = frozenset(name for name in names if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))  # ".example.com"
        self.metrics = metrics

    def allows(self, host: str) -> bool:
        return host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = header(scope, b"host")
        host = host_name(value) if value is not None else ""
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        said = f"the Host header names {host!r}, which" if host else "a request without a Host header:"
        error = BadRequest(f"{said} this service does not answer to (its allowed_hosts setting)")
        await refuse(scope, send, error, close=has_body(scope), metrics=self.metrics,
                     error_body=self.error_body)
