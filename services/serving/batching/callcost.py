"""How much CPU one runtime call of a loaded version costs: decides whether it may run on the event loop.

The fast lane (:mod:`services.serving.fastlane.lane`) runs a request's model call inline on the event
loop when that is cheaper than a thread hop, and in a thread otherwise. The deciding figure is an
exponentially weighted mean of the CPU time the calling thread spent in the runtime call
(``time.thread_time``): unlike wall time, it does not grow while a thread waits for the GIL or for
a merged call, so a busy server does not mistake a cheap model for an expensive one. A runtime
whose work happens elsewhere (TF Serving over gRPC) costs little CPU here but may block for long:
such runtimes say so (``remote``) and are never run inline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")

#: A call at most this costly (mean CPU seconds) may run on the event loop.
INLINE_MAX_S = 0.001
#: Calls measured before a version may run inline at all (until then: a thread).
MIN_SAMPLES = 5
_ALPHA = 0.1
#: Formats whose calls wait on another process rather than compute here.
REMOTE_FORMATS = frozenset({"savedmodel"})


#: Once measured MIN_SAMPLES times, one call in this many is measured: ``time.thread_time`` is a
#: system call (a thread's CPU clock has no vDSO shortcut), and two per request would cost more
#: than a small model's call.
SAMPLE_EVERY = 16


class CallCost:
    """An EWMA of one version's runtime-call CPU time; updates are racy but only ever approximate."""

    __slots__ = ("_calls", "mean_s", "remote", "samples")

    def __init__(self, *, remote: bool = False) -> None:
        self.mean_s = 0.0
        self.samples = 0
        self.remote = remote
        self._calls = 0

    def due(self) -> bool:
        """Whether this call should be measured (every call until MIN_SAMPLES, then a sample)."""
        self._calls += 1
        return self.samples < MIN_SAMPLES or not self._calls % SAMPLE_EVERY

    def observe(self, seconds: float) -> None:
        self.samples += 1
        if self.samples == 1:
            self.mean_s = seconds
        else:
            self.mean_s += _ALPHA * (seconds - self.mean_s)

    @property
    def cheap(self) -> bool:
        return not self.remote and self.samples >= MIN_SAMPLES and self.mean_s <= INLINE_MAX_S

    def timed(self, function: Callable[[A], T], argument: A) -> T:
        """``function(argument)``, its calling thread's CPU time observed when :meth:`due`."""
        if not self.due():
            return function(argument)
        started = time.thread_time()
        try:
            return function(argument)
        finally:
            self.observe(time.thread_time() - started)
