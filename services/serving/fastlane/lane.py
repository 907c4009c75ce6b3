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

Its parts (:meth:`FastLane.match`, :meth:`FastLane.prepare`, :meth:`FastLane.answer_inline`,
:meth:`FastLane.count`) also serve :mod:`services.serving.fastlane.uvicorn_protocol`, which answers
cheap requests inside uvicorn's HTTP protocol without an ASGI task. There, our protocol's requests (as
:class:`Mergeable`) go to the :class:`Merger`, which answers those that arrived in the same
event-loop iteration for the same model with one runtime call
(:func:`services.serving.dataplane.predict_rows_merged`); a request that cannot share a call is
answered alone, in one pass for the commonest case (rows of floats for a production version alone:
:func:`services.serving.dataplane.predict_rows_now`), else by the general path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, NamedTuple, Protocol

import orjson

from services.serving.api.http import ASGIApp, Message, ProtocolResponse, Receive, Scope, Send
from services.serving.core.dataplane import VERSION_HEADER, DataPlane, Offload
from services.serving.fastlane.rows import RowsRequest, predict_rows_merged, predict_rows_now
from services.serving.protocols import NestedTooDeeply, loads, tfserving, v2
from services.serving.protocols.ours import plain_numbers, predict_body, predict_inference
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import BadRequest, InvalidInput, ShipyardError, ValidationFailed
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
_OURS_ROUTE = _ROUTES[3][2]
_OURS_PREFIX, _OURS_SUFFIX = len("/v1/models/"), -len("/predict")


class HandBack(Exception):
    """Let FastAPI answer this request (its body is replayed)."""


