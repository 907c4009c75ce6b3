"""Adaptive batching: concurrent requests for one model version answered by one runtime call.

One :class:`Batcher` per loaded version, driven by the event loop, takes the requests of every
protocol (ours, OIP v2 over HTTP and gRPC, TF Serving REST) once they are decoded. It only
decides *which* requests go together and *where* their group runs; the group's work (checks,
the one runtime call, the prediction log, the metrics) is the caller's :class:`GroupRunner`
(the data plane). Its policy:

* **Idle: no added latency.** A request that finds nothing running or waiting runs at once.
* **Cheap calls run on the event loop** (:class:`~services.serving.batching.callcost.CallCost`:
  at most 1 ms of CPU), where a thread hop would cost more than the call. Under load the loop
  reads many connections' requests per iteration; those are held until the iteration's reads are
  done (a callback the loop runs next: no timer) and answered in groups. While requests come one
  per iteration, the first of an iteration runs at once.
* **Costly calls run in the predict pool**, at most ``concurrency`` groups at a time. A request
  arriving while a call runs waits for a free slot, for ``max_batch_size`` rows to gather, or for
  ``max_wait_s``; the next group takes every waiting request that fits.
* A group holds requests with equal merge keys (:attr:`Job.key`) and at most ``max_batch_size``
  rows; a request with no key, or larger than that, runs alone.
* A group that cannot run on the loop (the runner declines: the prediction log is full) runs in
  the pool, where it may wait. Answers are always delivered on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from services.serving.batching.callcost import CallCost
from services.serving.runtimes.base import Signature

log = logging.getLogger("shipyard.serving.batching")

#: Groups of a version running in the pool at once (local runtimes; remote ones: REMOTE_CONCURRENCY).
CONCURRENCY = 2
REMOTE_CONCURRENCY = 8


class Job(Protocol):
    """A decoded request waiting for its answer."""

    #: Rows it holds (the batch dimension), and what it must share with another to be merged
    #: (None: never merged).
    rows: int
    key: Hashable | None

    def reply(self, result: Any) -> None:
        """Deliver the job's answer (an inference, or the error that refused it)."""


class GroupRunner(Protocol):
    """Runs a group of jobs of one version: the data plane."""

    #: The pool for groups whose calls are too costly for the event loop.
    executor: Executor

    def run_group(self, jobs: Sequence[Any], *, inline: bool) -> list[Any] | None:
        """Each job's result, in order; ``inline`` (on the loop) may decline with None: run it in the pool."""


