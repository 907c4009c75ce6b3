"""Retraining over HTTP: policies (approver), triggers (read by anyone, started by hand by a trainer).

Routes are plain functions: the database and MLflow are blocking, so FastAPI runs them in its pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, status

from services.monitor.context import Monitor
from services.monitor.retraining import service
from services.monitor.retraining.schemas import (
    PolicyCreate,
    PolicyPublic,
    RetrainParameters,
    TriggerCreate,
    TriggerPage,
    TriggerPublic,
    TriggerState,
)
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.datasets import validate_name
from shipyard_common.orm import MAX_BIGINT
from shipyard_common.paths import PlainName, check_flow_parameters, plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model named in a path or a filter is one plain name, refused (400) before any lookup.
router = APIRouter(tags=["retraining"], dependencies=[Depends(plain_names(model="model"))],
                   responses=error_responses(*AUTHED_ERRORS))
# Setting a policy or starting a retraining reads MLflow (502, 503) and may clash with what runs (409).
CHANGE_ERRORS = error_responses(404, 409, 413, 502, 503)

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
# Who decides when the platform retrains by itself decides what may reach production: approvers.
Approver = Annotated[Principal, Depends(role_checker(Role.APPROVER))]
Trainer = Annotated[Principal, Depends(role_checker(Role.TRAINER))]
MAX_PAGE = 500
TriggerId = Annotated[int, Path(ge=1, le=MAX_BIGINT)]


def _monitor(request: Request) -> Monitor:
    return request.app.state.monitor  # type: ignore[no-any-return]


def _check_parameters(request: Request, parameters: RetrainParameters | None) -> None:
    """The retrain flow's parameters checked as the trainer will (names, ``csv_path`` a file in the
    platform's inputs folder), so that a bad one is refused now, not when a retraining starts."""
    if parameters is not None:
        state_dir = _monitor(request).settings.platform.state_dir
        check_flow_parameters(parameters.as_flow_parameters(), state_dir=state_dir)


@router.put("/policies/{model}", response_model=PolicyPublic, responses=CHANGE_ERRORS)
def put_policy(request: Request, model: PlainName, body: PolicyCreate, who: Approver) -> PolicyPublic:
    """Create or replace the model's policy (it must have a production version)."""
    _check_parameters(request, body.parameters)
    return service.put_policy(monitor=_monitor(request), model=model, body=body, by=who.name)


@router.get("/policies", response_model=list[PolicyPublic])
def list_policies(request: Request, _: Viewer) -> list[PolicyPublic]:
    return service.list_policies(monitor=_monitor(request))


@router.get("/policies/{model}", response_model=PolicyPublic, responses=error_responses(404))
def get_policy(request: Request, model: PlainName, _: Viewer) -> PolicyPublic:
    return service.get_policy(monitor=_monitor(request), model=model)


@router.delete("/policies/{model}", response_model=PolicyPublic, responses=error_responses(404))
def delete_policy(request: Request, model: PlainName, _: Approver) -> PolicyPublic:
    """Remove the policy (answered as it was); the triggers it fired stay, and a retraining under way
    is still followed."""
    return service.delete_policy(monitor=_monitor(request), model=model)


# A page_token this API did not give is a 404 (no such page), as the tests pin it.
@router.get("/triggers", response_model=TriggerPage, responses=error_responses(404))
def list_triggers(
    request: Request,
    _: Viewer,
    model: str | None = None,
    state: TriggerState | None = None,
    max_results: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    page_token: str | None = None,
) -> TriggerPage:
    """Triggers, newest first: each one's cause, reason, flow run, state and outcome."""
    return service.list_triggers(monitor=_monitor(request), model=model, state=state,
                                 max_results=max_results, page_token=page_token)


@router.get("/triggers/{trigger_id}", response_model=TriggerPublic, responses=error_responses(404))
def get_trigger(request: Request, trigger_id: TriggerId, _: Viewer) -> TriggerPublic:
    return service.get_trigger(monitor=_monitor(request), trigger_id=trigger_id)


@router.post("/triggers", response_model=TriggerPublic, status_code=status.HTTP_202_ACCEPTED,
             responses=CHANGE_ERRORS)
def trigger(request: Request, body: TriggerCreate, who: Trainer) -> TriggerPublic:
    """Retrain the production version now (cause ``manual``). 202 with the trigger: ``started`` with its
    flow run, or ``failed`` with why (the trainer down); 409 while a retraining of the model runs."""
    validate_name(body.model, kind="model")
    _check_parameters(request, body.parameters)
    return service.trigger_manually(monitor=_monitor(request), body=body, by=who.name)
