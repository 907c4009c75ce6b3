"""uvicorn's HTTP protocol with the fast lane's predictions answered inside it, without an ASGI task.

For every request, uvicorn's ``httptools`` protocol builds a request/response cycle, starts an
asyncio task running the ASGI app (uvicorn's proxy-headers layer, then the fast lane), and turns
the app's two ``send`` messages back into bytes: for a small model that machinery costs more than
the model call. :class:`FastLaneHttpProtocol` keeps all of it for every other request; for a
predict POST that the fast lane (:mod:`services.serving.fastlane.lane`) takes, it runs the same
call, :meth:`FastLane.answer`, without the task:

* when the headers are complete, a request the lane takes (:meth:`FastLane.match`: a predict
  route, a ``Content-Length`` of at most :data:`HELD_MAX_BODY`, no ``Expect: 100-continue``) is
  held instead of starting its task;
* when its body is complete, :meth:`FastLane.answer`'s coroutine is driven right there
  (:func:`drive`): the data plane, the batcher (where the request may wait for the end of the loop
  iteration to share a runtime call) and the log are the lane's, unchanged. When it is done, the
  answer's bytes are written with uvicorn's default headers (``date``, ``server``) and keep-alive
  handling, and the connection is told the response is complete, as uvicorn's own ``send`` would;
* anything else (a body FastAPI must refuse, a pipelined request, a client not reading its
  responses) starts the ordinary ASGI task with the body already read: the answer is the same
  either way, only the path differs.

Requests are counted in the same request metrics as the app's. Access logging is off in Shipyard's
runner (``access_log=False``), so nothing is skipped there. Bound to uvicorn's ``httptools``
protocol (``uvicorn.protocols.http.httptools_impl``) of the pinned uvicorn version
(:data:`UVICORN_VERSION`; ``python -m services.serving`` uses it when ``SHIPYARD_SERVING_FAST_LANE``
is on, the default, and uvicorn is that version). The tests drive the fast lane's tests through it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from services.serving.api.http import ProtocolResponse
from services.serving.fastlane.lane import FastLane, HandBack, LaneRequest, find_fast_lane, internal_error
from shipyard_common.runner import UVICORN_VERSION, bound_uvicorn

__all__ = ["UVICORN_VERSION", "FastLaneHttpProtocol", "bound_uvicorn", "drive"]

#: Bodies up to this size are answered in the protocol; larger ones take the ASGI path.
HELD_MAX_BODY = 64 * 1024

# Response header lines as bytes, by (name, value): the same few (content type, version) recur.
_HEADER_LINES: dict[tuple[str, str], bytes] = {}
_HEADER_LINES_KEPT = 512


def drive(coroutine: Coroutine[Any, Any, ProtocolResponse], done: Callable[[ProtocolResponse], None]) -> None:
    """Run ``coroutine`` on the running loop without a task: at once, up to its first wait, then
    each time what it waits for is done; ``done`` gets its result (or the answer to its error).

    What an asyncio task does with a coroutine (each ``await`` of a future yields the future to
    its driver; a bare ``yield`` asks to be run again soon), without the task's scheduling, name and
    context copy: most predictions finish in the first step. Raises :class:`HandBack` only when the
    coroutine raises it before its first wait (the lane decides that before running anything).
    """
    first = True

    def step(_: object = None) -> None:
        nonlocal first
        try:
            waited = coroutine.send(None)
        except StopIteration as stop:
            done(stop.value)
            return
        except HandBack:
            if first:
                raise
            done(internal_error(RuntimeError("a request was handed back after it had started")))
            return
        except Exception as exc:
            done(internal_error(exc))
            return
        finally:
            first = False
        if waited is None:
            asyncio.get_running_loop().call_soon(step)
        else:
            waited.add_done_callback(step)

    step()


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
            if request is not None and int(request.headers[b"content-length"]) <= HELD_MAX_BODY:
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
        """Answer ``cycle`` here (now, or once its merged call is done); False when the ASGI path must
        (nothing was run or counted then)."""
        lane = self._lane
        if lane is None or self.flow.write_paused:  # a client not reading its answers: the ASGI path waits
            return False

        def done(answer: ProtocolResponse) -> None:
            if not cycle.disconnected:
                self._respond(cycle, request, answer)

        try:
            drive(lane.answer(request, bytes(cycle.body)), done)
        except HandBack:
            return False
        return True

    def _respond(self, cycle: RequestResponseCycle, request: LaneRequest, answer: ProtocolResponse) -> None:
        """Write ``answer`` as uvicorn's ``send`` would, and end the request's cycle."""
        lane = self._lane
        assert lane is not None
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
        lane.answered += 1
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()
