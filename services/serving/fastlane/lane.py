"""The prediction hot path: a plain ASGI layer that answers predict POSTs without the framework.

Installed outermost, in front of the whole middleware stack of the FastAPI app (each layer of
that stack costs a coroutine call per request and per message sent, a quarter of a small model's
request in a profile), it answers

* ours: ``POST /v1/models/{name}/predict``
* Open Inference Protocol v2: ``POST /v2/models/{name}[/versions/{version}]/infer``
* TF Serving REST: ``POST /v1/models/{name}[/versions/{version}|/labels/{label}]:predict``

and passes every other request to the app, whose routes for these paths stay (OpenAPI docs, and
the rare requests handed back, below). So that nothing is skipped, it counts the requests it
answers in the app's request metrics itself, and passes a body without a ``Content-Length``, or
over the size limit, to the app's body limit (which reads chunked bodies and answers the 413s).

It reads the body, checks the token with the app's
:class:`~shipyard_common.auth.TokenAuthenticator` (any valid token may predict), and calls the
same protocol handlers as the routes (``api/ours.py``, ``api/v2.py``, ``api/tfserving.py``), which
decode and hand the request to the data plane: parsing, validation, merging, canary and shadow
routing, the prediction log and the metrics are theirs, not a second copy. Status codes, headers
and error bodies are the routes'.

Handled in continuation style (:meth:`FastLane.start`: the answer goes to a callback), so that the
HTTP protocol in front of uvicorn's (:mod:`services.serving.fastlane.uvicorn_protocol`) answers
without an ASGI task or a coroutine per request; the ASGI path here awaits a future instead.

Handed back to FastAPI (after replaying the body): our protocol's bodies that its request model
refuses (not a JSON object with ``inputs``, a content type other than ``application/json``,
an ``X-Request-ID`` over 64 characters), so that those 422s keep FastAPI's exact shape.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from services.serving.api import ours as ours_api
from services.serving.api import tfserving as tfserving_api
from services.serving.api import v2 as v2_api
from services.serving.api.http import (
    ASGIApp,
    Message,
    ProtocolResponse,
    Receive,
    Respond,
    Scope,
    Send,
    failure,
)
from services.serving.core.dataplane import DataPlane
from services.serving.core.requests import settle
from services.serving.protocols import NestedTooDeeply, loads, tfserving, v2
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import BadRequest, InvalidInput, ShipyardError, ValidationFailed
from shipyard_common.metrics import HttpMetrics

log = logging.getLogger("shipyard.web")

_REQUEST_ID_MAX = 64  # our route's X-Request-ID limit (a longer one is FastAPI's 422)

_JSON = b"application/json"
_HEADER_LENGTH = v2.HEADER_LENGTH.encode()


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
# The commonest routes (no version or label), found without a pattern: (prefix, suffix, protocol, route).
_PLAIN_ROUTES = (("/v1/models/", "/predict", "ours", _ROUTES[3][2]),
                 ("/v2/models/", "/infer", "v2", _ROUTES[4][2]),
                 ("/v1/models/", ":predict", "tf", _ROUTES[0][2]))


Found = tuple[str, _Route, Mapping[str, str]]
"""A predict path's protocol, route template and path parameters."""

# The paths found so far (a model's few routes, asked again on every request), so that a path seen
# before costs one dict lookup. The paths are the client's: past the bound, they are matched as
# before and not kept.
_FOUND: dict[str, Found] = {}
_FOUND_KEPT = 1024