class FastLane:
    """See the module docstring. ``state`` is the app's ``state``: dataplane, authenticator, executor."""

    def __init__(self, app: ASGIApp, *, state: Any, body_limit: int) -> None:
        self.app = app
        self.state = state
        self.body_limit = body_limit
        self._plane: DataPlane | None = None
        self._authenticator: TokenAuthenticator | None = None
        self._executor: Executor | None = None
        self._http_metrics: HttpMetrics | None = None
        #: Requests answered inside the HTTP protocol (httpfast.py) rather than through ASGI.
        self.protocol_answers = 0
        #: Where the HTTP protocol puts mergeable requests (one event loop per app).
        self.merger = Merger(self)

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
            prepared = self.prepare(request, body)
            if isinstance(prepared, Mergeable):
                answer = self.answer_alone(prepared) or await self._run(prepared.fallback)
            elif isinstance(prepared, Deferred):
                answer = await self._run(prepared)
            else:
                answer = prepared
        except HandBack:
            await self.app(scope, _replay(body, receive), send)  # counted by the app's request metrics
            return
        except Exception as exc:
            answer = internal_error(exc)
        status, content, raw = self.encode(answer)
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
        finally:
            self.count(request, status)

    # -- the parts, also used by the HTTP protocol in front of uvicorn's (httpfast.py) -------------
    def match(self, scope: Scope) -> LaneRequest | None:
        """The request, if the fast lane answers it: a predict POST with a body of known, allowed size."""
        if scope["method"] != "POST" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        found = None
        if path.startswith("/v1/models/") and path.endswith("/predict"):
            name = path[_OURS_PREFIX:_OURS_SUFFIX]  # ours, the commonest: no pattern to try
            if name and "/" not in name and ":" not in name:
                found = ("ours", _OURS_ROUTE, {"name": name})
        if found is None:
            if not path.startswith(("/v1/models/", "/v2/models/")):
                return None
            for pattern, protocol, route in _ROUTES:
                match = pattern.fullmatch(path)
                if match is not None:
                    found = (protocol, route, match.groupdict())
                    break
            else:
                return None
        # Reversed, so that the first of repeated headers wins, as in Starlette's Headers.get.
        headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or int(length) > self.body_limit:
            # Chunked or too large: the app's body limit reads or refuses it (its 413s), unchanged.
            return None
        protocol, route, params = found
        return LaneRequest(protocol, route, params, headers, int(length), time.perf_counter())

    def prepare(self, request: LaneRequest, body: bytes) -> ProtocolResponse | Deferred | Mergeable:
        """The answer when it needs no model call (an error), else the model call to make.

        A :class:`Mergeable` call may share a runtime call with others (:class:`Merger`), or be
        answered alone (:meth:`answer_alone`).

        Raises :class:`HandBack` for requests FastAPI must answer.
        """
        params = request.params
        if request.protocol == "ours":
            return self._ours(params["name"], body, request.headers, request.started)
        if request.protocol == "v2":
            return self._v2(params["name"], params.get("version"), body, request.headers)
        return self._tf(params["name"], params.get("version"), params.get("label"), body, request.headers)

    def answer_alone(self, mergeable: Mergeable) -> ProtocolResponse | None:
        """A mergeable request answered alone, on the event loop; None: run its general call in a thread."""
        rows = mergeable.rows
        try:
            answered = predict_rows_now(dataplane=self.plane, name=mergeable.name, inputs=rows.inputs,
                                           request_id=rows.request_id, started=rows.started, dots=rows.dots)
        except ShipyardError as exc:  # the model failed: counted and worded as by the general path
            return _error(exc)
        if answered is not None:
            return _rows_answer(answered)
        return self.answer_inline(mergeable.fallback)

    def answer_inline(self, deferred: Deferred) -> ProtocolResponse | None:
        """The call's answer, made on the event loop when that is cheap; None: run it in a thread."""
        if deferred.body_size <= INLINE_MAX_BODY and self._cheap(deferred.name):
            try:
                return deferred.call(inline=True)
            except Offload:
                pass
        return None

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

    async def _run(self, deferred: Deferred) -> ProtocolResponse:
        """``call(inline=True)`` on the loop when cheap, else (or if it must wait) ``call()`` in a thread."""
        answer = self.answer_inline(deferred)
        if answer is not None:
            return answer
        if self._executor is None:
            self._executor = self.state.predict_executor
        return await asyncio.get_running_loop().run_in_executor(self._executor, deferred.call)

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
    def _ours(
        self, name: str, body: bytes, headers: dict[bytes, bytes], started: float
    ) -> ProtocolResponse | Mergeable:
        # In FastAPI's order: a JSON body is parsed first (invalid: its 422), then the token is
        # checked, then the body's model and the headers (refused: its 422).
        if headers.get(b"content-type") != _JSON:  # FastAPI reads a body without one as bytes, not JSON
            raise HandBack
        try:
            parsed = loads(body)
        except NestedTooDeeply as exc:  # FastAPI's parser would recurse until it failed (a 500)
            return _error(ValidationFailed(exc.message))
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
        request_id = None if raw_id is None else raw_id.decode("latin-1")
        inputs = parsed["inputs"]
        plane = self.plane

        def call(inline: bool = False) -> ProtocolResponse:
            try:
                inference = predict_inference(dataplane=plane, name=name, inputs=inputs,
                                                 request_id=request_id, started=started, inline=inline)
            except ShipyardError as exc:
                return _error(exc)
            return 200, orjson.dumps(predict_body(inference)), {
                "content-type": "application/json", VERSION_HEADER: inference.version}

        return Mergeable(name, RowsRequest(inputs, request_id, started, plain_numbers(body)),
                         Deferred(call, name, len(body)))

    def _v2(self, name: str, version: str | None, body: bytes,
            headers: dict[bytes, bytes]) -> ProtocolResponse | Deferred:
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
        return Deferred(call, name, len(body))

    def _tf(self, name: str, version: str | None, label: str | None, body: bytes,
            headers: dict[bytes, bytes]) -> ProtocolResponse | Deferred:
        try:
            self._authorize(headers)
        except ShipyardError as exc:
            return tfserving.error_response(exc)
        raw_id = headers.get(b"x-request-id")
        call = functools.partial(tfserving.predict, dataplane=self.plane, name=name, version=version,
                                 label=label, body=body,
                                 request_id=None if raw_id is None else raw_id.decode("latin-1"))
        return Deferred(call, name, len(body))


class LaneRequest(NamedTuple):
    """A predict request the fast lane takes, as far as its headers tell."""

    protocol: str
    route: _Route
    params: dict[str, str]
    headers: dict[bytes, bytes]
    body_size: int
    started: float


class Deferred(NamedTuple):
    """A model call to make: ``call(inline=True)`` on the event loop, or ``call()`` in a thread."""

    call: Callable[..., ProtocolResponse]
    name: str
    body_size: int


