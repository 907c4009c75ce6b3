"""One model version's runtime calls, merged across concurrent requests of any protocol.

The one batcher: every request's model call goes through :meth:`Batcher.run`, on the event loop.

* **Where a call runs.** A version whose calls are cheap (:class:`~.callcost.CallCost`: a mean of
  at most 1 ms of CPU) runs them on the event loop, where a thread hop would cost more than the
  call; a costly one (or a remote one: TF Serving) runs them in the data plane's thread pool, so
  the loop keeps accepting requests meanwhile.
* **Idle: no added latency.** A request that finds its version idle runs at once, alone.
* **Busy: merge.** On the loop, requests that arrive in the same event-loop iteration (uvloop
  hands the loop every connection that became readable together) wait for the end of that
  iteration (a ``call_soon``: no timer) and share one call. In the pool, requests that arrive
  while the version's call runs wait for it to end, then share the next call; one that has
  waited ``max_wait_s`` goes at once, with those queued behind it, beside the running call.
* Requests merge only when their inputs agree beyond the batch axis (names, dtypes, shapes);
  calls hold at most ``max_batch_size`` rows; a larger request runs alone, unsplit. The merged
  outputs are split by each request's rows, so every caller gets exactly its own.
* **Failures stay with their request.** When a merged call fails, each of its requests runs again
  alone and gets its own answer or error. A version whose outputs turn out not to follow the batch
  is never merged again; so is one whose signature has no free batch dimension.

No thread of its own and nothing to close: requests hold their version's lease while they wait
here, so a retired version's runtime is closed only once every one has its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.serving.batching.callcost import REMOTE_FORMATS, CallCost
from services.serving.runtimes.base import Runtime, Signature

log = logging.getLogger("shipyard.serving.batching")

Arrays = dict[str, np.ndarray]


class _Observed(Protocol):
    def observe(self, amount: float) -> None: ...


class BatchMetrics(Protocol):
    """Where a batcher counts its calls: a version's metrics (core/metrics.py), by shape not import."""

    @property
    def batch_requests(self) -> _Observed: ...

    @property
    def batch_rows(self) -> _Observed: ...


class UnsplittableOutput(Exception):
    """A merged call answered an output whose first dimension is not the batch."""


@dataclass(eq=False, slots=True)
class _Waiting:
    arrays: Arrays
    rows: int
    #: Requests merge only when their keys are equal: same inputs, dtypes and shapes beyond axis 0.
    key: Hashable
    future: asyncio.Future[Arrays]
    enqueued: float = 0.0


def shape_key(arrays: Arrays) -> tuple[Hashable, int] | None:
    """What a request must share with another to be merged with it, and its rows; None: never."""
    rows: int | None = None
    parts = []
    for name in sorted(arrays):
        array = arrays[name]
        if array.ndim == 0 or (rows is not None and array.shape[0] != rows):
            return None
        rows = int(array.shape[0])
        parts.append((name, array.dtype.str, array.shape[1:]))
    if rows is None or rows == 0:
        return None
    return tuple(parts), rows


def batchable(*signatures: Signature) -> bool:
    """Whether every input and output of every signature has a free first (batch) dimension."""
    return all(
        spec.shape and spec.shape[0] is None
        for signature in signatures
        for spec in (*signature.inputs, *signature.outputs)
    )


def split(outputs: Arrays, rows: list[int]) -> list[Arrays]:
    """A merged call's outputs cut back into each request's rows, in order."""
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise UnsplittableOutput(
                f"output {name!r} has shape {list(value.shape)} for a merged call of {total} rows"
            )
    answers: list[Arrays] = []
    start = 0
    for count in rows:
        end = start + count
        answers.append({name: value[start:end] for name, value in outputs.items()})
        start = end
    return answers


