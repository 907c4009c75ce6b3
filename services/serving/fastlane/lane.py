"""The prediction hot path: a plain ASGI layer that answers predict POSTs without the framework.

Installed outermost, in front of the whole middleware stack of the FastAPI app (each layer of
that stack costs a coroutine call per request and per message sent, a quarter of a small model's
request in a profile), it answers

* ours: ``POST /v1/models/{name}/predict``
* Open Inference Protocol v2: ``POST /v2/models/{name}[/versions/{version}]/infer``
* TF Serving REST: ``POST /v1/models/{name}[/versions/{version}|/labels/{label}]:predict``

and passes every other request to the app, whose routes for these paths stay (OpenAPI docs,
``SHIPYARD_SERVING_FAST_LANE=false``, and the rare requests handed back, below). So that nothing
is skipped, it counts the requests it answers in the app's request metrics itself, and passes a
body without a ``Content-Length``, or over the size limit, to the app's body limit (which reads
chunked bodies and answers the 413s).

It reads the body, checks the token with the app's
:class:`~shipyard_common.auth.TokenAuthenticator` (any valid token may predict), and runs the same
per-protocol calls as the routes (:mod:`services.serving.api.predict`): the codecs and the one
data-plane call (version, validation, canary and shadow, the batcher, the prediction log,
metrics) are theirs, not a second copy. Status codes, headers and error bodies are the routes'
(tests/services/serving/test_fastlane.py sends every case to both and compares).

Handed back to FastAPI (after replaying the body): our protocol's bodies that its request model
refuses (not a JSON object with ``inputs``, a content type other than ``application/json``,
an ``X-Request-ID`` over 64 characters), so that those 422s keep FastAPI's exact shape.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, NamedTuple

import orjson

from services.serving.api import predict
from services.serving.api.http import ASGIApp, Message, ProtocolResponse, Receive, Scope, Send
from services.serving.core.dataplane import DataPlane
from services.serving.protocols import loads, tfserving, v2
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import InvalidInput, ShipyardError
from shipyard_common.metrics import HttpMetrics

log = logging.getLogger("shipyard.web")

_REQUEST_ID_MAX = 64  # our route's X-Request-ID limit (a longer one is FastAPI's 422)

_JSON = b"application/json"


class _Route:
    """A route template, as the request metrics label it."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


# (pattern, protocol, template), in the routers' order: TF Serving's ":predict" first.
_ROUTES: list[tuple[re.Pattern[str], str, _Route]] = [
    (re.compile(r"/v1/models/(?P<name>[^/]+):predict"), "tf", _Route("/v1/models/{name}:predict")),
    (re.compile(r"/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+):predict"), "tf",
     _Route("/v1/models/{name}/versions/{version}:predict")),
    (re.compile(r"/v1/models/(?P<name>[^/]+)/labels/(?P<label>[^/]+):predict"), "tf",
     _Route("/v1/models/{name}/labels/{label}:predict")),
    (re.compile(r"/v1/models/(?P<name>[^/]+)/predict"), "ours", _Route("/v1/models/{name}/predict")),
    (re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), "v2", _Route("/v2/models/{name}/infer")),
    (re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"), "v2",
     _Route("/v2/models/{name}/versions/{version}/infer")),
]
_OURS_ROUTE = _ROUTES[3][2]
_OURS_PREFIX, _OURS_SUFFIX = len("/v1/models/"), -len("/predict")


class HandBack(Exception):
    """Let FastAPI answer this request (its body is replayed)."""