class Mergeable(NamedTuple):
    """Our protocol's request, which may share a runtime call with requests that came with it."""

    name: str
    rows: RowsRequest
    #: The general path's call, for when neither a merged nor a one-pass answer is possible.
    fallback: Deferred


class MergeClient(Protocol):
    """Who waits for a merged answer: the HTTP protocol (httpfast.py), ``context`` its request."""

    def merge_ready(self, context: Any) -> bool:
        """Whether the request still wants its answer here; False: it was dealt with otherwise."""

    def merge_done(self, context: Any, answer: ProtocolResponse) -> None:
        """Send ``answer``."""


class Merger:
    """Mergeable requests that arrived in one event-loop iteration, answered by one runtime call per model.

    Under load, the event loop reads many connections' requests per iteration (uvloop hands it
    every socket that became readable together). Answering each at once costs a runtime call per
    request; held until the iteration's reads are done (a callback the loop runs next: no timer,
    only the rest of the iteration), requests for the same model share one call
    (:func:`~services.serving.dataplane.predict_rows_merged`: each still checked, logged and
    counted on its own). Requests that cannot share one are answered alone, as they would have
    been. While requests come one per iteration (light load), the first of an iteration is
    answered at once, without waiting for the iteration's end.
    """

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane
        self._pending: list[tuple[Mergeable, MergeClient, Any]] = []
        self._scheduled = False
        # Whether the last loop iteration read several requests; one answered at once in this one.
        self._busy = False
        self._answered_now = 0
        #: Requests answered from merged runtime calls (for tests and diagnostics).
        self.merged = 0

    def add(self, loop: asyncio.AbstractEventLoop, mergeable: Mergeable, client: MergeClient,
            context: Any) -> None:
        if self._scheduled or self._busy:
            self._pending.append((mergeable, client, context))
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
            return
        # Requests have come one per loop iteration lately: the first of this one is answered at
        # once, so that a lone request waits for nothing; any read after it in the same iteration
        # waits for its end (and, from the next iteration on, every request does, while they come
        # several at a time).
        self._scheduled = True
        self._answered_now = 1
        loop.call_soon(self._flush)
        _send((mergeable, client, context), self._alone(mergeable))

    def _alone(self, mergeable: Mergeable) -> ProtocolResponse:
        try:
            return self._lane.answer_alone(mergeable) or _IN_THREAD
        except Exception as exc:
            return internal_error(exc)

    def _flush(self) -> None:
        self._scheduled = False
        self._busy = self._answered_now + len(self._pending) > 1
        self._answered_now = 0
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        groups: dict[str, list[tuple[Mergeable, MergeClient, Any]]] = {}
        for entry in pending:
            try:
                ready = entry[1].merge_ready(entry[2])
            except Exception as exc:
                _send(entry, internal_error(exc))
                continue
            if ready:
                groups.setdefault(entry[0].name, []).append(entry)
        for name, entries in groups.items():
            merged: list[tuple[bytes, str] | None] | None = None
            if len(entries) > 1:
                try:
                    merged = predict_rows_merged(dataplane=self._lane.plane, name=name,
                                                    requests=[entry[0].rows for entry in entries])
                except Exception:
                    log.exception("merging %d requests for %r failed; answering each alone",
                                  len(entries), name)
            for index, entry in enumerate(entries):
                answered = None if merged is None else merged[index]
                if answered is not None:
                    self.merged += 1
                    _send(entry, _rows_answer(answered))
                else:
                    _send(entry, self._alone(entry[0]))


def _send(entry: tuple[Mergeable, MergeClient, Any], answer: ProtocolResponse) -> None:
    try:
        entry[1].merge_done(entry[2], answer)
    except Exception:
        log.exception("could not send a prediction's answer")


#: :meth:`MergeClient.merge_done`'s answer for a request to run in a thread (the ASGI path).
_IN_THREAD: ProtocolResponse = (0, b"", {})


def in_thread(answer: ProtocolResponse) -> bool:
    """Whether a merged request's ``answer`` is to run its general call in a thread instead."""
    return answer is _IN_THREAD


def _rows_answer(answered: tuple[bytes, str]) -> ProtocolResponse:
    content, version = answered
    return 200, content, {"content-type": "application/json", VERSION_HEADER: version}


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
