"""uvicorn's HTTP protocol with the prediction fast lane answered inside it, without an ASGI task.

For every request, uvicorn's ``httptools`` protocol builds a request/response cycle, starts an
asyncio task running the ASGI app (uvicorn's proxy-headers layer, FastAPI, the fast lane), and
turns the app's two ``send`` messages back into bytes. For a small model that machinery costs
more than the model call. :class:`FastLaneHttpProtocol` keeps all of it for every other request,
and for a predict POST the fast lane (:mod:`services.serving.fastlane.lane`) takes it hands the
request to the lane with a callback instead:

* when the headers are complete, a request the lane takes (:meth:`FastLane.match`: a predict
  route, a ``Content-Length`` of at most :data:`HELD_MAX_BODY`, no ``Expect: 100-continue``) is
  held instead of starting its task;
* when its body is complete, :meth:`FastLane.start` decodes it and hands it to the data plane,
  whose batcher merges it with the requests of any protocol read in the same loop iteration (or
  runs it in the predict pool when the model is costly); the answer comes back to :meth:`_respond`,
  which writes the response bytes itself, with uvicorn's default headers (``date``, ``server``)
  and keep-alive handling, then tells the connection the response is complete, as uvicorn's own
  ``send`` would;
* anything else (a body FastAPI must refuse, a pipelined request, a client not reading its
  responses) starts the ordinary ASGI task with the body already read: the answer is the same
  either way, only the path differs.

Requests are counted in the same request metrics as the app's. Access logging is off in Shipyard's
runner (``access_log=False``), so nothing is skipped there. Bound to uvicorn's ``httptools``
protocol (``uvicorn.protocols.http.httptools_impl``) of the pinned uvicorn version: the tests
drive every serving test through it (``python -m services.serving`` uses it when
``SHIPYARD_SERVING_FAST_LANE`` is on, the default).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from services.serving.api.http import ProtocolResponse
from services.serving.fastlane.lane import FastLane, HandBack, LaneRequest
from shipyard_common.runner import UVICORN_VERSION, bound_uvicorn

__all__ = ["UVICORN_VERSION", "FastLaneHttpProtocol", "bound_uvicorn", "find_fast_lane"]

#: Bodies larger than this go the ASGI way (the lane reads them there).
HELD_MAX_BODY = 64 * 1024

# Response header lines as bytes, by (name, value): the same few (content type, version) recur.
_HEADER_LINES: dict[tuple[str, str], bytes] = {}
_HEADER_LINES_KEPT = 512


def find_fast_lane(app: Any) -> FastLane | None:
    """The fast lane in front of ``app``'s middleware (uvicorn wraps the app in its own layers)."""
    for _ in range(8):
        if app is None:
            return None
        stack = getattr(app, "middleware_stack", None)
        if isinstance(stack, FastLane):
            return stack
        app = getattr(app, "app", None)
    return None


class FastLaneHttpProtocol(HttpToolsProtocol):
    """See the module docstring."""

    _lane: FastLane | None = None
    _lane_looked_up = False
    # The held request: its cycle, the app uvicorn chose for it, what the lane matched.
    _held: tuple[RequestResponseCycle, Any, LaneRequest] | None = None

    _defaults: list[tuple[bytes, bytes]] | None = None
    _defaults_block = b""

    def _default_headers(self) -> bytes:
        """uvicorn's default headers (date, server) as bytes; the server renews the list each second."""
        defaults = self.server_state.default_headers
        if defaults is not self._defaults:
            self._defaults = defaults
            self._defaults_block = b"".join(name + b": " + value + b"\r\n" for name, value in defaults)
        return self._defaults_block

    def _fast_lane(self) -> FastLane | None:
        if not self._lane_looked_up:
            self._lane = find_fast_lane(self.app)
            self._lane_looked_up = True
        return self._lane

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        lane = self._fast_lane()
        if (
            lane is not None and app is self.app and cycle is self.cycle and cycle.more_body
            and not cycle.waiting_for_100_continue
        ):
            request = lane.match(cycle.scope)  # type: ignore[arg-type]  # an ASGI HTTP scope
            if request is not None and request.body_size <= HELD_MAX_BODY:
                self._held = (cycle, app, request)
                return
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        held = self._held
        if held is None:
            return
        self._held = None
        cycle, app, request = held
        if cycle.response_complete or cycle.disconnected:
            return
        if not self._answer(cycle, app, request):
            super()._start_asgi_task(cycle, app)  # the ASGI path, with the body already read

    def connection_lost(self, exc: Exception | None) -> None:
        self._held = None
        super().connection_lost(exc)

    def _answer(self, cycle: RequestResponseCycle, app: Any, request: LaneRequest) -> bool:
        """Hand ``cycle`` to the lane, its answer written by :meth:`_respond`; False when the ASGI path
        must answer it (nothing was run or counted then)."""
        lane = self._lane
        if lane is None or self.flow.write_paused:  # a client not reading its answers: ASGI waits for it
            return False
        try:
            lane.start(request, bytes(cycle.body), lambda answer: self._respond(cycle, request, answer))
        except HandBack:
            return False
        return True

    def _respond(self, cycle: RequestResponseCycle, request: LaneRequest, answer: ProtocolResponse) -> None:
        """Write ``answer`` as uvicorn's ``send`` would, and end the request's cycle."""
        lane = self._lane
        assert lane is not None
        if cycle.disconnected or cycle.response_complete:  # the client left while it was answered
            lane.count(request, answer[0])
            return
        status, content, headers = answer
        parts = [STATUS_LINE[status], self._default_headers(), b"content-length: %d\r\n" % len(content)]
        if "content-type" not in headers:
            parts.append(b"content-type: application/json\r\n")
        for header in headers.items():
            line = _HEADER_LINES.get(header)
            if line is None:
                name, value = header
                line = b"%b: %b\r\n" % (name.lower().encode(), value.encode("latin-1"))
                if len(_HEADER_LINES) < _HEADER_LINES_KEPT:
                    _HEADER_LINES[header] = line
            parts.append(line)
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", content]
        cycle.response_started = True
        cycle.response_complete = True
        cycle.body = bytearray()
        self.transport.write(b"".join(parts))
        lane.count(request, status)
        lane.protocol_answers += 1
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()
