"""What every UI route shares: templates, the signed-in session, CSRF, flashes and error pages.

Errors never leave the UI as JSON: :class:`UiRoute` turns a :class:`ShipyardError` (and a form
that fails validation, and anything unexpected) into a page that says what happened, with the
error's own status code. A request without a live session is sent to the sign-in form.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from fastapi import Depends, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.registry.core import approvals
from services.registry.core.registry import Registry
from services.registry.ui import formats
from services.registry.ui.sessions import COOKIE, COOKIE_PATH, UiSession, csrf_matches, resume_session
from shipyard_common.auth import Role, require
from shipyard_common.errors import Forbidden, ShipyardError, ValidationFailed
from shipyard_common.web import describe_validation_errors

log = logging.getLogger("shipyard.registry.ui")
M = TypeVar("M", bound=BaseModel)

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
FLASH_COOKIE = "shipyard_flash"
# Pages are ours alone: no inline script or style, no framing, no third-party anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _static_url(name: str) -> str:
    """``/ui/static/<name>?v=<digest>``: browsers may keep a file until it changes."""
    digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:10]
    return f"/ui/static/{name}?v={digest}"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, auto_reload=False,
)
templates.filters.update(formats.FILTERS)
templates.globals.update(Role=Role, direction=formats.direction, css_url=_static_url("ui.css"),
                         js_url=_static_url("ui.js"))


class NeedsLogin(Exception):
    """No live session: the browser is sent to the sign-in form."""


def registry_of(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` filled in with ``context``, the session's top bar and any pending flash."""
    flash = request.cookies.get(FLASH_COOKIE)
    page = templates.get_template(template).render(
        request=request, session=getattr(request.state, "ui_session", None),
        pending_count=getattr(request.state, "pending_count", None),
        flash=unquote(flash)[:500] if flash else None, **context,
    )
    response = HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path=COOKIE_PATH)
    return response


def redirect(url: str, flash: str | None = None) -> RedirectResponse:
    """A 303 to ``url`` (a GET after a POST), carrying a one-time message for the next page."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash), max_age=60, path=COOKIE_PATH, httponly=True,
                            samesite="strict")
    return response


def error_page(request: Request, status: int, message: str, details: Any = None) -> HTMLResponse:
    titles = {400: "That did not work", 401: "Please sign in", 403: "Not allowed", 404: "Not found",
              409: "That clashes with what is there now", 422: "Please check the form",
              502: "A service answered badly", 503: "A service is unavailable"}
    title = titles.get(status, "Something went wrong")
    return render(request, "error.html", status=status, title=title, status_code=status, message=message,
                  details=details, back=same_site_referer(request))


def same_site_referer(request: Request) -> str | None:
    """The page the user came from, if it is one of ours (a "Back" link never leaves the site)."""
    referer = urlsplit(request.headers.get("referer", ""))
    if referer.netloc != request.url.netloc or not referer.path.startswith("/ui/"):
        return None
    return referer.path + (f"?{referer.query}" if referer.query else "")


def login_redirect(request: Request) -> RedirectResponse:
    target = "/ui/login"
    if request.method == "GET" and request.url.path not in ("/ui/login", "/ui/logout"):
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target += "?next=" + quote(path, safe="")
    response = RedirectResponse(target, status_code=303)
    if COOKIE in request.cookies:
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


class UiRoute(APIRoute):
    """A route whose failures are pages: sign-in redirects, error pages with the error's status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except NeedsLogin:
                return login_redirect(request)
            except ShipyardError as exc:
                return error_page(request, exc.status_code, exc.message, exc.details)
            except RequestValidationError as exc:
                return error_page(request, 422, describe_validation_errors(list(exc.errors()))[0])
            except StarletteHTTPException as exc:
                return error_page(request, exc.status_code, str(exc.detail))
            except Exception:
                log.exception("UI page failed: %s %s", request.method, request.url.path)
                return error_page(request, 500, "The registry hit an unexpected error. It has been logged; "
                                  "try again, and tell your platform team if it keeps happening.")

        return handle


def ui_session(request: Request) -> UiSession:
    """The signed-in session (and the inbox count for the top bar); otherwise off to sign in."""
    registry = registry_of(request)
    found = resume_session(registry.database, request.app.state.authenticator, request.cookies.get(COOKIE))
    if found is None:
        raise NeedsLogin()
    request.state.ui_session = found
    request.state.pending_count = approvals.count_pending(registry=registry)
    return found


Signed = Annotated[UiSession, Depends(ui_session)]

CSRF_REFUSED = ("This form did not carry this session's security token, so nothing was changed. "
                "Reload the page and send the form again.")


def form_session(session: Signed, csrf: Annotated[str, Form(max_length=200)] = "") -> UiSession:
    """The session of a POSTed form whose hidden ``csrf`` field is the session's own (else 403)."""
    if not csrf_matches(session.csrf, csrf):
        raise Forbidden(CSRF_REFUSED)
    return session


Posted = Annotated[UiSession, Depends(form_session)]


def allowed(*roles: Role) -> Callable[[UiSession], UiSession]:
    """A dependency: a POSTed form's session whose role is one of ``roles`` (else 403), as REST checks."""

    def check(session: Posted) -> UiSession:
        require(session.principal, *roles)
        return session

    check.__name__ = "ui_" + "_or_".join(role.value for role in roles)
    return check


RequesterForm = Annotated[UiSession, Depends(allowed(Role.TRAINER, Role.APPROVER))]
ApproverForm = Annotated[UiSession, Depends(allowed(Role.APPROVER))]
AdminForm = Annotated[UiSession, Depends(allowed(Role.ADMIN))]


def parsed(schema: type[M], **values: Any) -> M:
    """``values`` checked by the REST API's own schema; a refusal reads as one sentence (422)."""
    try:
        return schema(**values)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_errors(list(exc.errors()))[0]) from exc
