"""What the protocol routers share: auth in the protocol's error shape, bounded bodies, answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from services.serving.core.dataplane import VERSION_HEADER, DataPlane, count_error, submit
from services.serving.core.loaded import ServedModel
from services.serving.core.requests import Inference, InferenceRequest, Input, settle
from services.serving.core.validation import check_body_size
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import (
    InvalidInput,
    PayloadTooLarge,
    ShipyardError,
    UnsupportedMediaType,
    ValidationFailed,
)

log = logging.getLogger("shipyard.web")

ProtocolResponse = tuple[int, bytes, dict[str, str]]
#: Where a protocol handler sends its answer: the HTTP protocol's write, or a future's result.
Respond = Callable[[ProtocolResponse], None]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def failure(result: BaseException) -> ShipyardError:
    """A refusal as it is; anything else as the 500 every protocol answers, logged here once."""
    if isinstance(result, ShipyardError):
        if result.status_code >= 500:
            log.error("request failed: %s", result.message)  # as shipyard_common.web's handler
        return result
    log.error("unhandled error", exc_info=result)
    return ShipyardError(f"internal error: {type(result).__name__}")


#: How a protocol answers an inference, and how it refuses (in its own error shape).
Encode = Callable[[Inference], ProtocolResponse]
Refuse = Callable[[ShipyardError], ProtocolResponse]


def handle(
    dataplane: DataPlane, *, find: Callable[[], ServedModel],
    decode: Callable[[ServedModel], tuple[dict[str, Input], Encode, str | None]], refuse: Refuse,
    started: float, reply: Respond,
) -> None:
    """What every protocol's predict handler does: find the version, decode the body for it (a bad
    input counted once), submit it to the data plane, and send ``reply`` the encoded answer (with the
    version that answered in a header) or the refusal, each in the protocol's own shape.

    ``decode`` gives the inputs, the encoder of this request's answer, and its request id."""
    try:
        served = find()
        try:
            inputs, encode, request_id = decode(served)
        except (InvalidInput, ValidationFailed):
            count_error(dataplane, served.name, "invalid_input")
            raise
    except ShipyardError as exc:
        reply(refuse(exc))
        return

    def answer(result: Any) -> None:
        if type(result) is not Inference:
            reply(refuse(failure(result)))
            return
        status, content, headers = encode(result)
        headers[VERSION_HEADER] = result.version  # which version answered (a canary split)
        reply((status, content, headers))

    submit(dataplane, InferenceRequest(served=served, inputs=inputs, reply=answer, request_id=request_id,
                                       started=started))


async def answered(start: Callable[..., None]) -> ProtocolResponse:
    """What a protocol handler answers, for a caller that awaits: ``start(reply=...)`` on the loop."""
    future: asyncio.Future[ProtocolResponse] = asyncio.get_running_loop().create_future()
    start(reply=settle(future))
    return await future


#: Media types a JSON request body may be sent as: JSON's own, and what curl -d and plain-text clients send
#: (TF Serving's own examples post JSON with curl -d), besides none at all.
JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded", "text/plain"})
#: OIP v2's binary tensor data (with Inference-Header-Content-Length).
BINARY_MEDIA_TYPE = "application/octet-stream"


def check_media_type(content_type: str | None, *, binary: bool = False) -> None:
    """Refuse (415) a body declared as another format (XML, a form upload, an image...); ``binary``:
    OIP v2's binary tensor extension, which may also come as ``application/octet-stream``."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media in JSON_MEDIA_TYPES or media.endswith("+json") or (binary and media == BINARY_MEDIA_TYPE):
        return
    accepted = "application/json" + (" or application/octet-stream (binary tensors)" if binary else "")
    raise UnsupportedMediaType(f"Content-Type {media or content_type!r} is not accepted; send {accepted}")


def get_dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane  # type: ignore[no-any-return]


def authorize(request: Request) -> None:
    """Any valid token (role viewer); raises Unauthorized for the caller to shape."""
    authenticator: TokenAuthenticator = request.app.state.authenticator
    authenticator.authorize(
        request.headers.get("authorization"), request.headers.get("x-api-token"), Role.VIEWER
    )


def respond(answer: ProtocolResponse) -> Response:
    status, body, headers = answer
    media_type = headers.pop("content-type", None)
    return Response(content=body, status_code=status, headers=headers, media_type=media_type)


def _error_body(path: str, message: str) -> bytes:
    """A 413 in the shape of the protocol the path belongs to."""
    if path.startswith("/v2/") or ":" in path.rsplit("/", 1)[-1]:  # v2, TF Serving's ":predict"
        return orjson.dumps({"error": message})
    return orjson.dumps(PayloadTooLarge(message).to_body())


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before they are read into memory.

    A Content-Length over the limit is refused at once (the server holds the body to that
    length). A chunked body is read here up to the limit and replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length: int | None = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        try:
            check_body_size(length, self.limit)
        except PayloadTooLarge as exc:
            await self._refuse(scope, send, exc.message)
            return
        if length is not None:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            try:
                check_body_size(size, self.limit)
            except PayloadTooLarge as exc:
                await self._refuse(scope, send, exc.message.replace(f"is {size} bytes", "is larger"))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        body = _error_body(scope.get("path", ""), message)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
