"""Training jobs in the UI: read from the trainer's API with the signed-in user's own token.

The trainer is another service: it is asked over HTTP with a short timeout, and a trainer that is
down or refuses gives a page that says so instead of an error. The job page follows its log by
polling :func:`job_logs`, which passes ``GET /jobs/{id}/logs?after=N`` through.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from services.registry.ui.sessions import UiSession
from services.registry.ui.web import Signed, UiRoute, registry_of, render
from shipyard_common.errors import NotFound, ShipyardError, Unavailable, UpstreamError
from shipyard_common.orm import MAX_BIGINT

router = APIRouter(route_class=UiRoute)

TERMINAL = ("succeeded", "failed", "cancelled")
LOG_PAGE = 1000
# Never hold a page longer than this on a trainer that does not answer.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 2.0, 5.0


def trainer_get(request: Request, session: UiSession, path: str, params: dict[str, Any] | None = None) -> Any:
    """The trainer's JSON answer to ``GET path``; its failures as the platform's errors."""
    registry = registry_of(request)
    base = registry.settings.platform.trainer_url.rstrip("/")
    timeout = min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, registry.settings.peer_timeout_s))
    try:
        response = httpx.get(f"{base}{path}", params=params, timeout=timeout,
                             headers={"Authorization": session.authorization})
    except httpx.HTTPError as exc:
        raise Unavailable(f"The trainer at {base} does not answer ({type(exc).__name__}), so jobs cannot be "
                          "shown right now. Models, versions and promotions do not need it.") from exc
    if response.status_code == 404:
        raise NotFound(_message(response) or "the trainer knows no such job")
    if response.status_code >= 400:
        raise UpstreamError(f"The trainer refused the request ({response.status_code}): "
                            f"{_message(response) or response.reason_phrase}")
    return response.json()


def _message(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return None


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: Signed,
              model: Annotated[str | None, Query(max_length=256)] = None) -> HTMLResponse:
    """The latest jobs with their state and progress; a readable message when the trainer is down."""
    params: dict[str, Any] = {"limit": 100}
    if model:
        params["model_name"] = model
    try:
        jobs, problem, status = trainer_get(request, session, "/jobs", params), None, 200
    except ShipyardError as exc:
        jobs, problem, status = [], exc.message, exc.status_code
    return render(request, "jobs.html", status=status, title="Training jobs", jobs=jobs, problem=problem,
                  model=model or "", terminal=TERMINAL)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, session: Signed) -> HTMLResponse:
    """One job: spec, state, progress and its log so far; the page's script follows the rest."""
    path = f"/jobs/{quote(job_id, safe='')}"
    job = trainer_get(request, session, path)
    logs = trainer_get(request, session, f"{path}/logs", {"after": 0, "limit": LOG_PAGE})
    return render(request, "job.html", title=f"Job {job_id[:8]}", job=job, lines=logs["lines"],
                  next_after=logs["next_after"], terminal=TERMINAL)


@router.get("/jobs/{job_id}/logs")
def job_logs(request: Request, job_id: str, session: Signed,
             after: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0) -> JSONResponse:
    """The job's log lines after ``after`` for the page's script: ``{state, lines, next_after}``."""
    try:
        logs = trainer_get(request, session, f"/jobs/{quote(job_id, safe='')}/logs",
                           {"after": after, "limit": LOG_PAGE})
    except ShipyardError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)
    return JSONResponse({"state": logs["state"], "lines": logs["lines"], "next_after": logs["next_after"]},
                        headers={"Cache-Control": "no-store"})
