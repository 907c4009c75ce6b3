"""A per-caller rate limit: a token bucket per principal, answering 429 with ``Retry-After``.

The caller is the principal a known token names (``Authorization: Bearer`` or ``X-API-Token``),
else the client's address: an unknown token gets no bucket of its own, so inventing tokens does
not buy requests. Each bucket holds ``burst`` requests and refills at ``rate`` a second. The
buckets live in this process: with several workers each keeps its own, so a caller may send up to
``workers`` times the rate. Health, readiness and metrics routes are never limited (probes and
scrapers call them without tokens).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping

from shipyard_common.auth import Grant, Role, key_digest, principal_name
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
from shipyard_common.errors import TooManyRequests
from shipyard_common.metrics import HttpMetrics

UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Buckets beyond this many are pruned of the full ones (callers idle long enough to have refilled).
MAX_BUCKETS = 10_000


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class RateLimit:
    """At most ``burst`` requests at once and ``rate`` a second on average, per caller."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float,
        burst: int,
        tokens: Mapping[str, Role | Grant],
        metrics: HttpMetrics | None = None,
        error_body: ErrorBody = platform_error_body,
    ) -> None:
        self.app = app
        self.error_body = error_body
        self.rate = rate
        self.burst = float(burst)
        # Looked up by the token's digest: a dict lookup then reveals nothing of a token by its timing.
        # Keys are clear tokens or their sha256: hashes (the settings' TokenTable): both by digest.
        self.principals = {key_digest(key): principal_name(key, grant) for key, grant in tokens.items()}
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens left, when counted)
        self.metrics = metrics

    def caller(self, scope: Scope) -> str:
        token: bytes | None = header(scope, b"authorization")
        if token is not None:
            scheme, _, token = token.partition(b" ")
            token = token.strip() if scheme.lower() == b"bearer" else None
        token = token or header(scope, b"x-api-token")
        if token:
            name = self.principals.get(_digest(token.decode("latin-1")))
            if name is not None:
                return f"principal:{name}"
        client = scope.get("client")
        return f"address:{client[0] if client else 'unknown'}"

    def take(self, caller: str, now: float) -> float:
        """Take one request from ``caller``'s bucket: 0 when allowed, else seconds until one is."""
        left, then = self.buckets.get(caller, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if left >= 1:
            if caller not in self.buckets and len(self.buckets) >= MAX_BUCKETS:
                self._prune(now)
            self.buckets[caller] = (left - 1, now)
            return 0.0
        self.buckets[caller] = (left, now)
        return (1 - left) / self.rate

    def _prune(self, now: float) -> None:
        full = [key for key, (left, then) in self.buckets.items()
                if left + (now - then) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        wait = self.take(self.caller(scope), time.monotonic())
        if not wait:
            await self.app(scope, receive, send)
            return
        seconds = max(1, math.ceil(wait))
        error = TooManyRequests(
            f"too many requests: at most {self.rate:g} a second (bursts of {self.burst:g}) per caller; "
            f"retry in {seconds} s"
        )
        await refuse(scope, send, error, close=has_body(scope),
                     headers=[(b"retry-after", str(seconds).encode())], metrics=self.metrics,
                     error_body=self.error_body)
