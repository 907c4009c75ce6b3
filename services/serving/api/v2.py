"""Open Inference Protocol v2 routes: thin; the codec is :mod:`services.serving.protocols.v2`.

Health routes (server live/ready, model ready) and the server's metadata (its name, version and
extensions) are open, like /healthz and as Triton serves them; model metadata and infer need a
token. Every error, auth included, is answered in the protocol's ``{"error": "..."}`` shape.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    INFER_ANSWER,
    V2_INFER_EXAMPLE,
    V2_INFER_REQUEST,
    LivePublic,
    ModelMetadataPublic,
    ModelReadyPublic,
    ProtocolErrorPublic,
    ReadyPublic,
    ServerMetadataPublic,
    json_body,
)
from services.serving.core.dataplane import (
    DataPlane,
    new_request_id,
    resolve,
    served_model,
)
from services.serving.core.loaded import ServedModel
from services.serving.core.requests import Inference, Input
from services.serving.protocols import v2
from shipyard_common.errors import BadRequest, ShipyardError
from shipyard_common.web import error_responses, http_error

# Every error in the protocol's {"error": "..."}: a model not served (404), none loaded yet (503), a
# request refused at the edge (400: Host, JSON too deep; 429: the rate limit).
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"],
                   responses=error_responses(400, 404, 429, 503, model=ProtocolErrorPublic))
TOKEN_ERRORS = error_responses(401, model=ProtocolErrorPublic)
INFER_BODY = json_body(V2_INFER_REQUEST, V2_INFER_EXAMPLE)
INFER_ERRORS = {**INFER_ANSWER, **error_responses(401, 413, 415, 422, 502, model=ProtocolErrorPublic)}


@router.get("", response_model=ServerMetadataPublic)
def server_metadata(request: Request) -> Response:
    return respond(v2.json_response(v2.server_metadata(request.app.version)))


@router.get("/health/live", response_model=LivePublic)
def live() -> Response:
    return respond(v2.json_response({"live": True}))


@router.get("/health/ready", response_model=ReadyPublic,
            responses={503: {"model": ReadyPublic, "description": "Not ready: models still loading."}})
def ready(request: Request) -> Response:
    plane = get_dataplane(request)
    is_ready = bool(request.app.state.ready) and plane.models.reconciled.is_set()
    return respond(v2.json_response({"ready": is_ready}, 200 if is_ready else 503))


def _about(
    request: Request, name: str, version: str | None, render: Callable[[ServedModel], dict[str, Any]], *,
    token: bool,
) -> Response:
    """What ``render`` says of the version that answers ``name`` (and ``version``), or the error.

    ``token``: whether the route needs one (metadata does; readiness is open, like /healthz).
    """
    try:
        if token:
            authorize(request)
        served = resolve(get_dataplane(request), name, version=version)
        return respond(v2.json_response(render(served)))
    except ShipyardError as exc:
        return respond(v2.error_response(exc))


@router.get("/models/{name}/ready", response_model=ModelReadyPublic)
def model_ready(request: Request, name: str) -> Response:
    return _about(request, name, None, v2.model_ready, token=False)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadyPublic)
def model_version_ready(request: Request, name: str, version: str) -> Response:
    return _about(request, name, version, v2.model_ready, token=False)


@router.get("/models/{name}", response_model=ModelMetadataPublic, responses=TOKEN_ERRORS)
def model_metadata(request: Request, name: str) -> Response:
    return _about(request, name, None, v2.model_metadata, token=True)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadataPublic,
            responses=TOKEN_ERRORS)
def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return _about(request, name, version, v2.model_metadata, token=True)


def infer(
    dataplane: DataPlane, *, name: str, version: str | None, body: bytes, header_length: str | None,
    request_id: str | None, started: float, reply: Respond, content_type: str | None = None,
) -> None:
    """One ``POST /v2/models/{name}[/versions/{version}]/infer``: its answer or refusal goes to ``reply``."""

    def find() -> ServedModel:
        check_media_type(content_type, binary=header_length is not None)
        return served_model(dataplane, name, version=version)

    def decode(served: ServedModel) -> tuple[dict[str, Input], Encode, str]:
        decoded = v2.decode_infer_request(body, header_length)
        requested = v2.requested_outputs(decoded, served.signature)
        answer_id = decoded.id or request_id or new_request_id()

        def encode(result: Inference) -> ProtocolResponse:
            return v2.encode_infer_response(result, requested, answer_id)

        return decoded.inputs, encode, answer_id

    handle(dataplane, find=find, decode=decode, refuse=v2.error_response, started=started, reply=reply)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    started = time.perf_counter()
    try:
        authorize(request)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise BadRequest("compressed request bodies are not accepted; send them uncompressed")
    except ShipyardError as exc:
        return respond(v2.error_response(exc))
    body = await request.body()
    return respond(await answered(functools.partial(
        infer, get_dataplane(request), name=name, version=version, body=body,
        header_length=request.headers.get(v2.HEADER_LENGTH), request_id=request.headers.get("x-request-id"),
        content_type=request.headers.get("content-type"), started=started)))


@router.post("/models/{name}/infer", responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_route(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def route_error(request: Request, exc: StarletteHTTPException) -> Response:
    """A path under /v2 that no route takes (404), or a method its route does not (405, with ``Allow``),
    answered in the protocol's ``{"error": "..."}`` (tritonclient prints only that shape); other
    paths get the platform's answer."""
    path = request.url.path
    if path != "/v2" and not path.startswith("/v2/"):
        return await http_error(request, exc)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        message = f"{path} does not take {request.method}; it takes {headers.get('Allow', 'other methods')}"
    elif exc.status_code == 404:
        message = f"no Open Inference Protocol route {request.method} {path}"
    else:
        message = str(exc.detail)
    status, content, answer_headers = v2.json_response({"error": message}, exc.status_code)
    return respond((status, content, {**answer_headers, **headers}))
