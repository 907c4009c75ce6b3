"""Pipeline runs over HTTP: start one of Shipyard's deployed flows, read a run's state.

Starting a run only creates it on the platform's Prefect server (one awaited API call) and answers
202 with its id: the deployments process (``python -m pipelines.serve``) runs it, so the request
never waits for the flow. The flows and their Prefect plumbing live in ``pipelines/``; they are
imported when a route is first called, so the job API starts without Prefect's import cost.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, Field

from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.errors import InvalidInput, NotFound, ShipyardError, Unavailable
from shipyard_common.paths import PlainName, check_flow_parameters, plain_names
from shipyard_common.settings import PlatformSettings
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A pipeline named in a path is one plain name, refused (400) before any lookup.
router = APIRouter(prefix="/pipelines", tags=["pipelines"],
                   dependencies=[Depends(plain_names(name="pipeline"))],
                   responses=error_responses(*AUTHED_ERRORS, 404, 503))

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Trainer = Annotated[Principal, Depends(role_checker(Role.TRAINER))]
# Creating a run is one call to the Prefect server: never hold a request longer than this for it.
START_TIMEOUT_S = 10.0


class PipelineRunCreate(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict, description="The flow's parameters.")


class PipelineRunPublic(BaseModel):
    id: str
    pipeline: str | None = Field(default=None, description="The pipeline started (in the answer to a start).")
    state: str | None = None
    state_type: str | None = Field(
        default=None,
        description="Prefect's kind of state: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED, "
                    "CANCELLING, CANCELLED, PAUSED.",
    )
    final: bool = Field(default=False, description="Whether the run has ended (its state will not change).")
    message: str | None = Field(
        default=None, description="A run that failed, crashed or was cancelled: which task failed and why."
    )
    result: dict[str, Any] | None = Field(
        default=None,
        description="For a completed run: what its flow returned (retrain: job_id, model_version, request…).",
    )
    ui_url: str


def _platform(request: Request) -> PlatformSettings:
    return request.app.state.settings.platform  # type: ignore[no-any-return]


@router.post("/{name}/runs", response_model=PipelineRunPublic, status_code=status.HTTP_202_ACCEPTED)
async def start_run(
    request: Request, name: PlainName, body: PipelineRunCreate, _: Trainer
) -> PipelineRunPublic:
    """Start pipeline ``name`` (ingest, train_and_deploy, retrain, batch_predict) with ``parameters``;
    its run id at once."""
    from pipelines import PIPELINES
    from pipelines.runs import astart_pipeline, ui_url

    if name not in PIPELINES:
        raise NotFound(f"no pipeline {name!r}; the pipelines are {', '.join(PIPELINES)}")
    platform = _platform(request)
    # Names, the file to ingest and no config of the caller's: the flow runs as the platform.
    parameters = check_flow_parameters(body.parameters, state_dir=platform.state_dir)
    try:
        run_id = await asyncio.wait_for(astart_pipeline(name, parameters, platform), START_TIMEOUT_S)
    except ShipyardError:
        raise
    except Exception as exc:
        raise _prefect_error(exc, name) from exc
    return PipelineRunPublic(id=run_id, pipeline=name, state="Scheduled", ui_url=ui_url(platform, run_id))


@router.get("/runs/{run_id}", response_model=PipelineRunPublic)
def get_run(request: Request, run_id: str, _: Viewer) -> PipelineRunPublic:
    """A run's state; for a failed one, which task failed and why; for a completed one, its result."""
    from uuid import UUID

    from pipelines.runs import failure_message, read_result, read_run, ui_url

    try:
        UUID(run_id)
    except ValueError:
        raise NotFound(f"there is no pipeline run {run_id!r}: run ids are UUIDs") from None
    platform = _platform(request)
    try:
        run = read_run(run_id, platform)
        state = run.state
        final, completed = state is not None and state.is_final(), state is not None and state.is_completed()
        # Failed, crashed or cancelled: which task failed and why, or the run's own message.
        message = failure_message(run_id, platform) if final and not completed else None
        result = read_result(run_id, platform) if completed else None
    except Exception as exc:
        raise _prefect_error(exc, run_id) from exc
    return PipelineRunPublic(
        id=run_id, state=run.state_name, state_type=state.type.value if state else None,
        final=final, message=message or None, result=result,
        ui_url=ui_url(platform, run_id),
    )


def _prefect_error(exc: Exception, what: str) -> ShipyardError:
    """Prefect's answer as the platform's error: its 4xx are the caller's, the rest unavailability."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    # Prefect's client raises ObjectNotFound for its API's 404 (no deployment, no run): not a
    # server that cannot be reached. By name, so that this module never imports Prefect.
    if code == 404 or type(exc).__name__ == "ObjectNotFound":
        return NotFound(f"{what} is not known to the Prefect server (is the deployments process up?)")
    if code in (409, 422):
        detail = response.text[:500] if response is not None else str(exc)
        return InvalidInput(f"the Prefect server refused the run's parameters: {detail}")
    if isinstance(exc, TimeoutError):
        return Unavailable(f"the Prefect server did not answer within {START_TIMEOUT_S:g}s")
    return Unavailable(f"the Prefect server cannot be reached: {type(exc).__name__}: {exc}")