class Batcher:
    """See the module docstring. ``merge``: whether the policy lets this version's requests merge."""

    def __init__(
        self, runtime: Runtime, *, max_batch_size: int, max_wait_s: float = 0.002, merge: bool = True,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        #: CPU per runtime call: decides loop or pool.
        self.cost = CallCost(remote=runtime.format in REMOTE_FORMATS)
        self._merging = merge and max_batch_size > 1 and batchable(runtime.signature)
        #: Runtime calls made, merged or not; requests answered by merged calls; requests that waited.
        self.calls = 0
        self.merged = 0
        self.queued = 0
        # On the loop: requests held for the end of this iteration; whether the last was busy.
        self._held: list[_Waiting] = []
        self._flush_scheduled = False
        self._busy = False
        self._answered_at_once = 0
        # In the pool: requests waiting for the running call to end.
        self._queued: list[_Waiting] = []
        self._in_pool = 0

    @property
    def merges(self) -> bool:
        """Whether this version's requests may share a call (no longer once its outputs did not split)."""
        return self._merging

    async def run(self, arrays: Arrays, *, pool: Executor) -> Arrays:
        """The runtime's outputs for ``arrays``, alone or as part of a merged call."""
        if self.cost.cheap:
            return await self._on_loop(arrays)
        return await self._in_pool_call(arrays, pool)

    # -- on the event loop ------------------------------------------------------------------------
    async def _on_loop(self, arrays: Arrays) -> Arrays:
        if not self._merging:
            return self.call(arrays, requests=1)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
            if not self._busy:
                # Requests came one per iteration lately: the first of this one runs at once, so a
                # lone request waits for nothing; later ones in the same iteration wait for its end.
                self._answered_at_once = 1
                return self.call(arrays, requests=1)
        found = shape_key(arrays)
        if found is None:
            return self.call(arrays, requests=1)
        waiting = _Waiting(arrays, found[1], found[0], asyncio.get_running_loop().create_future())
        self._held.append(waiting)
        self.queued += 1
        return await waiting.future

    def _flush(self) -> None:
        self._flush_scheduled = False
        held, self._held = self._held, []
        self._busy = self._answered_at_once + len(held) > 1
        self._answered_at_once = 0
        while held:
            batch, held = _take(held, self.max_batch_size)
            self._answer(batch, self._call_merged(batch))

    # -- in the thread pool ---------------------------------------------------------------------
    async def _in_pool_call(self, arrays: Arrays, pool: Executor) -> Arrays:
        loop = asyncio.get_running_loop()
        found = shape_key(arrays) if self._merging and self._in_pool else None
        if found is None:
            self._in_pool += 1
            try:
                return await loop.run_in_executor(pool, self.call, arrays, 1)
            finally:
                self._in_pool -= 1
                if self._queued and not self._in_pool:
                    self._dispatch(pool)
        waiting = _Waiting(arrays, found[1], found[0], loop.create_future(), loop.time())
        self._queued.append(waiting)
        self.queued += 1
        loop.call_later(self.max_wait_s, self._waited, waiting, pool)
        return await waiting.future

    def _waited(self, waiting: _Waiting, pool: Executor) -> None:
        """``waiting``'s wait is over: if it is still queued, it goes now, beside the running call."""
        if self._queued and self._queued[0] is waiting:
            self._dispatch(pool)

    def _dispatch(self, pool: Executor) -> None:
        """The first queued request and those that fit its call, merged, in the pool."""
        batch, self._queued = _take(self._queued, self.max_batch_size)
        self._in_pool += 1
        future = asyncio.get_running_loop().run_in_executor(pool, self._call_merged, batch)

        def done(_: object) -> None:
            self._in_pool -= 1
            self._answer(batch, None if future.cancelled() else future.result())
            if self._queued and not self._in_pool:
                self._dispatch(pool)

        future.add_done_callback(done)

    # -- calls ------------------------------------------------------------------------------------
    def call(self, arrays: Arrays, requests: int = 1) -> Arrays:
        """One runtime call, measured and counted (``requests``: how many it answers)."""
        self.calls += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.batch_requests.observe(requests)
            metrics.batch_rows.observe(next(iter(arrays.values())).shape[0] if arrays else 0)
        return self.cost.timed(self.runtime.predict, arrays)

    def _call_merged(self, batch: list[_Waiting]) -> list[Arrays | BaseException]:
        """Each request's outputs, or error: from one merged call, else from a call each."""
        if len(batch) > 1:
            names = list(batch[0].arrays)
            merged = {name: np.concatenate([w.arrays[name] for w in batch], axis=0) for name in names}
            try:
                outputs = {k: np.asarray(v) for k, v in self.call(merged, requests=len(batch)).items()}
                answers: list[Arrays | BaseException] = list(split(outputs, [w.rows for w in batch]))
                self.merged += len(batch)
                return answers
            except UnsplittableOutput as exc:
                self._merging = False
                log.warning("%s; this version's requests are no longer merged", exc)
            except Exception as exc:
                log.info("a merged call of %d requests failed (%s); running each alone", len(batch), exc)
        alone: list[Arrays | BaseException] = []
        for waiting in batch:
            try:
                alone.append(self.call(waiting.arrays, requests=1))
            except Exception as exc:
                alone.append(exc)
        return alone

    @staticmethod
    def _answer(batch: list[_Waiting], answers: list[Arrays | BaseException] | None) -> None:
        for index, waiting in enumerate(batch):
            if waiting.future.done():
                continue
            answer = answers[index] if answers is not None else RuntimeError("the merged call was cancelled")
            if isinstance(answer, BaseException):
                waiting.future.set_exception(answer)
            else:
                waiting.future.set_result(answer)


def _take(waiting: list[_Waiting], max_rows: int) -> tuple[list[_Waiting], list[_Waiting]]:
    """The first request and those after it that fit its call (same key, rows); and the rest, in order."""
    first = waiting[0]
    batch, rest = [first], []
    rows = first.rows
    for other in waiting[1:]:
        if other.key == first.key and rows + other.rows <= max_rows:
            batch.append(other)
            rows += other.rows
        else:
            rest.append(other)
    return batch, rest
