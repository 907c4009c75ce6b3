"""One error hierarchy for the whole platform.

Every error a service raises on purpose derives from :class:`ShipyardError` and carries the
HTTP status it maps to. Each transport maps the tree once (REST: :mod:`shipyard_common.web`),
so service code never raises ``HTTPException``.

    ShipyardError (500)
    ├── BadRequest (400)
    │   └── InvalidInput (400)        input that parses but cannot be used
    ├── Unauthorized (401)            no token, or an unknown one
    ├── Forbidden (403)               a token whose role may not do this
    ├── NotFound (404)
    ├── Conflict (409)                the request clashes with current state
    ├── PayloadTooLarge (413)
    ├── ValidationFailed (422)        a request body that fails its schema
    ├── TooManyRequests (429)         over the caller's rate limit (shipyard_common.edge)
    ├── UpstreamError (502)           a component we depend on answered badly
    └── Unavailable (503)             a component we depend on is not there
"""

from __future__ import annotations

from typing import Any


class ShipyardError(Exception):
    """Base of every deliberate error; ``code`` is stable and machine-readable."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class BadRequest(ShipyardError):
    status_code = 400
    code = "bad_request"


class InvalidInput(BadRequest):
    code = "invalid_input"


class Unauthorized(ShipyardError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ShipyardError):
    status_code = 403
    code = "forbidden"


class NotFound(ShipyardError):
    status_code = 404
    code = "not_found"


class Conflict(ShipyardError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ShipyardError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ShipyardError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(ShipyardError):
    status_code = 422
    code = "validation_error"


class TooManyRequests(ShipyardError):
    status_code = 429
    code = "rate_limited"


class UpstreamError(ShipyardError):
    status_code = 502
    code = "upstream_error"


class Unavailable(ShipyardError):
    status_code = 503
    code = "unavailable"
