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
same codecs and data plane as the routes (:mod:`services.serving.protocols`,
:func:`services.serving.dataplane.predict_inference`): parsing, validation, canary and shadow
routing, the prediction log and the metrics are theirs, not a second copy. Status codes, headers
and error bodies are the routes'.

Where the model call runs: inline on the event loop when the version's runtime calls are cheap
(:class:`~services.serving.callcost.CallCost`: a mean of at most 1 ms of CPU, and a body of at
most :data:`INLINE_MAX_BODY` bytes), since a thread hop costs more than such a call and merging
cannot help a call that runs at once; otherwise in a thread of a dedicated pool, so the loop keeps
accepting and concurrent requests of one version can be merged (``batching.py``). An inline call
never blocks: it is never queued for a merged call, and when the prediction log is full it raises
:class:`~services.serving.dataplane.Offload` before running the model (it reserves its record's
place first), and the request runs again in a thread, where the append waits for room (nothing
answered goes unlogged, and no model call is made twice).

Handed back to FastAPI (after replaying the body): our protocol's bodies that its request model
refuses (not a JSON object with ``inputs``, a content type other than ``application/json``,
an ``X-Request-ID`` over 64 characters), so that those 422s keep FastAPI's exact shape.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import orjson

from services.serving import dataplane as dp
from services.serving.http import ASGIApp, Message, ProtocolResponse, Receive, Scope, Send
from services.serving.protocols import loads, tfserving, v2
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import BadRequest, InvalidInput, ShipyardError
from shipyard_common.metrics import HttpMetrics

log = logging.getLogger("shipyard.web")

#: Bodies larger than this are parsed and run in a thread whatever the model costs.
INLINE_MAX_BODY = 64 * 1024
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
_WANTED = frozenset({
    b"authorization", b"x-api-token", b"x-request-id", b"content-type", b"content-encoding",
    b"content-length", v2.HEADER_LENGTH.encode(),
})


class _HandBack(Exception):  # noqa: N818 - a signal, not an error
    """Let FastAPI answer this request (its body is replayed)."""


