"""Windows, drift and reports, as stored by the loop; every route needs the viewer role."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from services.monitor.windows import queries
from services.monitor.windows.quality import STATUSES
from services.monitor.windows.schemas import DriftPublic, DriftSummary, ReportPage, WindowPage
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.errors import InvalidInput
from shipyard_common.orm import MAX_BIGINT
from shipyard_common.paths import PlainName, plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model named in a path or a filter is one plain name, refused (400) before any lookup.
router = APIRouter(tags=["drift"], dependencies=[Depends(plain_names(model="model"))],
                   responses=error_responses(*AUTHED_ERRORS))
Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Before = Annotated[
    int | None, Query(ge=1, le=MAX_BIGINT, description="Only windows with a smaller id (the next page).")
]
Version = Annotated[str | None, Query(min_length=1, max_length=32, description="One version only.")]
WindowId = Annotated[int, Path(ge=1, le=MAX_BIGINT)]


# Plain defs: the database is blocking, so FastAPI runs them in its thread pool.
@router.get("/drift", response_model=list[DriftSummary])
def list_latest_drift(request: Request, _: Viewer) -> list[DriftSummary]:
    """Per model: the newest drift verdict, the newest window's status, the newest live metrics."""
    return queries.list_latest(monitor=request.app.state.monitor)


@router.get("/drift/{model}", response_model=DriftPublic, responses=error_responses(404))
def get_drift(request: Request, model: PlainName, _: Viewer, version: Version = None) -> DriftPublic:
    """The drift of the newest ``ok`` window of ``model`` (of ``version``, if given)."""
    return queries.get_drift(monitor=request.app.state.monitor, model=model, version=version)


@router.get("/windows/{model}", response_model=WindowPage, responses=error_responses(404))
def list_windows(
    request: Request, model: PlainName, _: Viewer, version: Version = None, status: str | None = None,
    before: Before = None, limit: Limit = 50,
) -> WindowPage:
    """The closed windows of ``model``, newest first."""
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    return queries.list_windows(monitor=request.app.state.monitor, model=model, version=version,
                                status=status, before=before, limit=limit)


@router.get("/reports/{model}", response_model=ReportPage, responses=error_responses(404))
def list_reports(
    request: Request, model: PlainName, _: Viewer, before: Before = None, limit: Limit = 50
) -> ReportPage:
    """The windows of ``model`` that have an Evidently report, newest first."""
    return queries.list_reports(monitor=request.app.state.monitor, model=model, before=before, limit=limit)


@router.get("/reports/{model}/{window_id}", response_class=HTMLResponse, responses={
    200: {"content": {"text/html": {"schema": {"type": "string"}},
                      "application/json": {"schema": {"type": "object"}}},
          "description": "The report as HTML, or (format=json) Evidently's snapshot."},
    **error_responses(404)})
def get_report(
    request: Request, model: PlainName, window_id: WindowId, _: Viewer,
    format: Annotated[str, Query(pattern="^(html|json)$", description="html, or the snapshot")] = "html",
) -> Response:
    """Evidently's report of one window, rendered from its stored snapshot."""
    body = queries.get_report(monitor=request.app.state.monitor, model=model, window_id=window_id,
                              html=format == "html")
    if format == "json":
        return Response(body, media_type="application/json")
    return HTMLResponse(body)
