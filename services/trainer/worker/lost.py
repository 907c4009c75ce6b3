"""A pool process lost under a job: the worker's main process notes on the job why it died.

When the kernel's out-of-memory killer SIGKILLs the prefork pool process that trains a job, only the
worker's main process learns of it: billiard reports the exit as a ``WorkerLostError`` ("Worker exited
prematurely: signal 9 (SIGKILL) ..."), and Celery, with ``task_reject_on_worker_lost``, puts the
message back on the queue without firing ``task_failure``. The task's own :class:`Request` class sees
it first, so :func:`request_class` writes the reason on the job's row
(:func:`services.trainer.jobs.store.note_lost_worker`) before Celery requeues it: the next attempt logs
it, and the claim that gives up after ``max_attempts`` says it in the job's error.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from services.trainer.settings import TrainerSettings

log = logging.getLogger("shipyard.trainer.worker")

# billiard's human_status(): "signal 9 (SIGKILL)" or "exitcode 1".
_SIGNAL = re.compile(r"\bsignal (\d+)")
_EXITCODE = re.compile(r"\bexitcode (-?\d+)")


def lost_reason(exc: BaseException, pid: int | None) -> str:
    """Why the pool process (``pid``, where known) that ran a job is gone, from billiard's error."""
    from services.trainer.engines.child import killed_reason

    what = f"the worker's pool process{f' (pid {pid})' if pid else ''} running the job"
    text = str(exc)
    if (found := _SIGNAL.search(text)) is not None:
        return killed_reason(int(found.group(1)), what)
    if (found := _EXITCODE.search(text)) is not None:
        return f"{what} exited with status {found.group(1)} before the job ended"
    return f"{what} was lost ({text})"


def note_loss(settings: TrainerSettings, job_id: str, exc: BaseException, pid: int | None) -> None:
    """Write why the job's pool process died on its row; a database away only costs the note."""
    from services.trainer.jobs import store
    from services.trainer.worker.runner import database_for

    reason = lost_reason(exc, pid)
    log.warning("job %s: %s; its message goes back on the queue", job_id, reason)
    try:
        store.note_lost_worker(database=database_for(settings), job_id=job_id, reason=reason)
    except Exception as error:  # the requeue matters more than the note
        log.warning("could not note on job %s why its worker was lost: %s", job_id, error)


def request_class(settings: TrainerSettings) -> type[Request]:
    """The train task's Request class: Celery's, which also notes a lost pool process on the job."""

    class LostWorkerNotingRequest(Request):  # type: ignore[misc]
        def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
            exc = exc_info.exception
            if isinstance(exc, ExceptionWithTraceback):
                exc = exc.exc
            if isinstance(exc, WorkerLostError) and self.args:
                note_loss(settings, str(self.args[0]), exc, self.worker_pid)
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    return LostWorkerNotingRequest
