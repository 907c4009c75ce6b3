"""The edge: what every request of a service passes before routing, auth or body parsing.

One call, :func:`install_edge`, after ``install_common``, puts four plain ASGI layers in front of
the app, outermost first:

1. trusted hosts (:mod:`.hosts`): a Host header the service does not answer to is 400;
2. CORS (Starlette's ``CORSMiddleware``), only where ``cors_allowed_origins`` names origins;
3. a per-caller rate limit (:mod:`.ratelimit`), 429 with ``Retry-After``, when ``rate_limit_per_s`` is set;
4. the body limit (:mod:`.body`): 413 over ``max_body_bytes`` (by Content-Length, or as a chunked body
   arrives), and 400 for JSON nested deeper than ``max_json_depth`` or with more than
   ``max_json_values`` values (:mod:`.jsonscan`).

None of the layers in front of the body limit reads the body, so it is still bounded before auth and
parsing. Settings are each service's (``SHIPYARD_<SERVICE>_MAX_BODY_BYTES`` …, on
:class:`~shipyard_common.settings.ServiceSettings`); refusals use the platform's error body and are
counted in ``shipyard_http_requests`` under the route ``(edge)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from shipyard_common.edge.asgi import ErrorBody, platform_error_body
from shipyard_common.edge.body import BodyLimit, BodyRoute
from shipyard_common.edge.hosts import TrustedHosts
from shipyard_common.edge.jsonscan import JsonLimits
from shipyard_common.edge.ratelimit import RateLimit
from shipyard_common.metrics import HttpMetrics
from shipyard_common.settings import ServiceSettings

__all__ = ["BodyRoute", "ErrorBody", "allowed_hosts", "install_edge", "platform_error_body"]

# Headers a browser page may send and read across origins (tokens travel in headers, never cookies).
CORS_REQUEST_HEADERS = ["authorization", "x-api-token", "content-type", "x-request-id"]
CORS_EXPOSED_HEADERS = ["retry-after", "x-model-version", "x-request-id"]
UNSPECIFIED_ADDRESSES = {"0.0.0.0", "::", ""}


def allowed_hosts(settings: ServiceSettings, service: str) -> list[str]:
    """``allowed_hosts``, plus the address the service binds and the host of its URL in the platform
    settings (``trainer_url`` …: how the other services reach it); a wildcard bind adds nothing."""
    hosts = list(settings.allowed_hosts)
    if settings.host not in UNSPECIFIED_ADDRESSES:
        hosts.append(settings.host)
    url = getattr(settings.platform, f"{service}_url", None)
    if isinstance(url, str) and urlsplit(url).hostname:
        hosts.append(str(urlsplit(url).hostname))
    return hosts


def install_edge(
    app: FastAPI,
    settings: ServiceSettings,
    *,
    service: str,
    body_routes: Sequence[BodyRoute] = (),
    error_body: ErrorBody = platform_error_body,
) -> None:
    """Put the edge in front of ``app`` from ``settings``. ``body_routes`` take other body limits;
    ``error_body`` shapes refusals where a path's protocol has its own error shape (serving's)."""
    metrics: HttpMetrics | None = getattr(app.state, "http_metrics", None)
    json_limits = JsonLimits(max_depth=settings.max_json_depth, max_values=settings.max_json_values)
    # add_middleware puts each layer outside the ones added before it: innermost first.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, json_limits=json_limits,
                       routes=body_routes, metrics=metrics, error_body=error_body)
    if settings.rate_limit_per_s > 0:
        app.add_middleware(RateLimit, rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst,
                           tokens=settings.platform.tokens, metrics=metrics, error_body=error_body)
    if settings.cors_allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allowed_origins,
                           allow_methods=["*"], allow_headers=CORS_REQUEST_HEADERS,
                           expose_headers=CORS_EXPOSED_HEADERS, allow_credentials=False, max_age=600)
    hosts = allowed_hosts(settings, service)
    if "*" not in hosts:
        app.add_middleware(TrustedHosts, allowed=hosts, metrics=metrics, error_body=error_body)
