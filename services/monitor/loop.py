"""The monitor's background loop: windows are closed and scored here, never for a request.

Each pass, in order: close the windows that are due and compute their drift and quality
(:mod:`~services.monitor.windows`), join new ground truth and re-score the windows it falls in
(:mod:`~services.monitor.feedback`), then check every retraining policy and follow the retrainings
that run (:mod:`~services.monitor.retraining`). A step that fails is logged and counted; the next
step and the next pass still run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.monitor.context import Monitor
from services.monitor.feedback.service import score_feedback
from services.monitor.retraining.service import check_policies, follow_triggers
from services.monitor.windows.service import close_due_windows

log = logging.getLogger("shipyard.monitor")

Step = Callable[..., object]
STEPS: tuple[Step, ...] = (close_due_windows, score_feedback, check_policies, follow_triggers)


def run_pass(*, monitor: Monitor) -> None:
    """One pass of every step (tests call this to get a deterministic pass)."""
    for step in STEPS:
        if monitor.stop.is_set():
            return
        try:
            step(monitor=monitor)
        except Exception:  # a database outage must not end the loop for good
            log.exception("monitor step %s failed", step.__name__)


class Loop:
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.thread = threading.Thread(target=self._run, name="monitor-loop", daemon=True)

    def start(self) -> None:
        self.monitor.stop.clear()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.monitor.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while not self.monitor.stop.is_set():
            run_pass(monitor=self.monitor)
            self.monitor.stop.wait(self.monitor.settings.loop_interval_s)
