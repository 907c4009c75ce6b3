"""Our protocol: ``POST /v1/models/{name}/predict`` and the model status routes.

Thin: :func:`predict` (the handler the route and the fast lane share) decodes with the rows codec
(:mod:`services.serving.protocols.ours`) and hands the request to the data plane; the status is
:mod:`services.serving.api.status`.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response

from services.serving.api import status
from services.serving.api.http import ProtocolResponse, Respond, answered, handle, respond
from services.serving.api.schemas import ModelStatusPublic, PredictRequest, PredictResponse
from services.serving.core.dataplane import DataPlane, served_model
from services.serving.core.requests import Inference
from services.serving.protocols import ours
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.errors import ShipyardError
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model not served (404), or not loaded yet (503); the platform's error body.
router = APIRouter(prefix="/v1/models", tags=["serving"],
                   responses=error_responses(*AUTHED_ERRORS, 404, 503))

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]

_JSON = "application/json"


def _dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane  # type: ignore[no-any-return]


def predict(
    dataplane: DataPlane, *, name: str, inputs: Any, request_id: str | None, started: float, reply: Respond,
) -> None:
    """One predict request with the body's ``inputs``: its answer (or refusal) goes to ``reply``."""
    handle(
        dataplane, find=lambda: served_model(dataplane, name),
        decode=lambda served: (ours.decode(inputs, served.signature), _encode, request_id),
        refuse=error_response, started=started, reply=reply,
    )


def _encode(result: Inference) -> ProtocolResponse:
    return 200, orjson.dumps(ours.predict_body(result)), {"content-type": _JSON}


def error_response(exc: ShipyardError) -> ProtocolResponse:
    """The platform's error body, bad inputs as 422 (:func:`services.serving.protocols.ours.refusal`)."""
    refused = ours.refusal(exc)
    return refused.status_code, orjson.dumps(refused.to_body()), {"content-type": _JSON}


@router.post("/{name}/predict", response_model=PredictResponse, responses=error_responses(413, 415, 502))
async def predict_route(
    request: Request,
    name: str,
    body: PredictRequest,
    _: Viewer,
    x_request_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    return respond(await answered(functools.partial(
        predict, _dataplane(request), name=name, inputs=body.inputs, request_id=x_request_id,
        started=time.perf_counter())))


@router.get("", response_model=list[ModelStatusPublic])
def list_models(request: Request, _: Viewer) -> list[ModelStatusPublic]:
    return status.list_models(dataplane=_dataplane(request))


@router.get("/{name}", response_model=ModelStatusPublic)
def get_model(request: Request, name: str, _: Viewer) -> ModelStatusPublic:
    return status.get_model(dataplane=_dataplane(request), name=name)