def _route(path: str) -> Found | None:
    """The predict route ``path`` names, if any (the route's own pattern, or the plain routes' test)."""
    found = _FOUND.get(path)
    if found is not None:
        return found
    for prefix, suffix, protocol, route in _PLAIN_ROUTES:  # a model's route without a version or label
        if path.startswith(prefix) and path.endswith(suffix):
            name = path[len(prefix):-len(suffix)]
            if name and "/" not in name and ":" not in name:
                found = protocol, route, MappingProxyType({"name": name})
                break
    else:
        if not path.startswith(("/v1/models/", "/v2/models/")):
            return None
        for pattern, protocol, route in _ROUTES:
            match = pattern.fullmatch(path)
            if match is not None:
                found = protocol, route, MappingProxyType(match.groupdict())
                break
        else:
            return None
    if len(_FOUND) < _FOUND_KEPT:
        _FOUND[path] = found
    return found


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
        #: Requests answered inside the HTTP protocol (uvicorn_protocol.py) rather than through ASGI.
        self.protocol_answers = 0

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
        future: asyncio.Future[ProtocolResponse] = asyncio.get_running_loop().create_future()
        try:
            self.start(request, body, settle(future))
        except HandBack:
            await self.app(scope, _replay(body, receive), send)  # counted by the app's request metrics
            return
        status, content, raw = self.encode(await future)
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
        finally:
            self.count(request, status)

    # -- the parts, also used by the HTTP protocol in front of uvicorn's (uvicorn_protocol.py) -----
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
        size = int(length) if length is not None and length.isdigit() else -1
        if not 0 <= size <= self.body_limit:
            # Chunked or too large: the app's body limit reads or refuses it (its 413s), unchanged.
            return None
        protocol, route, params = found
        return LaneRequest(protocol, route, params, headers, size, time.perf_counter())

    def start(self, request: LaneRequest, body: bytes, reply: Respond) -> None:
        """Answer ``request`` through ``reply`` (at once, or when its group has run).

        Raises :class:`HandBack` (before anything was run or counted) for requests FastAPI must answer.
        """
        params = request.params
        try:
            if request.protocol == "ours":
                self._ours(params["name"], body, request, reply)
            elif request.protocol == "v2":
                self._v2(params["name"], params.get("version"), body, request, reply)
            else:
                self._tf(params["name"], params.get("version"), params.get("label"), body, request, reply)
        except HandBack:
            raise
        except Exception as exc:
            reply(internal_error(exc))

    @staticmethod
    def encode(answer: ProtocolResponse) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        status, content, answer_headers = answer
        raw = [(b"content-length", str(len(content)).encode()),
               (b"content-type", answer_headers.pop("content-type", "application/json").encode())]
        for key, value in answer_headers.items():
            raw.append((key.lower().encode(), value.encode("latin-1")))
        return status, content, raw

    def count(self, request: LaneRequest, status: int) -> None:
        """The request in the app's request metrics, as the app would have counted it."""
        if self._http_metrics is None:
            self._http_metrics = self.state.http_metrics
        self._http_metrics.observe("POST", request.route.path, status, time.perf_counter() - request.started)

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

    # -- the protocols ---------------------------------------------------------------------------
    def _ours(self, name: str, body: bytes, request: LaneRequest, reply: Respond) -> None:
        # In FastAPI's order: a JSON body is parsed first (invalid: its 422), then the token is
        # checked, then the body's model and the headers (refused: its 422).
        headers = request.headers
        if headers.get(b"content-type") != _JSON:  # FastAPI reads a body without one as bytes, not JSON
            raise HandBack
        try:
            parsed = loads(body)
        except NestedTooDeeply as exc:  # FastAPI's parser would recurse until it failed (a 500)
            reply(ours_api.error_response(ValidationFailed(exc.message)))
            return
        except InvalidInput:
            raise HandBack from None
        try:
            self._authorize(headers)
        except ShipyardError as exc:
            reply(ours_api.error_response(exc))
            return
        raw_id = headers.get(b"x-request-id")
        if type(parsed) is not dict or "inputs" not in parsed or (
            raw_id is not None and len(raw_id) > _REQUEST_ID_MAX
        ):
            raise HandBack
        ours_api.predict(self.plane, name=name, inputs=parsed["inputs"],
                         request_id=None if raw_id is None else raw_id.decode("latin-1"),
                         started=request.started, reply=reply)

    def _v2(self, name: str, version: str | None, body: bytes, request: LaneRequest, reply: Respond) -> None:
        headers = request.headers
        try:
            self._authorize(headers)
            encoding = headers.get(b"content-encoding", b"identity")
            if encoding != b"identity":
                raise BadRequest("compressed request bodies are not accepted; send them uncompressed")
        except ShipyardError as exc:
            reply(v2.error_response(exc))
            return
        length, raw_id = headers.get(_HEADER_LENGTH), headers.get(b"x-request-id")
        v2_api.infer(self.plane, name=name, version=version, body=body,
                     header_length=None if length is None else length.decode("latin-1"),
                     request_id=None if raw_id is None else raw_id.decode("latin-1"),
                     content_type=_text(headers.get(b"content-type")), started=request.started, reply=reply)

    def _tf(self, name: str, version: str | None, label: str | None, body: bytes, request: LaneRequest,
            reply: Respond) -> None:
        headers = request.headers
        try:
            self._authorize(headers)
        except ShipyardError as exc:
            reply(tfserving.error_response(exc))
            return
        raw_id = headers.get(b"x-request-id")
        tfserving_api.predict(self.plane, name=name, version=version, label=label, body=body,
                              request_id=_text(raw_id), content_type=_text(headers.get(b"content-type")),
                              started=request.started, reply=reply)


class LaneRequest(NamedTuple):
    """A predict request the fast lane takes, as far as its headers tell."""

    protocol: str
    route: _Route
    params: Mapping[str, str]
    headers: dict[bytes, bytes]
    body_size: int
    started: float


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def internal_error(exc: Exception) -> ProtocolResponse:
    """What FastAPI's catch-all handler (shipyard_common.web) answers to an unexpected exception."""
    return ours_api.error_response(failure(exc))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
