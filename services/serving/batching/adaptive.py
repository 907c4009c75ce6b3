"""One model version's requests, merged across concurrent requests of any protocol.

The one batcher: every request for a version goes through :meth:`Batcher.run` on the event loop,
and groups of requests are answered by the caller's ``handle`` (the data plane: one lease, one
runtime call through :meth:`Batcher.outputs`, one log append and one metrics update per group).

* **Where a group runs.** A version whose calls are cheap (:class:`~.callcost.CallCost`: a mean of
  at most 1 ms of CPU) answers on the event loop, where a thread hop would cost more than the
  call; a costly one (or a remote one: TF Serving) in the data plane's thread pool, so the loop
  keeps accepting requests meanwhile.
* **Idle: no added latency.** A request that finds its version idle is answered at once, alone.
* **Busy: merge.** On the loop, requests that arrive in the same event-loop iteration (uvloop
  hands the loop every connection that became readable together) wait for the end of that
  iteration (a ``call_soon``: no timer) and share one group. In the pool, requests that arrive
  while the version's group runs wait for it to end, then share the next; one that has waited
  ``max_wait_s`` goes at once, with those queued behind it, beside the running group.
* Requests merge only when their inputs agree beyond the batch axis (names, dtypes, shapes);
  groups hold at most ``max_batch_size`` rows; a larger request runs alone, unsplit. The merged
  outputs are split by each request's rows, so every caller gets exactly its own.
* **Failures stay with their request.** When a merged call fails, each of its requests runs again
  alone and gets its own answer or error. A version whose outputs turn out not to follow the batch
  is never merged again; so is one whose signature has no free batch dimension.

No thread of its own and nothing to close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from services.serving.batching.callcost import REMOTE_FORMATS, CallCost
from services.serving.runtimes.base import Runtime, Signature

log = logging.getLogger("shipyard.serving.batching")

Arrays = dict[str, np.ndarray]


class Item(Protocol):
    """A request as the batcher sees it."""

    def shape(self) -> tuple[Hashable, int] | None:
        """What a request must share with another to be merged with it (see :func:`shape_key`),
        and its row count; None: never merged."""


T = TypeVar("T", bound=Item)
R = TypeVar("R")

#: Answers a group of requests (``on_loop``: called on the event loop, which must not block): an
#: answer or an error per request, in order.
Handle = Callable[[list[T], bool], Sequence[R | BaseException]]


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
class _Waiting(Generic[T, R]):
    item: T
    rows: int
    #: Requests merge only when their keys are equal: same inputs, dtypes and shapes beyond axis 0.
    key: Hashable
    handle: Handle[T, R]
    future: asyncio.Future[R]


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
        self._held: list[_Waiting[Any, Any]] = []
        self._flush_scheduled = False
        self._busy = False
        self._answered_at_once = 0
        # In the pool: requests waiting for the running group to end.
        self._queued: list[_Waiting[Any, Any]] = []
        self._in_pool = 0

    @property
    def merges(self) -> bool:
        """Whether this version's requests may share a call (no longer once its outputs did not split)."""
        return self._merging

    async def run(self, item: T, *, handle: Handle[T, R], pool: Executor) -> R:
        """``item``'s answer from ``handle``: alone, or in a group with requests that came with it."""
        if self.cost.cheap:
            return await self._on_loop(item, handle)
        return await self._in_pool_group(item, handle, pool)

    # -- on the event loop ------------------------------------------------------------------------
    async def _on_loop(self, item: T, handle: Handle[T, R]) -> R:
        if self._merging:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
                if self._busy:
                    return await self._hold(item, handle)
                # Requests came one per iteration lately: the first of this one runs at once, so a
                # lone request waits for nothing; later ones in the same iteration wait for its end.
                self._answered_at_once = 1
            else:
                return await self._hold(item, handle)
        return _unwrap(handle([item], True)[0])

    async def _hold(self, item: T, handle: Handle[T, R]) -> R:
        found = item.shape()
        if found is None:
            return _unwrap(handle([item], True)[0])
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._held.append(_Waiting(item, found[1], found[0], handle, future))
        self.queued += 1
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        held, self._held = self._held, []
        self._busy = self._answered_at_once + len(held) > 1
        self._answered_at_once = 0
        while held:
            group, held = _take(held, self.max_batch_size)
            _answer(group, _handled(group, True))

    # -- in the thread pool ---------------------------------------------------------------------
    async def _in_pool_group(self, item: T, handle: Handle[T, R], pool: Executor) -> R:
        loop = asyncio.get_running_loop()
        found = item.shape() if self._merging and self._in_pool else None
        if found is None:
            self._in_pool += 1
            try:
                answers = await loop.run_in_executor(pool, handle, [item], False)
                return _unwrap(answers[0])
            finally:
                self._in_pool -= 1
                if self._queued and not self._in_pool:
                    self._dispatch(pool)
        future: asyncio.Future[R] = loop.create_future()
        waiting = _Waiting(item, found[1], found[0], handle, future)
        self._queued.append(waiting)
        self.queued += 1
        loop.call_later(self.max_wait_s, self._waited, waiting, pool)
        return await future

    def _waited(self, waiting: _Waiting[Any, Any], pool: Executor) -> None:
        """``waiting``'s wait is over: if it is still queued, it goes now, beside the running group."""
        if self._queued and self._queued[0] is waiting:
            self._dispatch(pool)

    def _dispatch(self, pool: Executor) -> None:
        """The first queued request and those that fit its group, answered together in the pool."""
        group, self._queued = _take(self._queued, self.max_batch_size)
        self._in_pool += 1
        future = asyncio.get_running_loop().run_in_executor(pool, _handled, group, False)

        def done(_: object) -> None:
            self._in_pool -= 1
            _answer(group, None if future.cancelled() else future.result())
            if self._queued and not self._in_pool:
                self._dispatch(pool)

        future.add_done_callback(done)

    # -- runtime calls ----------------------------------------------------------------------------
    def call(self, arrays: Arrays, requests: int = 1) -> Arrays:
        """One runtime call, measured and counted (``requests``: how many it answers)."""
        self.calls += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.batch_requests.observe(requests)
            metrics.batch_rows.observe(next(iter(arrays.values())).shape[0] if arrays else 0)
        return self.cost.timed(self.runtime.predict, arrays)

    def outputs(self, inputs: list[Arrays], *, merged: Arrays | None = None) -> list[Arrays | Exception]:
        """Each request's outputs, or error: from one merged call, else from a call each.

        ``merged``: all of ``inputs`` in one array each, when the caller already has them so.
        """
        if len(inputs) > 1:
            if merged is None:
                merged = {name: np.concatenate([arrays[name] for arrays in inputs], axis=0) for name in inputs[0]}
            try:
                outputs = {k: np.asarray(v) for k, v in self.call(merged, requests=len(inputs)).items()}
                answers: list[Arrays | Exception] = list(
                    split(outputs, [int(next(iter(arrays.values())).shape[0]) for arrays in inputs]))
                self.merged += len(inputs)
                return answers
            except UnsplittableOutput as exc:
                self._merging = False
                log.warning("%s; this version's requests are no longer merged", exc)
            except Exception as exc:
                log.info("a merged call of %d requests failed (%s); running each alone", len(inputs), exc)
        alone: list[Arrays | Exception] = []
        for arrays in inputs:
            try:
                alone.append(self.call(arrays, requests=1))
            except Exception as exc:
                alone.append(exc)
        return alone


