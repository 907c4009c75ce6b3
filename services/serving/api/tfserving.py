"""TF Serving's REST routes: thin; the codec is :mod:`services.serving.protocols.tfserving`.

``GET /v1/models/{name}`` is our status route (router.py), which carries TF Serving's
``model_version_status`` too; ``.../metadata`` is TF Serving's GetModelMetadata; ``:classify``
answers a classifier (a version with class labels and feature names) and refuses others with 400, as
``:regress`` always does, as TF Serving does for a model whose signature is a predict one. All routes
need a token; errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.serving.api.http import (
    Encode,
    ProtocolResponse,
    Respond,
    answered,
    authorize,
    check_media_type,
    get_dataplane,
    handle,
    respond,
)
from services.serving.api.schemas import (
    TF_CLASSIFY_EXAMPLE,
    TF_CLASSIFY_REQUEST,
    TF_PREDICT_EXAMPLE,
    TF_PREDICT_REQUEST,
    ProtocolErrorPublic,
    TfClassifyPublic,
    TfMetadataPublic,
    TfModelStatusPublic,
    TfPredictPublic,
    json_body,
)
from services.serving.core.dataplane import DataPlane, served_model
from services.serving.core.loaded import ServedModel
from services.serving.core.requests import Inference, Input
from services.serving.protocols import tfserving
from shipyard_common.errors import ShipyardError
from shipyard_common.web import error_responses

# Every error in TF's {"error": "..."}: a bad request or a method the model has no signature for (400), no
# token (401), a model or version not served (404), the rate limit (429), nothing loaded yet (503).
router = APIRouter(prefix="/v1/models", tags=["TF Serving REST"],
                   responses=error_responses(400, 401, 404, 429, 503, model=ProtocolErrorPublic))
PREDICT_ERRORS = error_responses(413, 415, 422, 502, model=ProtocolErrorPublic)
PREDICT_BODY = json_body(TF_PREDICT_REQUEST, TF_PREDICT_EXAMPLE)
CLASSIFY_BODY = json_body(TF_CLASSIFY_REQUEST, TF_CLASSIFY_EXAMPLE)


def predict(
    dataplane: DataPlane, *, name: str, version: str | None, label: str | None, body: bytes,
    request_id: str | None, started: float, reply: Respond, content_type: str | None = None,
    classify: bool = False,
) -> None:
    """One ``:predict`` (or ``classify``: ``:classify``) request: its answer (or refusal, in TF's shape)
    goes to ``reply``."""

    def find() -> ServedModel:
        check_media_type(content_type)
        return served_model(dataplane, name, version=version, label=label)

    def decode(served: ServedModel) -> tuple[dict[str, Input], Encode, str | None]:
        if classify:
            return (tfserving.decode_classify(body, served.signature, name=name, version=served.version,
                                              text=served.text), _encode_classify, request_id)
        inputs, row_format = tfserving.decode_predict(body, served.signature)

        def encode(result: Inference) -> ProtocolResponse:
            return tfserving.json_response(tfserving.encode_predict(result, row_format))

        return inputs, encode, request_id

    handle(dataplane, find=find, decode=decode, refuse=tfserving.error_response, started=started, reply=reply)


def _encode_classify(result: Inference) -> ProtocolResponse:
    return tfserving.json_response(tfserving.encode_classify(result))


async def _predict(
    request: Request, name: str, version: str | None, label: str | None, *, classify: bool = False
) -> Response:
    started = time.perf_counter()
    try:
        authorize(request)
    except ShipyardError as exc:
        return respond(tfserving.error_response(exc))
    body = await request.body()
    return respond(await answered(functools.partial(
        predict, get_dataplane(request), name=name, version=version, label=label, body=body,
        request_id=request.headers.get("x-request-id"), content_type=request.headers.get("content-type"),
        started=started, classify=classify)))


@router.post("/{name}:predict", response_model=TfPredictPublic, responses=PREDICT_ERRORS,
             openapi_extra=PREDICT_BODY)
async def tfserving_predict(request: Request, name: str) -> Response:
    return await _predict(request, name, None, None)


@router.post("/{name}/versions/{version}:predict", response_model=TfPredictPublic, responses=PREDICT_ERRORS,
             openapi_extra=PREDICT_BODY)
async def tfserving_predict_version(request: Request, name: str, version: str) -> Response:
    return await _predict(request, name, version, None)


@router.post("/{name}/labels/{label}:predict", response_model=TfPredictPublic, responses=PREDICT_ERRORS,
             openapi_extra=PREDICT_BODY)
async def tfserving_predict_label(request: Request, name: str, label: str) -> Response:
    return await _predict(request, name, None, label)


def _answer(request: Request, answer: Callable[[DataPlane], ProtocolResponse]) -> Response:
    """``answer``'s response once the token is checked (refused: in TF's error shape)."""
    try:
        authorize(request)
    except ShipyardError as exc:
        return respond(tfserving.error_response(exc))
    return respond(answer(get_dataplane(request)))


@router.get("/{name}/versions/{version}", response_model=TfModelStatusPublic)
def tfserving_version_status(request: Request, name: str, version: str) -> Response:
    return _answer(request, lambda plane: tfserving.model_status(dataplane=plane, name=name, version=version))


@router.get("/{name}/labels/{label}", response_model=TfModelStatusPublic)
def tfserving_label_status(request: Request, name: str, label: str) -> Response:
    return _answer(request, lambda plane: tfserving.model_status(dataplane=plane, name=name, label=label))


@router.get("/{name}/metadata", response_model=TfMetadataPublic)
def tfserving_metadata(request: Request, name: str) -> Response:
    return _answer(request, lambda plane: tfserving.model_metadata(dataplane=plane, name=name))


@router.get("/{name}/versions/{version}/metadata", response_model=TfMetadataPublic)
def tfserving_version_metadata(request: Request, name: str, version: str) -> Response:
    return _answer(request, lambda plane: tfserving.model_metadata(
        dataplane=plane, name=name, version=version))


@router.get("/{name}/labels/{label}/metadata", response_model=TfMetadataPublic)
def tfserving_label_metadata(request: Request, name: str, label: str) -> Response:
    return _answer(request, lambda plane: tfserving.model_metadata(dataplane=plane, name=name, label=label))


@router.post("/{name}:classify", response_model=TfClassifyPublic, responses=PREDICT_ERRORS,
             openapi_extra=CLASSIFY_BODY)
async def tfserving_classify(request: Request, name: str) -> Response:
    return await _predict(request, name, None, None, classify=True)


@router.post("/{name}/versions/{version}:classify", response_model=TfClassifyPublic, responses=PREDICT_ERRORS,
             openapi_extra=CLASSIFY_BODY)
async def tfserving_classify_version(request: Request, name: str, version: str) -> Response:
    return await _predict(request, name, version, None, classify=True)


@router.post("/{name}/labels/{label}:classify", response_model=TfClassifyPublic, responses=PREDICT_ERRORS,
             openapi_extra=CLASSIFY_BODY)
async def tfserving_classify_label(request: Request, name: str, label: str) -> Response:
    return await _predict(request, name, None, label, classify=True)


@router.post("/{name}:regress")
def tfserving_regress(request: Request, name: str) -> Response:
    return _unsupported(request, name)


@router.post("/{name}/versions/{version}:regress")
def tfserving_version_regress(request: Request, name: str, version: str) -> Response:
    return _unsupported(request, name, version=version)


@router.post("/{name}/labels/{label}:regress")
def tfserving_label_regress(request: Request, name: str, label: str) -> Response:
    return _unsupported(request, name, label=label)


def _unsupported(
    request: Request, name: str, *, version: str | None = None, label: str | None = None
) -> Response:
    """``:regress``: refused in TF's shape."""
    return _answer(request, lambda plane: tfserving.unsupported_method(
        dataplane=plane, name=name, method="regress", version=version, label=label))
