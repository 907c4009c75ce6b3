"""The prediction log: every answered request, written to the database off the request path.

Requests hand their record to a bounded queue; one writer thread drains it in batches. When the
database falls behind and the queue fills, requests wait for room rather than lose their record:
the monitor computes drift from this log, and a log that silently drops rows under load would
hide exactly the traffic worth watching. Closing the log writes everything still queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from sqlalchemy import insert

from shipyard_common.db import Database
from shipyard_common.errors import Unavailable
from shipyard_common.records import PredictionRecord

log = logging.getLogger("shipyard.serving.prediction_log")

_CLOSE = object()
# Attempts to write a batch while shutting down, before the rows are given up as lost.
_SHUTDOWN_WRITE_ATTEMPTS = 5


class PredictionLog:
    def __init__(
        self,
        database: Database,
        *,
        capacity: int,
        batch_size: int,
        flush_interval_s: float,
    ) -> None:
        self._database = database
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        # Held while putting, so that close() cannot slip its marker ahead of a record being added.
        self._accepting = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        self.written = 0

    def start(self) -> None:
        self._writer = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._writer.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def append(self, record: dict[str, Any]) -> None:
        """Queue one row of the ``predictions`` table; blocks while the queue is full."""
        with self._accepting:
            if self._closed:
                raise Unavailable("serving is shutting down and no longer logs predictions")
            self._queue.put(record)

    def close(self, timeout: float | None = 60) -> None:
        """Stop accepting records, write every queued one, and stop the writer."""
        # Set before taking the lock: a writer stuck retrying a dead database then gives up,
        # which frees room for a producer that holds the lock while it waits to put.
        self._closing.set()
        with self._accepting:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("the prediction log writer did not finish in %ss; %d rows unwritten",
                          timeout, self.pending())

    def _run(self) -> None:
        while True:
            batch, closing = self._next_batch()
            if batch:
                self._write(batch)
            if closing:
                return

    def _next_batch(self) -> tuple[list[dict[str, Any]], bool]:
        """Up to one batch: waits for a first record, then takes what is queued up to the flush time."""
        batch: list[dict[str, Any]] = []
        deadline: float | None = None
        while len(batch) < self._batch_size:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if item is _CLOSE:
                # Everything put before the marker is already out of the queue or in this batch.
                return batch, True
            batch.append(item)
            if deadline is None:
                deadline = time.monotonic() + self._flush_interval_s
        return batch, False

    def _write(self, batch: list[dict[str, Any]]) -> None:
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._database.session() as session:
                    session.execute(insert(PredictionRecord), batch)
                break
            except Exception as exc:
                if self._closing.is_set() and attempt >= _SHUTDOWN_WRITE_ATTEMPTS:
                    log.error("giving up on %d prediction log rows at shutdown: %s", len(batch), exc)
                    return
                # Keep the batch and retry: the queue fills meanwhile, and requests wait for room.
                log.warning("writing %d prediction log rows failed (%s); retrying in %.1fs",
                            len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.written += len(batch)