def _unwrap(answer: R | BaseException) -> R:
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _handled(group: list[_Waiting[Any, R]], on_loop: bool) -> Sequence[R | BaseException]:
    """The group's answers from its handle; an error of the handle itself is every request's."""
    try:
        return group[0].handle([waiting.item for waiting in group], on_loop)
    except Exception as exc:
        log.exception("answering a group of %d requests failed", len(group))
        return [exc] * len(group)


def _answer(group: list[_Waiting[Any, R]], answers: Sequence[R | BaseException] | None) -> None:
    for index, waiting in enumerate(group):
        if waiting.future.done():
            continue
        answer = answers[index] if answers is not None else RuntimeError("the group's call was cancelled")
        if isinstance(answer, BaseException):
            waiting.future.set_exception(answer)
        else:
            waiting.future.set_result(answer)


def _take(
    waiting: list[_Waiting[Any, R]], max_rows: int
) -> tuple[list[_Waiting[Any, R]], list[_Waiting[Any, R]]]:
    """The first request and those after it that fit its group (same key and handle, rows); the rest."""
    first = waiting[0]
    group, rest = [first], []
    rows = first.rows
    for other in waiting[1:]:
        if other.key == first.key and other.handle == first.handle and rows + other.rows <= max_rows:
            group.append(other)
            rows += other.rows
        else:
            rest.append(other)
    return group, rest
