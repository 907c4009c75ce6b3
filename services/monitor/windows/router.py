from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.monitor.windows import service
from services.monitor.windows.schemas import DriftPublic, DriftSummary
from services.monitor.settings import MAX_WINDOW
from shipyard_common.auth import Principal, Role, role_checker

router = APIRouter(tags=["drift"])


@router.get("/drift", response_model=list[DriftSummary])
def list_latest_drift(
    request: Request, _: Annotated[Principal, Depends(role_checker(Role.VIEWER))]
) -> list[DriftSummary]:
    """The newest verdict per model, as computed; nothing is computed for this request."""
    return service.list_latest(monitor=request.app.state.monitor)


# A plain def: Evidently and the database are blocking, so FastAPI runs this in its thread pool.
@router.get("/drift/{model}", response_model=DriftPublic)
def get_drift(
    request: Request,
    model: str,
    _: Annotated[Principal, Depends(role_checker(Role.VIEWER))],
    window: Annotated[
        int | None, Query(ge=1, le=MAX_WINDOW, description="How many of the newest logged rows to compare.")
    ] = None,
) -> DriftPublic:
    monitor: service.Monitor = request.app.state.monitor
    return service.get_drift(
        monitor=monitor, model=model, window=window or monitor.settings.default_window
    )
