"""The registry's web UI at ``/ui``: sign-in and sign-out here, the pages and forms in their modules.

Mount it with ``app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), ...)`` first and then
``app.include_router(ui_router)``: the router ends with a catch-all that answers unknown ``/ui``
addresses with a page, which would otherwise hide the static files.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.registry.ui import actions, jobs, pages, promotions
from services.registry.ui.sessions import (
    COOKIE,
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    csrf_matches,
    end_session,
    new_csrf_token,
    open_session,
    resume_session,
)
from services.registry.ui.web import STATIC_DIR, Posted, UiRoute, redirect, registry_of, render
from shipyard_common.errors import NotFound, Unauthorized
from shipyard_common.paths import plain_names

__all__ = ["STATIC_DIR", "ui_router"]

auth_router = APIRouter(route_class=UiRoute)
Next = Annotated[str, Form(max_length=2000)]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a page of this UI only (never another site)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/models"


def login_form(request: Request, next_url: str, status: int = 200, error: str | None = None) -> HTMLResponse:
    """The sign-in page with a fresh double-submit token (cookie and hidden field)."""
    token = new_csrf_token()
    response = render(request, "login.html", status=status, title="Sign in", csrf=token,
                      next=safe_next(next_url), error=error)
    secure = registry_of(request).settings.secure_cookies
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=secure)
    return response


@auth_router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: Annotated[str, Query(max_length=2000)] = "/ui/models") -> Response:
    """The sign-in form; a browser that is signed in already goes straight on."""
    registry = registry_of(request)
    if resume_session(registry.database, request.app.state.authenticator, request.cookies.get(COOKIE)):
        return RedirectResponse(safe_next(next), status_code=303)
    return login_form(request, next)


@auth_router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: Annotated[str, Form(max_length=4096)] = "",
          csrf: Annotated[str, Form(max_length=200)] = "", next: Next = "/ui/models") -> Response:
    """Check the token; on success store a session and set its cookie, then go where the user was going."""
    if not csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf):
        return login_form(request, next, 403, "This sign-in form expired or did not come from this site. "
                          "Nothing was sent; please sign in again.")
    registry = registry_of(request)
    try:
        principal = request.app.state.authenticator.authenticate(f"Bearer {token.strip()}")
    except Unauthorized:
        return login_form(request, next, 401, "That token is not valid here. Check that you copied all of "
                          "it, or ask your platform admin for one.")
    key, _ = open_session(registry.database, principal, token.strip(), registry.settings.session_hours)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(COOKIE, key, max_age=int(registry.settings.session_hours * 3600), path=COOKIE_PATH,
                        httponly=True, samesite="strict", secure=registry.settings.secure_cookies)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)
    return response


@auth_router.post("/logout")
def logout(request: Request, _: Posted) -> RedirectResponse:
    """Delete the session row and the cookie."""
    end_session(registry_of(request).database, request.cookies.get(COOKIE))
    response = redirect("/ui/login", "You are signed out.")
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


@auth_router.get("", include_in_schema=False)
@auth_router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/models", status_code=303)


fallback_router = APIRouter(route_class=UiRoute)


@fallback_router.get("/{path:path}", include_in_schema=False)
def not_found(path: str) -> Response:
    raise NotFound(f"There is no page at /ui/{path}.")


# A model named in a page's address or filter is one plain name, refused (a 400 page) before any lookup.
ui_router = APIRouter(include_in_schema=False,
                      dependencies=[Depends(plain_names(name="model", model="model"))])
for part in (auth_router, pages.router, promotions.router, actions.router, jobs.router, fallback_router):
    ui_router.include_router(part, prefix="/ui")
