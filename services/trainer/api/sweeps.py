"""The sweeps' routes: submit, read, list, cancel, and the objective over trials as SVG."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status

from services.trainer.api.jobs import DatabaseDep, Trainer, Viewer, get_data_repo, pin_dataset
from services.trainer.sweeps import service
from services.trainer.sweeps.driver import Driving
from services.trainer.sweeps.schemas import SweepCreate, SweepPublic, SweepState
from shipyard_common.datasets import DataRepo
from shipyard_common.web import AUTHED_ERRORS, error_responses

router = APIRouter(tags=["sweeps"], responses=error_responses(*AUTHED_ERRORS))


def get_driving(request: Request) -> Driving:
    state = request.app.state
    platform = state.settings.platform
    return Driving(database=state.database, database_url=platform.database_url,
                   tracking_uri=platform.mlflow_tracking_uri, enqueue=state.enqueue)


DrivingDep = Annotated[Driving, Depends(get_driving)]


# Plain defs: the database, Optuna and the broker block, so FastAPI runs these in its thread pool.
@router.post("/sweeps", status_code=status.HTTP_201_CREATED, response_model=SweepPublic,
             responses=error_responses(413))
def create_sweep(
    spec: SweepCreate,
    driving: DrivingDep,
    data_repo: Annotated[DataRepo, Depends(get_data_repo)],
    _: Trainer,
) -> SweepPublic:
    """Start a sweep: its first ``parallelism`` trials are queued as jobs at once (422 for a space a
    trial could not run, naming the field)."""
    pinned = spec.model_copy(update={"base": pin_dataset(data_repo, spec.base)})
    return service.create_sweep(driving=driving, spec=pinned)


@router.get("/sweeps", response_model=list[SweepPublic])
def list_sweeps(
    database: DatabaseDep,
    _: Viewer,
    state: SweepState | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> list[SweepPublic]:
    return service.list_sweeps(database=database, state=state, limit=limit)


@router.get("/sweeps/{sweep_id}", response_model=SweepPublic, responses=error_responses(404))
def get_sweep(sweep_id: str, database: DatabaseDep, _: Viewer) -> SweepPublic:
    """The sweep's trials (number, values, state, objective, job, run) and the best so far."""
    return service.get_sweep(database=database, sweep_id=sweep_id)


@router.get("/sweeps/{sweep_id}/plot.svg", response_class=Response, responses={
    200: {"content": {"image/svg+xml": {}}, "description": "The objective over trials."},
    **error_responses(404)})
def sweep_plot(sweep_id: str, database: DatabaseDep, _: Viewer) -> Response:
    return Response(service.plot_svg(database=database, sweep_id=sweep_id), media_type="image/svg+xml")


@router.post("/sweeps/{sweep_id}/cancel", response_model=SweepPublic, responses=error_responses(404, 409))
def cancel_sweep(sweep_id: str, driving: DrivingDep, _: Trainer) -> SweepPublic:
    """Cancel a running sweep and its queued or running trials (409 once it has ended)."""
    return service.cancel_sweep(driving=driving, sweep_id=sweep_id)