class FastLane:
    """See the module docstring. ``state`` is the app's ``state``: dataplane, authenticator, executor."""

    def __init__(self, app: ASGIApp, *, state: Any, body_limit: int) -> None:
        self.app = app
        self.state = state
        self.body_limit = body_limit
        self._plane: dp.DataPlane | None = None
        self._authenticator: TokenAuthenticator | None = None
        self._executor: Executor | None = None
        self._http_metrics: HttpMetrics | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        found = None
        if path.startswith(("/v1/models/", "/v2/models/")):
            for pattern, protocol, route in _ROUTES:
                match = pattern.fullmatch(path)
                if match is not None:
                    found = (protocol, route, match.groupdict())
                    break
        if found is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            if key in _WANTED and key not in headers:
                headers[key] = value
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) > self.body_limit:
            # Chunked or too large: the app's body limit reads or refuses it (its 413s), unchanged.
            await self.app(scope, receive, send)
            return
        protocol, route, params = found
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            if protocol == "ours":
                answer = await self._ours(params["name"], body, headers)
            elif protocol == "v2":
                answer = await self._v2(params["name"], params.get("version"), body, headers)
            else:
                answer = await self._tf(params["name"], params.get("version"), params.get("label"), body,
                                        headers)
        except _HandBack:
            await self.app(scope, _replay(body, receive), send)  # counted by the app's request metrics
            return
        except Exception as exc:  # what FastAPI's catch-all handler (shipyard_common.web) answers
            log.exception("unhandled error")
            answer = 500, orjson.dumps({"error": {"code": "internal_error",
                                                  "message": f"internal error: {type(exc).__name__}"}}), {}
        status, content, answer_headers = answer
        raw = [(b"content-length", str(len(content)).encode()),
               (b"content-type", answer_headers.pop("content-type", "application/json").encode())]
        raw.extend((key.lower().encode(), value.encode("latin-1")) for key, value in answer_headers.items())
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
        finally:
            if self._http_metrics is None:
                self._http_metrics = self.state.http_metrics
            self._http_metrics.observe("POST", route.path, status, time.perf_counter() - started)

    # -- the app's parts, looked up once (they are set after the middleware is declared) --------
    @property
    def plane(self) -> dp.DataPlane:
        if self._plane is None:
            self._plane = self.state.dataplane
        return self._plane

    def _authorize(self, headers: dict[bytes, bytes]) -> None:
        if self._authenticator is None:
            self._authenticator = self.state.authenticator
        authorization = headers.get(b"authorization")
        api_token = headers.get(b"x-api-token")
        self._authenticator.authorize(
            None if authorization is None else authorization.decode("latin-1"),
            None if api_token is None else api_token.decode("latin-1"),
            Role.VIEWER,
        )

    async def _run(
        self, call: Callable[..., ProtocolResponse], name: str, body_size: int
    ) -> ProtocolResponse:
        """``call(inline=True)`` on the loop when cheap, else (or if it must wait) ``call()`` in a thread."""
        if body_size <= INLINE_MAX_BODY and self._cheap(name):
            try:
                return call(inline=True)
            except dp.Offload:
                pass
        if self._executor is None:
            self._executor = self.state.predict_executor
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _cheap(self, name: str) -> bool:
        """Whether every version that may answer ``name`` has cheap runtime calls."""
        plane = self.plane
        state = plane.models.state(name)
        if state is None or state.served is None:
            return True  # answered with an error at once
        if not state.served.cost.cheap:
            return False
        for slot in (state.canary, state.shadow):
            if slot.served is not None and not slot.served.cost.cheap:
                return False
        return True

    # -- the protocols ---------------------------------------------------------------------------
    async def _ours(self, name: str, body: bytes, headers: dict[bytes, bytes]) -> ProtocolResponse:
        started = time.perf_counter()
        # In FastAPI's order: a JSON body is parsed first (invalid: its 422), then the token is
        # checked, then the body's model and the headers (refused: its 422).
        if headers.get(b"content-type") != _JSON:  # FastAPI reads a body without one as bytes, not JSON
            raise _HandBack
        try:
            parsed = loads(body)
        except InvalidInput:
            raise _HandBack from None
        try:
            self._authorize(headers)
            raw_id = headers.get(b"x-request-id")
            if type(parsed) is not dict or "inputs" not in parsed or (
                raw_id is not None and len(raw_id) > _REQUEST_ID_MAX
            ):
                raise _HandBack
            request_id = None if raw_id is None else raw_id.decode("latin-1")
            inputs = parsed["inputs"]
            plane = self.plane

            def call(inline: bool = False) -> ProtocolResponse:
                inference = dp.predict_inference(dataplane=plane, name=name, inputs=inputs,
                                                 request_id=request_id, started=started, inline=inline)
                return 200, orjson.dumps(dp.predict_body(inference)), {
                    "content-type": "application/json", dp.VERSION_HEADER: inference.version}

            return await self._run(call, name, len(body))
        except ShipyardError as exc:
            if exc.status_code >= 500:
                log.error("request failed: %s", exc.message)  # as shipyard_common.web's handler
            return exc.status_code, orjson.dumps(exc.to_body()), {"content-type": "application/json"}

    async def _v2(self, name: str, version: str | None, body: bytes,
                  headers: dict[bytes, bytes]) -> ProtocolResponse:
        try:
            self._authorize(headers)
            encoding = headers.get(b"content-encoding", b"identity")
            if encoding != b"identity":
                raise BadRequest("compressed request bodies are not accepted; send them uncompressed")
        except ShipyardError as exc:
            return v2.error_response(exc)
        codec_headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers.items()}
        call = functools.partial(v2.infer, dataplane=self.plane, name=name, version=version, body=body,
                                 headers=codec_headers)
        return await self._run(call, name, len(body))

    async def _tf(self, name: str, version: str | None, label: str | None, body: bytes,
                  headers: dict[bytes, bytes]) -> ProtocolResponse:
        try:
            self._authorize(headers)
        except ShipyardError as exc:
            return tfserving.error_response(exc)
        raw_id = headers.get(b"x-request-id")
        call = functools.partial(tfserving.predict, dataplane=self.plane, name=name, version=version,
                                 label=label, body=body,
                                 request_id=None if raw_id is None else raw_id.decode("latin-1"))
        return await self._run(call, name, len(body))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
