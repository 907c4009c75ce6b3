"""Each protocol's predict: its codec around the one data-plane call (:func:`~..core.dataplane.infer`).

What the FastAPI routes and the fast lane (fastlane/) both run once they have the body and checked
the token; the framing is theirs, the answer is the same.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.serving.api.http import ProtocolResponse
from services.serving.core.dataplane import VERSION_HEADER, DataPlane, Inference, infer
from services.serving.protocols import ours as ours_codec
from services.serving.protocols import tfserving as tf_codec
from services.serving.protocols import v2 as v2_codec
from shipyard_common.errors import BadRequest, InvalidInput, ShipyardError


async def ours(
    dataplane: DataPlane, *, name: str, inputs: Any, request_id: str | None, started: float | None = None
) -> Inference:
    """``POST /v1/models/{name}/predict`` with the body's ``inputs``; raises its errors (422 for bad rows)."""
    request = ours_codec.inference_request(settings=dataplane.settings, name=name, inputs=inputs,
                                           request_id=request_id, started=started)
    try:
        return await infer(dataplane, request)
    except InvalidInput as exc:
        raise ours_codec.as_422(exc) from exc


def ours_response(inference: Inference) -> ProtocolResponse:
    return 200, orjson.dumps(ours_codec.predict_body(inference)), {
        "content-type": "application/json", VERSION_HEADER: inference.version}


async def v2(
    dataplane: DataPlane, *, name: str, version: str | None, body: bytes, headers: dict[str, str],
    started: float | None = None,
) -> ProtocolResponse:
    """``POST /v2/models/{name}[/versions/{version}]/infer``: the answer or the error, in v2's shape."""
    try:
        if headers.get("content-encoding", "identity") != "identity":
            raise BadRequest("compressed request bodies are not accepted; send them uncompressed")
        request, requested = v2_codec.inference_request(name=name, version=version, body=body,
                                                        headers=headers, started=started)
        return v2_codec.infer_response(await infer(dataplane, request), requested)
    except ShipyardError as exc:
        return v2_codec.error_response(exc)


async def tfserving(
    dataplane: DataPlane, *, name: str, version: str | None, label: str | None, body: bytes,
    request_id: str | None, started: float | None = None,
) -> ProtocolResponse:
    """``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict``: the answer or the error (TF's shape)."""
    try:
        request, row_format = tf_codec.inference_request(name=name, version=version, label=label, body=body,
                                                         request_id=request_id, started=started)
        return tf_codec.predict_response(await infer(dataplane, request), row_format)
    except ShipyardError as exc:
        return tf_codec.error_response(exc)