class FastLane:
    """See the module docstring. ``state`` is the app's ``state``: dataplane, authenticator, metrics."""

    def __init__(self, app: ASGIApp, *, state: Any, body_limit: int) -> None:
        self.app = app
        self.state = state
        self.body_limit = body_limit
        self._plane: DataPlane | None = None
        self._authenticator: TokenAuthenticator | None = None
        self._http_metrics: HttpMetrics | None = None
        #: Requests this layer answered (the others went to the app).
        self.answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = self.match(scope)
        if request is None:
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            answer = await self.answer(request, body)
        except HandBack:
            await self.app(scope, _replay(body, receive), send)  # counted by the app's request metrics
            return
        except Exception as exc:
            answer = internal_error(exc)
        status, content, raw = _encode(answer)
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
        finally:
            self.answered += 1
            self.count(request, status)

    def match(self, scope: Scope) -> LaneRequest | None:
        """The request, if the fast lane answers it: a predict POST with a body of known, allowed size."""
        if scope["method"] != "POST" or scope.get("root_path"):
            return None
        found = _route(scope["path"])
        if found is None:
            return None
        # Reversed, so that the first of repeated headers wins, as in Starlette's Headers.get.
        headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) > self.body_limit:
            # Chunked or too large: the app's body limit reads or refuses it (its 413s), unchanged.
            return None
        protocol, route, params = found
        return LaneRequest(protocol, route, params, headers, time.perf_counter())

    async def answer(self, request: LaneRequest, body: bytes) -> ProtocolResponse:
        """The protocol's answer (or error); raises :class:`HandBack` for requests FastAPI must answer."""
        params = request.params
        if request.protocol == "ours":
            return await self._ours(params["name"], body, request.headers, request.started)
        if request.protocol == "v2":
            try:
                self._authorize(request.headers)
            except ShipyardError as exc:
                return v2.error_response(exc)
            return await predict.v2(self.plane, name=params["name"], version=params.get("version"),
                                    body=body, headers=_text(request.headers), started=request.started)
        try:
            self._authorize(request.headers)
        except ShipyardError as exc:
            return tfserving.error_response(exc)
        raw_id = request.headers.get(b"x-request-id")
        return await predict.tfserving(
            self.plane, name=params["name"], version=params.get("version"), label=params.get("label"),
            body=body, request_id=None if raw_id is None else raw_id.decode("latin-1"),
            started=request.started)

    async def _ours(
        self, name: str, body: bytes, headers: dict[bytes, bytes], started: float
    ) -> ProtocolResponse:
        # In FastAPI's order: a JSON body is parsed first (invalid: its 422), then the token is
        # checked, then the body's model and the headers (refused: its 422).
        if headers.get(b"content-type") != _JSON:  # FastAPI reads a body without one as bytes, not JSON
            raise HandBack
        try:
            parsed = loads(body)
        except InvalidInput:
            raise HandBack from None
        try:
            self._authorize(headers)
        except ShipyardError as exc:
            return _error(exc)
        raw_id = headers.get(b"x-request-id")
        if type(parsed) is not dict or "inputs" not in parsed or (
            raw_id is not None and len(raw_id) > _REQUEST_ID_MAX
        ):
            raise HandBack
        try:
            inference = await predict.ours(self.plane, name=name, inputs=parsed["inputs"], started=started,
                                           request_id=None if raw_id is None else raw_id.decode("latin-1"))
        except ShipyardError as exc:
            return _error(exc)
        return predict.ours_response(inference)

    # -- the app's parts, looked up once (they are set after the middleware is declared) --------
    @property
    def plane(self) -> DataPlane:
        if self._plane is None:
            self._plane = self.state.dataplane
        return self._plane

    def _authorize(self, headers: dict[bytes, bytes]) -> None:
        if self._authenticator is None:
            self._authenticator = self.state.authenticator
        authorization = headers.get(b"authorization")
        if authorization is not None and self._authenticator.accepts_bearer(authorization):
            return  # any valid token may predict; anything else gets the full check and its message
        api_token = headers.get(b"x-api-token")
        self._authenticator.authorize(
            None if authorization is None else authorization.decode("latin-1"),
            None if api_token is None else api_token.decode("latin-1"),
            Role.VIEWER,
        )

    def count(self, request: LaneRequest, status: int) -> None:
        """The request in the app's request metrics, as the app would have counted it."""
        if self._http_metrics is None:
            self._http_metrics = self.state.http_metrics
        self._http_metrics.observe("POST", request.route.path, status, time.perf_counter() - request.started)


def _route(path: str) -> tuple[str, _Route, dict[str, str]] | None:
    """(protocol, route template, path parameters) of a predict path; None for any other path."""
    if path.startswith("/v1/models/") and path.endswith("/predict"):
        name = path[_OURS_PREFIX:_OURS_SUFFIX]  # ours, the commonest: no pattern to try
        if name and "/" not in name and ":" not in name:
            return "ours", _OURS_ROUTE, {"name": name}
    if not path.startswith(("/v1/models/", "/v2/models/")):
        return None
    for pattern, protocol, route in _ROUTES:
        match = pattern.fullmatch(path)
        if match is not None:
            return protocol, route, match.groupdict()
    return None


def _text(headers: dict[bytes, bytes]) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in headers.items()}


def _encode(answer: ProtocolResponse) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    status, content, answer_headers = answer
    raw = [(b"content-length", str(len(content)).encode()),
           (b"content-type", answer_headers.pop("content-type", "application/json").encode())]
    for key, value in answer_headers.items():
        raw.append((key.lower().encode(), value.encode("latin-1")))
    return status, content, raw


class LaneRequest(NamedTuple):
    """A predict request the fast lane takes, as far as its headers tell."""

    protocol: str
    route: _Route
    params: dict[str, str]
    headers: dict[bytes, bytes]
    started: float


def _error(exc: ShipyardError) -> ProtocolResponse:
    if exc.status_code >= 500:
        log.error("request failed: %s", exc.message)  # as shipyard_common.web's handler
    return exc.status_code, orjson.dumps(exc.to_body()), {"content-type": "application/json"}


def internal_error(exc: Exception) -> ProtocolResponse:
    """What FastAPI's catch-all handler (shipyard_common.web) answers to an unexpected exception."""
    log.exception("unhandled error", exc_info=exc)
    return 500, orjson.dumps({"error": {"code": "internal_error",
                                        "message": f"internal error: {type(exc).__name__}"}}), {}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def find_fast_lane(app: Any) -> FastLane | None:
    """The fast lane in front of ``app``'s middleware (uvicorn may wrap the app in its own layers)."""
    for _ in range(8):
        if app is None:
            return None
        stack = getattr(app, "middleware_stack", None)
        if isinstance(stack, FastLane):
            return stack
        app = getattr(app, "app", None)
    return None
