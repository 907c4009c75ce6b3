"""What every Shipyard HTTP service has: error mapping, health, readiness, metrics, auth.

The error tree of :mod:`shipyard_common.errors` is turned into responses here and nowhere
else; the body is always ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shipyard_common import oidc
from shipyard_common.auth import TokenAuthenticator
from shipyard_common.errors import ShipyardError
from shipyard_common.metrics import HttpMetrics
from shipyard_common.settings import PlatformSettings

log = logging.getLogger("shipyard.web")

ReadinessCheck = Callable[[], None]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: not_found, invalid_input...")
    message: str = Field(description="What was wrong, for a person.")
    details: Any = Field(default=None, description="More, where there is (per-field problems of a 422).")


class ErrorPublic(BaseModel):
    """The body of every refusal of the platform's own routes (``ShipyardError.to_body``)."""

    error: ErrorDetail


ERROR_MEANINGS = {
    400: "Bad request: a name, a parameter or a body that is not usable (the message says which).",
    401: "No token, or one that is not valid.",
    403: "The token's role may not do this.",
    404: "Not found.",
    409: "The request clashes with the current state.",
    413: "The body is over the service's limit.",
    415: "The body's Content-Type is not one this route reads.",
    422: "The request does not match its schema (details: each field and what is wrong).",
    429: "Over the caller's rate limit (Retry-After says when to retry).",
    502: "A component the service depends on answered badly.",
    503: "A component the service depends on is not there.",
}


def error_responses(*codes: int, model: type[BaseModel] = ErrorPublic) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for routes that answer ``codes`` with ``model`` (the platform's error body unless a
    protocol has its own), so that each route's OpenAPI lists every status it answers."""
    return {code: {"model": model, "description": ERROR_MEANINGS[code]} for code in codes}


#: What every route behind a token answers besides its own: a bad name or body (400), no or a bad
#: token (401), a role that may not (403), a request off its schema (422), the rate limit (429).
AUTHED_ERRORS = (400, 401, 403, 422, 429)


def mlflow_health_check(tracking_uri: str) -> ReadinessCheck:
    """A readiness check that passes while the MLflow server answers its health route."""
    import httpx

    def check() -> None:
        httpx.get(f"{tracking_uri.rstrip('/')}/health", timeout=2).raise_for_status()

    return check


def error_response(
    status_code: int, code: str, message: str, details: Any = None, *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status_code, headers=headers)


def describe_validation_errors(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """Turn pydantic's error list into one sentence a person reads, plus per-field details."""
    details = []
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        details.append({"field": field, "message": msg, "type": err.get("type")})
        parts.append(f"{field}: {msg}")
    return "invalid request: " + "; ".join(parts), details


FASTAPI_BODY_ERROR = "There was an error parsing the body"


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An unknown route (404), a method the route does not take (405, with its ``Allow``), and the like."""
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if message == FASTAPI_BODY_ERROR:  # FastAPI's answer to a body that does not parse as JSON
        message = "the request body is not valid JSON (or not UTF-8): send the JSON document the route takes"
    # Starlette's 405 names the methods the route takes in Allow (RFC 9110): kept.
    return error_response(exc.status_code, code, message, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ShipyardError)
    async def _shipyard_error(_: Request, exc: ShipyardError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return JSONResponse(exc.to_body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = describe_validation_errors(list(exc.errors()))
        return error_response(422, "validation_error", message, details)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


class ReadinessPublic(BaseModel):
    status: str = Field(description="ready or not ready")
    checks: dict[str, str] = Field(description="Each check: ok, or failed: why.")


class RequestMetrics:
    """Counts and times every HTTP request by method, route template and status.

    A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware costs about half a millisecond a request (a task and a stream per call),
    more than a whole prediction on a small model.
    """

    def __init__(self, app: Any, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_observed(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - started)


def install_common(
    app: FastAPI,
    *,
    service: str,
    platform: PlatformSettings,
    readiness_checks: dict[str, ReadinessCheck] | None = None,
    registry: CollectorRegistry | None = None,
) -> CollectorRegistry:
    """Add error handlers, auth, ``/healthz``, ``/readyz``, ``/metrics`` and request metrics."""
    registry = registry or CollectorRegistry()
    http_metrics = HttpMetrics(registry, service)
    app.state.metrics_registry = registry
    app.state.http_metrics = http_metrics  # for ASGI layers in front of the middleware (serving's fast lane)
    app.state.authenticator = TokenAuthenticator(platform.tokens, jwt=oidc.validator(platform.oidc))
    app.state.ready = True
    checks = dict(readiness_checks or {})
    install_error_handlers(app)

    app.add_middleware(RequestMetrics, metrics=http_metrics)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", tags=["ops"], response_model=ReadinessPublic,
             responses={503: {"model": ReadinessPublic, "description": "Not ready: the checks say why."}})
    def readyz() -> JSONResponse:
        results: dict[str, str] = {}
        ok = bool(app.state.ready)
        if not ok:
            results["service"] = "shutting down"
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # a failed check is an answer, not an error
                ok = False
                results[name] = f"failed: {exc}"
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": results},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus' text format."}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
