"""The trainer's job metrics, on the API's ``/metrics``.

Job metrics are read from the platform database when Prometheus scrapes, not counted in a process:
the database is the record, jobs are submitted by one process and run by others, and a count kept in
memory would be lost with its process. Two grouped queries a scrape:

- ``shipyard_training_jobs{queue,state}``: jobs in each state now (queued: the queue depth; running);
- ``shipyard_training_queued_oldest_age_seconds{queue}``: how long the oldest queued job has waited
  (0 with none), the backlog alert's measure;
- ``shipyard_training_jobs_finished_total{queue,state}``: jobs that ended succeeded, failed or
  cancelled (the number of such rows);
- ``shipyard_training_job_duration_seconds{queue,state}``: how long ended jobs ran, from a worker
  starting them (their first log line, which the worker writes when it claims the job) to their
  end (the row's last update). Jobs that never ran (cancelled while queued) have no duration.

Every (queue, state) series is present, at 0 when nothing is there, so that ``increase()`` sees the
first failure. ``shipyard_training_queue_messages{queue}`` is what waits on the Celery queue in
Redis (its lists' lengths), left out while Redis does not answer.

The worker's own ``/metrics`` (alive, GPUs) is :mod:`services.trainer.worker.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.sql import extract

from services.trainer.jobs.queues import waiting_keys
from services.trainer.jobs.schemas import TERMINAL_STATES, JobState
from services.trainer.jobs.schemas import Queue as QueueName
from services.trainer.jobs.tables import JobLogRecord, JobRecord
from services.trainer.settings import TrainerSettings
from shipyard_common.db import Database, utcnow

log = logging.getLogger("shipyard.trainer.metrics")

# From a smoke test's seconds to a day's training.
DURATION_BUCKETS = (
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)
QUEUES = tuple(q.value for q in QueueName)
ENDED = tuple(sorted(s.value for s in TERMINAL_STATES))
WAITING = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class StateCount:
    queue: str
    state: str
    jobs: int
    oldest: datetime | None


@dataclass(frozen=True)
class Durations:
    """One (queue, state)'s ended jobs: how many, their seconds in all, how many took at most each bucket."""

    jobs: int
    seconds: float
    at_most: tuple[int, ...]


def _queue_of_job() -> ColumnElement[str]:
    return func.coalesce(JobRecord.spec[("resources", "queue")].as_string(), QueueName.CPU.value)


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[float]:
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return cast(ColumnElement[float], extract("epoch", end - start))


def state_counts(database: Database) -> list[StateCount]:
    queue = _queue_of_job().label("queue")
    statement = select(queue, JobRecord.state, func.count(), func.min(JobRecord.created_at)).group_by(
        queue, JobRecord.state
    )
    with database.session() as session:
        return [StateCount(str(q), str(s), int(n), oldest) for q, s, n, oldest in session.execute(statement)]


def ended_durations(database: Database) -> dict[tuple[str, str], Durations]:
    """Durations of ended jobs by (queue, state), bucketed in the database: no row leaves it."""
    started = JobLogRecord.created_at
    seconds = _seconds_between(database.engine.dialect.name, started, JobRecord.updated_at)
    queue = _queue_of_job().label("queue")
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    statement = (
        select(queue, JobRecord.state, func.count(), func.sum(seconds), *buckets)
        .join(JobLogRecord, and_(JobLogRecord.job_id == JobRecord.id, JobLogRecord.line == 1))
        .where(JobRecord.state.in_(ENDED))
        .group_by(queue, JobRecord.state)
    )
    with database.session() as session:
        rows = list(session.execute(statement))
    return {(str(row[0]), str(row[1])): _durations(row) for row in rows}


def _durations(row: Sequence[Any]) -> Durations:
    return Durations(int(row[2]), float(row[3] or 0.0), tuple(int(n or 0) for n in row[4:]))


def broker_messages(redis_url: str, queue_names: dict[str, str]) -> dict[str, int]:
    """Messages waiting on each Celery queue (``queue_names``: spec queue → Redis list), all priorities."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        found = {}
        for queue, name in queue_names.items():
            keys = waiting_keys(name)
            found[queue] = sum(int(client.llen(key)) for key in keys)
        return found
    finally:
        client.close()


class JobCollector(Collector):
    """The job metrics above, read from the database (and Redis) at each scrape."""

    def __init__(self, database: Database, settings: TrainerSettings) -> None:
        self.database = database
        self.settings = settings

    def describe(self) -> list[Metric]:
        # Nothing is read when the collector is registered; the families appear at the first scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        counts = state_counts(self.database)
        yield from self._state_families(counts)
        yield self._duration_family(ended_durations(self.database))
        broker = self._broker_family()
        if broker is not None:
            yield broker

    def _state_families(self, counts: Sequence[StateCount]) -> Iterator[Metric]:
        by_key = {(c.queue, c.state): c for c in counts}
        jobs = GaugeMetricFamily("shipyard_training_jobs", "Training jobs queued or running now",
                                 labels=["queue", "state"])
        oldest = GaugeMetricFamily("shipyard_training_queued_oldest_age_seconds",
                                   "How long the oldest queued job has waited (0 with none queued)",
                                   labels=["queue"])
        finished = CounterMetricFamily("shipyard_training_jobs_finished",
                                       "Training jobs that ended, by final state", labels=["queue", "state"])
        now = utcnow()
        for queue in QUEUES:
            for state in WAITING:
                jobs.add_metric([queue, state], _jobs(by_key.get((queue, state))))
            queued = by_key.get((queue, JobState.QUEUED.value))
            age = (now - queued.oldest).total_seconds() if queued and queued.oldest else 0.0
            oldest.add_metric([queue], max(age, 0.0))
            for state in ENDED:
                finished.add_metric([queue, state], _jobs(by_key.get((queue, state))))
        return iter((jobs, oldest, finished))

    def _duration_family(self, durations: dict[tuple[str, str], Durations]) -> Metric:
        family = HistogramMetricFamily(
            "shipyard_training_job_duration_seconds",
            "How long ended training jobs ran, from a worker starting them to their end",
            labels=["queue", "state"],
        )
        empty = Durations(0, 0.0, tuple(0 for _ in DURATION_BUCKETS))
        for queue in QUEUES:
            for state in ENDED:
                found = durations.get((queue, state), empty)
                pairs = zip(DURATION_BUCKETS, found.at_most, strict=True)
                buckets = [(str(bound), float(n)) for bound, n in pairs]  # le="5.0", as prometheus_client
                buckets.append(("+Inf", float(found.jobs)))
                family.add_metric([queue, state], buckets, found.seconds)
        return family

    def _broker_family(self) -> Metric | None:
        names = {queue: self.settings.queue_name(queue) for queue in QUEUES}
        try:
            waiting = broker_messages(self.settings.platform.redis_url, names)
        except redis.RedisError as exc:
            log.warning("queue lengths left out of /metrics: Redis did not answer: %s", exc)
            return None
        family = GaugeMetricFamily("shipyard_training_queue_messages",
                                   "Job messages waiting on each Celery queue in Redis", labels=["queue"])
        for queue, count in waiting.items():
            family.add_metric([queue], count)
        return family


def _jobs(found: StateCount | None) -> int:
    return found.jobs if found else 0
