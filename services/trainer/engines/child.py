"""Training in a child process (Keras, torchrun), reported to the job as if it ran in-process.

The child writes one JSON event per line to stdout, prefixed with :data:`EVENT_PREFIX`; every
other line is its own log output and goes to the job's log. Events:

- ``{"event": "plan", "steps": n}`` → ``context.plan(n)``
- ``{"event": "step", "epoch": e, "step": s}`` / ``{"event": "epoch", "epoch": e, "step": s,
  "metrics": {…}}`` → ``context.observer``
- ``{"event": "checkpoint"}`` → ``context.checkpoint_saved()`` (files already in checkpoint_dir)
- ``{"event": "failed", "message": "…"}`` → :class:`TrainingFailed` with that message
- ``{"event": "result", "path": "…"}`` → the JSON file the parent reads once the child exits 0

A child killed by a signal fails the job with :func:`killed_reason` (SIGKILL: the out-of-memory killer,
most likely). If the observer raises (the job was cancelled or taken over), the child's whole process group
is killed and the exception goes on up: no orphan keeps a GPU busy after a cancel.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.trainer.engines.types import FitContext, TrainingFailed

log = logging.getLogger("shipyard.trainer.child")

EVENT_PREFIX = "@@shipyard-event "


def emit(event: str, **fields: Any) -> None:
    """In the child: report one event to the parent."""
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run(
    command: Sequence[str], *, context: FitContext, env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run ``command``, relay its events to ``context``; return the JSON of its ``result`` event."""
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
    )
    failure: str | None = None
    result_path: str | None = None
    tail: list[str] = []
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            if not line.startswith(EVENT_PREFIX):
                tail = [*tail[-19:], line]
                if line.strip():
                    log.info("%s", line[:2000])
                continue
            event = json.loads(line[len(EVENT_PREFIX):])
            kind = event["event"]
            if kind == "plan":
                context.plan(int(event["steps"]))
            elif kind == "step":
                context.observer(int(event["epoch"]), int(event["step"]), None)
            elif kind == "epoch":
                context.observer(int(event["epoch"]), int(event["step"]), dict(event["metrics"]))
            elif kind == "checkpoint":
                context.checkpoint_saved()
            elif kind == "failed":
                failure = str(event["message"])
            elif kind == "result":
                result_path = str(event["path"])
    except BaseException:
        _kill(process)
        raise
    finally:
        process.stdout.close()
    code = process.wait()
    if failure is not None:
        raise TrainingFailed(failure)
    shown = "\n".join(tail[-10:])
    if code < 0:
        what = f"the training process (pid {process.pid})"
        raise TrainingFailed(f"{killed_reason(-code, what)}; its last output:\n{shown}")
    if code != 0 or result_path is None:
        raise TrainingFailed(f"the training process exited with status {code} without a result:\n{shown}")
    result: dict[str, Any] = json.loads(Path(result_path).read_text())
    return result


def killed_reason(signum: int, what: str) -> str:
    """Why ``what`` (a process that ran the job) is gone after signal ``signum``, as the job says it.

    SIGKILL cannot be caught, and nothing in Shipyard sends it to a training process but a cancel, so
    it is most likely the kernel's out-of-memory killer (or a container's memory limit): say so, and
    where to confirm it.
    """
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    reason = f"{what} was killed by signal {signum} ({name})"
    if signum == signal.SIGKILL:
        reason += ("; the kernel's out-of-memory killer is the usual cause: check `dmesg` on the node "
                   "(\"Out of memory: Killed process\") or the container's memory limit (OOMKilled), "
                   "and give the job more memory or a smaller batch_size")
    return reason


def _kill(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Reap it off the caller's path: the caller is unwinding a cancel and should not wait.
    threading.Thread(target=process.wait, daemon=True).start()
