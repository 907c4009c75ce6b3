"""Adaptive batching: concurrent requests for one model version merged into one runtime call.

:class:`BatchingRuntime` wraps a loaded runtime and offers the same interface
(:class:`~services.serving.runtimes.base.Runtime`), so the data plane is unchanged. Its policy:

* **Idle: no added latency.** A request that finds no runtime call of its version running and
  nobody queued runs at once, on its own (request) thread.
* **Busy: batch.** Otherwise it joins a queue. One worker thread per loaded version takes the
  first queued request and, while another call of the version is still running, keeps collecting
  requests until ``max_batch_size`` rows are queued or the first one has waited ``max_wait_s``;
  as soon as no call is running it goes with what it has. Requests whose inputs differ beyond
  the batch axis (another sequence length, say) never share a call; a request larger than
  ``max_batch_size`` runs alone, unsplit.
* The merged call's outputs are split by each request's row count, so every caller gets exactly
  its own rows.
* **Failures stay with their request.** When a merged call fails, each of its requests is run
  again on its own and gets its own answer or error: one request whose values the model cannot
  take (a token id beyond the vocabulary passes validation) must not fail the requests that
  happened to share its call. The cost, a second call per request, is paid only when a merged
  call fails.
* A model whose signature has no free batch dimension, or whose outputs turn out not to follow
  the batch, is never merged.
* ``close()`` answers every queued request (none is dropped), stops the worker, waits for the
  calls still running, then closes the wrapped runtime.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class _Request:
    arrays: Arrays
    rows: int
    #: Requests merge only when their keys are equal: same inputs, dtypes and shapes beyond axis 0.
    key: Hashable
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Arrays] = field(default_factory=Future)


def _shape_key(arrays: Arrays) -> tuple[Hashable, int] | None:
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


class BatchingRuntime:
    """A :class:`Runtime` that merges concurrent ``predict`` calls into one call of ``runtime``."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "model",
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.format = runtime.format
        self.platform = runtime.platform
        self.signature = runtime.signature
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        #: CPU cost of one call of the wrapped runtime (the fast lane runs cheap ones inline).
        self.cost = CallCost(remote=runtime.format in REMOTE_FORMATS)
        #: Runtime calls made on request threads and by the worker, merged or not (see ``calls``).
        self.thread_calls = 0
        #: Runtime calls made by :meth:`predict_now` (the event loop thread's own counter).
        self.inline_calls = 0
        #: Requests that waited in the queue rather than running at once.
        self.queued = 0
        self._calls_lock = threading.Lock()
        self._merging = True
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._running = 0
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def calls(self) -> int:
        """Runtime calls made, merged or not: what the tests compare with the requests answered."""
        return self.thread_calls + self.inline_calls

    # -- the Runtime interface -----------------------------------------------------------------
    def predict(self, arrays: Arrays) -> Arrays:
        found = _shape_key(arrays) if self._merging else None
        with self._cond:
            inline = found is None or self._closed or (self._running == 0 and not self._queue)
            if inline:
                self._running += 1
            else:
                assert found is not None
                key, rows = found
                request = _Request(arrays=arrays, rows=rows, key=key)
                self._queue.append(request)
                self.queued += 1
                self._cond.notify_all()
        if not inline:
            return request.future.result()
        try:
            return self._call(arrays, requests=1)
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def predict_now(self, arrays: Arrays) -> Arrays:
        """Run ``arrays`` alone at once, never queued: for the event loop thread, which must not block.

        Only for cheap calls, which merging would not speed up; it may overlap a merged call. Not
        counted in ``_running``: such a call ends within a millisecond, its caller holds the
        version's lease (the runtime is closed only once every lease is given back), and the
        merging worker need not wait for it. Only the event loop thread calls it, so its counter
        has one writer and needs no lock.
        """
        self.inline_calls += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.batch_requests.observe(1)
            metrics.batch_rows.observe(next(iter(arrays.values())).shape[0] if arrays else 0)
        return self.cost.timed(self.runtime.predict, arrays)

    @property
    def merges(self) -> bool:
        """Whether this version's requests may share a call (no longer once its outputs did not split)."""
        return self._merging

    def predict_merged_now(self, arrays: Arrays, rows: list[int]) -> list[Arrays] | None:
        """Run requests merged by the caller (``rows`` each, in order) in one call now: each one's outputs.

        For the event loop, which merges the cheap requests that arrived together (fastlane.py);
        as :meth:`predict_now`, never queued. None when the outputs do not follow the batch: this
        version's requests are no longer merged, and the caller runs each alone. A failed call
        raises; the caller then runs each request alone, so that failures stay with their request.
        """
        self.inline_calls += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.batch_requests.observe(len(rows))
            metrics.batch_rows.observe(next(iter(arrays.values())).shape[0] if arrays else 0)
        outputs = self.cost.timed(self.runtime.predict, arrays)
        try:
            return self._split(outputs, rows)
        except UnsplittableOutput as exc:
            self._merging = False
            log.warning("%s; this version's requests are no longer merged", exc)
            return None

    def close(self, timeout: float = 60) -> None:
        """Answer every queued request, stop the worker, then close the wrapped runtime."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        self._worker.join(timeout)
        with self._cond:
            # Calls made on request threads: the wrapped runtime stays open until they are done.
            while self._running and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
        if self._worker.is_alive() or self._running:
            log.warning("closing a %s runtime with calls still running after %ss", self.format, timeout)
        self.runtime.close()

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed, and every queued request answered
                batch = self._collect()
                self._running += 1
            try:
                self._run(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _collect(self) -> list[_Request]:
        """The next batch; called holding the lock, with at least one request queued."""
        first = self._queue.popleft()
        batch = [first]
        rows = first.rows
        deadline = first.enqueued + self.max_wait_s
        while rows < self.max_batch_size:
            rows = self._take(batch, rows)
            # Wait only while another call runs: its end, a full batch or the deadline ends the wait.
            if rows >= self.max_batch_size or self._closed or self._running == 0:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return batch

    def _take(self, batch: list[_Request], rows: int) -> int:
        """Move the queued requests that fit ``batch`` into it, keeping the others in order."""
        key = batch[0].key
        kept: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            if request.key == key and rows + request.rows <= self.max_batch_size:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._queue = kept
        return rows

    def _run(self, batch: list[_Request]) -> None:
        if len(batch) > 1:
            names = list(batch[0].arrays)
            merged = {name: np.concatenate([r.arrays[name] for r in batch], axis=0) for name in names}
            try:
                answers = self._split(self._call(merged, requests=len(batch)), [r.rows for r in batch])
            except Exception as exc:
                if isinstance(exc, UnsplittableOutput):
                    self._merging = False
                    log.warning("%s; this version's requests are no longer merged", exc)
                else:
                    log.info("a merged call of %d requests failed (%s); running each alone",
                             len(batch), exc)
            else:
                for request, answer in zip(batch, answers, strict=True):
                    request.future.set_result(answer)
                return
        for request in batch:
            try:
                request.future.set_result(self._call(request.arrays, requests=1))
            except Exception as exc:
                request.future.set_exception(exc)

    def _call(self, arrays: Arrays, *, requests: int) -> Arrays:
        with self._calls_lock:
            self.thread_calls += 1
        if self.metrics is not None:
            self.metrics.batch_requests.observe(requests)
            self.metrics.batch_rows.observe(next(iter(arrays.values())).shape[0] if arrays else 0)
        return self.cost.timed(self.runtime.predict, arrays)

    @staticmethod
    def _split(outputs: Arrays, rows: list[int]) -> list[Arrays]:
        total = sum(rows)
        for name, value in outputs.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != total:
                raise UnsplittableOutput(
                    f"output {name!r} has shape {list(value.shape)} for a merged call of {total} rows"
                )
        answers: list[Arrays] = []
        start = 0
        for count in rows:
            end = start + count
            answers.append({name: np.asarray(value)[start:end] for name, value in outputs.items()})
            start = end
        return answers