class Batcher:
    """See the module docstring. ``cost``: the version's runtime-call cost, which picks loop or pool."""

    def __init__(self, *, cost: CallCost, max_batch_size: int, max_wait_s: float, merges: bool = True,
                 concurrency: int = CONCURRENCY) -> None:
        self.cost = cost
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        #: Whether requests may share a call (no longer once a merged call's outputs did not split).
        self.merges = merges and max_batch_size > 1
        self.concurrency = concurrency
        self._pending: list[tuple[Any, float]] = []
        self._scheduled = False
        self._busy = False  # the last loop iteration brought more than one request
        self._answered_now = 0
        self._running = 0  # groups in the pool
        self._timer: asyncio.TimerHandle | None = None
        self._runner: GroupRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Groups run, those run in the pool, and requests answered in groups of several (for tests
        #: and diagnostics).
        self.groups = 0
        self.pooled = 0
        self.merged = 0

    def submit(self, job: Job, runner: GroupRunner) -> None:
        """Answer ``job`` (through ``job.reply``), merged with others where that helps.

        Off the event loop (a thread with no running loop, or tests), the job runs at once, alone.
        """
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._reply_all([job], _run_blocking(runner, [job]))
            return
        self._runner = runner
        if self._scheduled:
            self._pending.append((job, time.monotonic()))
            return
        self._scheduled = True
        assert self._loop is not None
        self._loop.call_soon(self._flush)
        if not self._busy and self._running == 0 and self.cost.cheap:
            # Requests have come one per loop iteration lately: this one runs now; any read after
            # it in this iteration waits for the iteration's end, with the others.
            self._answered_now = 1
            self._run_inline([job])
            return
        self._pending.append((job, time.monotonic()))

    # -- on the loop ------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._scheduled = False
        if self.cost.cheap:
            self._busy = self._answered_now + len(self._pending) > 1
            self._answered_now = 0
            if self._pending:
                pending, self._pending = self._pending, []
                for group in self._groups([job for job, _ in pending]):
                    self._run_inline(group)
        else:
            self._busy = False
            self._answered_now = 0
            self._start_pooled()

    def _run_inline(self, group: list[Any]) -> None:
        assert self._runner is not None
        try:
            results = self._runner.run_group(group, inline=True)
        except Exception as exc:  # never leave a caller waiting
            log.exception("a group of %d requests failed", len(group))
            results = [exc] * len(group)
        if results is None:  # it would have to wait (a full log): the pool takes it
            self._run_pooled(group)
            return
        self._reply_all(group, results)

    def _start_pooled(self) -> None:
        """Start groups in the pool while slots are free and waiting is over; else a timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and self._running < self.concurrency:
            if self._running and not self._ready():
                break
            rows, taken = 0, 0
            for job, _ in self._pending:
                if taken and (not self.merges or rows + job.rows > self.max_batch_size):
                    break
                rows += job.rows
                taken += 1
            jobs = [job for job, _ in self._pending[:taken]]
            del self._pending[:taken]
            for group in self._groups(jobs):
                self._run_pooled(group)
        if self._pending and self._running < self.concurrency:
            assert self._loop is not None
            wait = self._pending[0][1] + self.max_wait_s - time.monotonic()
            self._timer = self._loop.call_later(max(wait, 0.0), self._start_pooled)

    def _ready(self) -> bool:
        """Whether waiting requests should start now, though another call runs."""
        waited = time.monotonic() - self._pending[0][1]
        rows = sum(job.rows for job, _ in self._pending)
        return waited >= self.max_wait_s or rows >= self.max_batch_size or not self.merges

    def _run_pooled(self, group: list[Any]) -> None:
        runner, loop = self._runner, self._loop
        assert runner is not None and loop is not None
        self._running += 1
        self.pooled += 1
        future = loop.run_in_executor(runner.executor, _run_blocking, runner, group)
        future.add_done_callback(lambda done: self._pooled_done(group, done))

    def _pooled_done(self, group: list[Any], done: asyncio.Future[list[Any]]) -> None:
        self._running -= 1
        exc = done.exception()
        self._reply_all(group, [exc] * len(group) if exc is not None else done.result())
        self._start_pooled()

    def _groups(self, jobs: list[Any]) -> list[list[Any]]:
        """``jobs`` in groups of equal keys and at most ``max_batch_size`` rows, in arrival order."""
        if not self.merges or len(jobs) < 2:
            return [[job] for job in jobs]
        open_groups: dict[Hashable, tuple[list[Any], list[int]]] = {}
        groups: list[list[Any]] = []
        for job in jobs:
            key = job.key
            if key is None or job.rows >= self.max_batch_size:
                groups.append([job])
                continue
            found = open_groups.get(key)
            if found is None or found[1][0] + job.rows > self.max_batch_size:
                found = ([], [0])
                open_groups[key] = found
                groups.append(found[0])
            found[0].append(job)
            found[1][0] += job.rows
        return groups

    def _reply_all(self, group: Sequence[Any], results: Sequence[Any]) -> None:
        self.groups += 1
        if len(group) > 1:
            self.merged += len(group)
        for job, result in zip(group, results, strict=True):
            try:
                job.reply(result)
            except Exception:
                log.exception("could not deliver a prediction's answer")


def _run_blocking(runner: GroupRunner, group: list[Any]) -> list[Any]:
    results = runner.run_group(group, inline=False)
    assert results is not None  # only an inline run may decline
    return results


def batchable(*signatures: Signature) -> bool:
    """Whether every input and output of every signature has a free first (batch) dimension."""
    return all(
        spec.shape and spec.shape[0] is None
        for signature in signatures
        for spec in (*signature.inputs, *signature.outputs)
    )


def concurrency_for(remote: bool) -> int:
    """Groups of one version in the pool at once: a remote runtime (TF Serving) waits, not computes."""
    return REMOTE_CONCURRENCY if remote else CONCURRENCY


Reply = Callable[[Any], None]
