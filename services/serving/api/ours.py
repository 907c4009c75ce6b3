"""Our protocol's routes: ``POST /v1/models/{name}/predict`` and the model status routes.

Thin: the rows codec is :mod:`services.serving.protocols.ours`, the status :mod:`services.serving.api.status`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from services.serving.api import status
from services.serving.api.schemas import ModelStatusPublic, PredictRequest, PredictResponse
from services.serving.core.dataplane import VERSION_HEADER, DataPlane
from services.serving.protocols.ours import predict_body, predict_inference
from shipyard_common.auth import Principal, Role, role_checker

router = APIRouter(prefix="/v1/models", tags=["serving"])

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]


def _dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane  # type: ignore[no-any-return]


# Plain defs: ONNX Runtime releases the GIL while it runs, and the prediction log may block when
# full, so these belong in the thread pool rather than on the event loop.
@router.post("/{name}/predict", response_model=PredictResponse)
def predict(
    request: Request,
    response: Response,
    name: str,
    body: PredictRequest,
    _: Viewer,
    x_request_id: Annotated[str | None, Header(max_length=64)] = None,
) -> PredictResponse:
    inference = predict_inference(
        dataplane=_dataplane(request), name=name, inputs=body.inputs, request_id=x_request_id
    )
    response.headers[VERSION_HEADER] = inference.version
    return PredictResponse(**predict_body(inference))


@router.get("", response_model=list[ModelStatusPublic])
def list_models(request: Request, _: Viewer) -> list[ModelStatusPublic]:
    return status.list_models(dataplane=_dataplane(request))


@router.get("/{name}", response_model=ModelStatusPublic)
def get_model(request: Request, name: str, _: Viewer) -> ModelStatusPublic:
    return status.get_model(dataplane=_dataplane(request), name=name)
