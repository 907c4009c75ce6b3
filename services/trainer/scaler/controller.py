"""The control loop: each interval, count the queue's jobs, read the Deployment's replicas, decide, and
scale when the decision says so (logged with its reason).

A tick whose database or Kubernetes call fails changes nothing and is counted; the next interval tries
again. The idle clock (how long the workers have not all been needed) restarts whenever the replicas
change, by this scaler or anyone else, and whenever the jobs need every worker; a scale down waits
for it to reach the cooldown, so the first decisions after a start never remove a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.trainer.jobs.counts import active_jobs
from services.trainer.scaler.decision import Action, Decision, decide
from services.trainer.scaler.kube import KubernetesError, WorkerDeployment
from services.trainer.scaler.metrics import ScalerMetrics
from services.trainer.scaler.settings import ScalerSettings
from shipyard_common.db import Database
from shipyard_common.errors import ShipyardError

log = logging.getLogger("shipyard.trainer.scaler")


class Scaler:
    """One queue's jobs driving one worker Deployment's replicas; ``clock`` is monotonic seconds."""

    def __init__(
        self,
        settings: ScalerSettings,
        *,
        database: Database,
        deployment: WorkerDeployment,
        metrics: ScalerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.database = database
        self.deployment = deployment
        self.metrics = metrics
        self.clock = clock
        self._seen: int | None = None  # the replicas at the last tick, after its decision
        self._needed_at = 0.0  # when the replicas last changed or were last all needed

    def tick(self) -> Decision | None:
        """One decision, applied; None when the database or the Kubernetes API failed."""
        try:
            jobs = active_jobs(database=self.database, queue=self.settings.queue)
        except Exception as exc:  # any database failure: no count, no decision; the next tick retries
            self._failed("database", exc)
            return None
        try:
            current = self.deployment.replicas()
        except KubernetesError as exc:
            self._failed("kubernetes", exc)
            return None
        now = self.clock()
        if current != self._seen:  # a start, or someone else scaled: the idle clock starts again
            self._needed_at = now
        decision = decide(
            queued=jobs.queued, running=jobs.running, current=current,
            minimum=self.settings.min_replicas, maximum=self.settings.max_replicas,
            seconds_since_needed=now - self._needed_at, cooldown_s=self.settings.cooldown_s,
            jobs_per_replica=self.settings.jobs_per_replica,
        )
        if decision.action != Action.HOLD and not self._apply(decision):
            return None
        if decision.needed >= decision.replicas:
            self._needed_at = now
        self._seen = decision.replicas
        self.metrics.observe(queued=jobs.queued, running=jobs.running, current=current, decision=decision)
        log.debug("%s", decision.reason, extra={"queue": self.settings.queue, "replicas": decision.replicas})
        return decision

    def _apply(self, decision: Decision) -> bool:
        try:
            self.deployment.scale(decision.replicas)
        except KubernetesError as exc:
            self._failed("kubernetes", exc)
            return False
        log.info("deployment %s: %s", self.deployment.name, decision.reason,
                 extra={"queue": self.settings.queue, "replicas": decision.replicas,
                        "action": decision.action.value})
        return True

    def _failed(self, source: str, exc: Exception) -> None:
        self.metrics.failed(source)
        if isinstance(exc, ShipyardError):
            message = exc.message
        else:  # a driver's error: its first line says what failed, the rest is its SQL and parameters
            message = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        log.warning("no scaling decision this tick: %s", message, extra={"queue": self.settings.queue})

    def run(self, stop: threading.Event) -> None:
        """Tick every ``interval_s`` (from one tick's start to the next's) until ``stop`` is set."""
        interval = self.settings.interval_s
        while not stop.is_set():
            started = time.monotonic()
            self.tick()
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
