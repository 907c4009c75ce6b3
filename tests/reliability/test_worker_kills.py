"""``kill -9`` of Celery workers mid-training, ten times over a run of jobs: every job finishes once.

Real parts: the trainer's API (uvicorn, in this process: its reconciler runs too), two worker
processes (``python -m services.trainer.worker``), a Redis server of this module's own, the session's
PostgreSQL and MLflow. A killer thread SIGKILLs the process group of a worker that is training (an epoch
or more done, more to go) and starts a new worker at once, as a supervisor would, ten times.

Exactly once means: every job succeeded; each has one MLflow run and one registered version; its
``attempts`` is one plus the kills that hit it, and every start in the workers' logs but the last one
of each job belongs to a worker that was killed while it held that job (no job ever ran on two
workers at once, nor was claimed without being run).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer
from sqlalchemy import update

from services.trainer.api import service
from services.trainer.app import create_app
from services.trainer.jobs import store
from services.trainer.jobs.schemas import JobCreate, JobState
from services.trainer.jobs.tables import JobRecord
from services.trainer.settings import TrainerSettings
from shipyard_cli.stack import Stack
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import TAG_JOB_ID
from tests.services.trainer.support import WorkerProcess, job_spec
from tests.support import auth, free_port, running_app, stop_process_group, test_platform, wait_for

pytestmark = pytest.mark.reliability

JOBS = 5
KILLS = 10
EPOCHS = 15
# The run of jobs, ten kills included, ends within this. Each kill costs the new worker's imports of
# torch and MLflow before its first epoch (10 to 19 s each with other suites on the two cores): the run
# took 140 s at a load of 5 to 7 there.
RUN_BOUND_S = 420
# Between two kills: the workers get on with the jobs meanwhile.
KILL_GAP_S = 1.0
STARTED = re.compile(r"job ([0-9a-f-]{36}) started")
EPOCH_DONE = re.compile(r"epoch \d+/\d+: ")
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for this module alone: no other session's flush takes its messages."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    stack = Stack(test_platform(tmp_path_factory.mktemp("kills-redis"), redis_url=url))
    component = stack.redis_component()
    assert component is not None, f"something already answers at {url}"
    record = stack.start_component(component)
    try:
        stack.wait_ready(record, timeout=20)
        yield url
    finally:
        stop_process_group(record.pid, timeout=10)


def settings_for(platform: Any) -> TrainerSettings:
    """Quick takeover of a killed worker's job, and never of a live one.

    A job's row is stale after ``stale_after_s`` (4 s) of silence, which a live worker never lets
    happen (its heartbeat touches the row every second); the API's reconciler, every second, sends a
    stale job again although the killed worker's message is still held unacknowledged: the broker
    would give that back only after ``visibility_timeout_s``, an hour here as in production (6 h), far
    beyond this test. ``max_attempts`` leaves room for every kill to hit one job.
    """
    return TrainerSettings(
        platform=platform, queue_prefix=f"kills-{uuid.uuid4().hex[:8]}-", stale_after_s=4,
        visibility_timeout_s=3600, max_attempts=KILLS + 2, reconcile_interval_s=1, lost_after_s=5,
    )


@dataclass
class Workers:
    """The running workers, started and killed by the killer; every one ever started is kept."""

    settings: TrainerSettings
    folder: Path
    all: list[WorkerProcess] = field(default_factory=list)
    live: list[WorkerProcess] = field(default_factory=list)

    def start(self) -> WorkerProcess:
        worker = WorkerProcess(self.settings, self.folder / f"worker-{len(self.all)}.log")
        self.all.append(worker)
        self.live.append(worker)
        return worker

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL the worker's process group (the Celery parent and its pool child), as a crash would."""
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)
        self.live.remove(worker)

    def starts(self, worker: WorkerProcess) -> list[str]:
        return STARTED.findall(worker.log_path.read_text(errors="replace"))

    def training(self, worker: WorkerProcess) -> bool:
        """Whether the worker has finished an epoch of the job it started last (it trains it now)."""
        text = worker.log_path.read_text(errors="replace")
        last = list(STARTED.finditer(text))
        return bool(last) and EPOCH_DONE.search(text, last[-1].end()) is not None

    def stop(self) -> None:
        for worker in self.live:
            worker.stop()


class Killer(threading.Thread):
    """Kills a training worker every :data:`KILL_GAP_S` or so until :data:`KILLS` kills hit a job
    mid-training; each kill is followed at once by a new worker."""

    def __init__(self, workers: Workers, database: Database, jobs: list[str]) -> None:
        super().__init__(name="killer", daemon=True)
        self.workers, self.database, self.jobs = workers, database, jobs
        self.hits: list[tuple[int, str]] = []  # (index of the worker killed, the job it held)
        self.misses = 0  # kills that landed just after the job ended
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while len(self.hits) < KILLS and not self.stop.wait(0.1):
                target = self.target()
                if target is not None:
                    self.kill(*target)
                    self.stop.wait(KILL_GAP_S)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def rows(self) -> dict[str, JobRecord]:
        with self.database.session() as session:
            return {row.id: row for row in session.query(JobRecord).filter(JobRecord.id.in_(self.jobs))}

    def target(self) -> tuple[WorkerProcess, str] | None:
        """A live worker and the job it trains now (the last it started, an epoch of it done by this
        worker, more to go, and no later claim of it elsewhere), or None."""
        rows = self.rows()
        claims = Counter(job for worker in self.workers.all for job in self.workers.starts(worker))
        for worker in list(self.workers.live):
            started = self.workers.starts(worker)
            if not started or not self.workers.training(worker):
                continue
            row = rows[started[-1]]
            epoch = int((row.progress or {}).get("epoch") or 0)
            if row.state == "running" and 1 <= epoch < EPOCHS - 1 and row.attempts == claims[row.id]:
                return worker, row.id
        return None

    def kill(self, worker: WorkerProcess, job_id: str) -> None:
        self.workers.kill(worker)
        self.workers.start()
        if self.rows()[job_id].state == "running":
            self.hits.append((self.workers.all.index(worker), job_id))
        else:
            self.misses += 1



def test_a_silent_running_job_is_sent_again_though_its_lost_workers_message_is_still_held(tmp_path: Path):
    """The reconciler's rule (``store.requeue_lost_jobs`` with ``waiting``): a running job whose row went
    silent is sent again even while a killed worker's message for it sits unacknowledged; not while a
    message for it waits in a queue, nor while its row is fresh (a live worker's heartbeat)."""
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.create_tables()
    spec = JobCreate.model_validate(job_spec(rev="0123456789abcdef0123456789abcdef01234567"))
    held, waiting, fresh = (service.create_job(database=database, spec=spec, enqueue=lambda *_: None).id
                            for _ in range(3))
    for job_id in (held, waiting, fresh):
        claim = store.claim_job(database=database, job_id=job_id, stale_after_s=4, max_attempts=3)
        assert claim == store.Claim.CLAIMED
    with database.session() as session:
        session.execute(update(JobRecord).where(JobRecord.id.in_([held, waiting]))
                        .values(updated_at=utcnow() - timedelta(seconds=10)))
    sent: list[str] = []

    def requeue(**rule: Any) -> int:
        return store.requeue_lost_jobs(database=database, enqueue=lambda job_id, _: sent.append(job_id),
                                       on_broker=lambda: {held, waiting, fresh}, lost_after_s=5,
                                       stale_after_s=4, **rule)

    assert requeue() == 0  # without the rule, a held message is taken for a live one
    assert requeue(waiting=lambda: {waiting}) == 1 and sent == [held]
    database.dispose()



def test_a_worker_whose_job_was_taken_over_finds_its_writes_refused(tmp_path: Path):
    """The fence (``store.fenced``): after a takeover (a stale row claimed again), the first worker's
    writes, heartbeat included, change nothing, so it stops at its next one; the new worker's apply."""
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.create_tables()
    spec = JobCreate.model_validate(job_spec(rev="0123456789abcdef0123456789abcdef01234567"))
    job_id = service.create_job(database=database, spec=spec, enqueue=lambda *_: None).id

    def claim() -> int:
        assert store.claim_job(database=database, job_id=job_id, stale_after_s=4,
                               max_attempts=3) == store.Claim.CLAIMED
        return store.attempt_of(database=database, job_id=job_id)

    first = claim()
    with database.session() as session:  # its worker went silent
        session.execute(update(JobRecord).where(JobRecord.id == job_id)
                        .values(updated_at=utcnow() - timedelta(seconds=10)))
    second = claim()
    assert (first, second) == (1, 2)
    running = JobState.RUNNING
    with store.fenced(job_id, first):
        assert not store.update_job(database=database, job_id=job_id, expect_state=running, metrics={"a": 1})
        assert not store.set_detail(database=database, job_id=job_id, detail="waiting")
    with store.fenced(job_id, second):
        assert store.update_job(database=database, job_id=job_id, expect_state=running, metrics={"a": 2})
    assert store.get_job(database=database, job_id=job_id).metrics == {"a": 2}
    database.dispose()


def test_ten_kill_9s_of_workers_mid_training_and_every_job_finishes_exactly_once(
    tmp_path: Path, own_redis: str, postgres_url: str, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers and the API share two cores
    platform = test_platform(tmp_path / "state", redis_url=own_redis, db_url=postgres_url,
                             mlflow_tracking_uri=mlflow_server)
    settings = settings_for(platform)
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "breast_cancer", load_breast_cancer(as_frame=True).frame).rev
    database = Database(postgres_url)
    workers = Workers(settings, tmp_path)
    started = time.monotonic()
    try:
        with running_app(create_app(settings)) as base:
            for _ in range(2):
                workers.start()
            jobs = submit_jobs(base, rev)
            killer = Killer(workers, database, list(jobs))
            killer.start()
            finished = wait_for_jobs(base, jobs, killer, workers)
            took = time.monotonic() - started
    finally:
        workers.stop()
        database.dispose()

    assert len(killer.hits) == KILLS, (killer.hits, killer.misses)
    check_exactly_once(jobs, finished, killer.hits, workers, mlflow_server, postgres_url)
    print(f"{JOBS} jobs, {KILLS} kills ({killer.misses} more just missed), {len(workers.all)} workers: "
          f"{took:.0f} s")


def submit_jobs(base: str, rev: str) -> dict[str, str]:
    """Submit :data:`JOBS` small jobs (a few seconds each); job id → model name (one model per job)."""
    jobs: dict[str, str] = {}
    for _ in range(JOBS):
        model_name = f"kills-{uuid.uuid4().hex[:8]}"
        spec = {
            "model_name": model_name, "framework": "pytorch", "model": {"type": "mlp", "hidden": [16]},
            "data": {"dataset": "breast_cancer", "rev": rev, "task": "classification", "target": "target",
                     "features": None, "validation_split": 0.2},
            "training": {"epochs": EPOCHS, "batch_size": 32, "learning_rate": 0.01, "optimizer": "adam",
                         "seed": 0},
            "resources": {"queue": "cpu"}, "exports": ["onnx"],
        }
        created = httpx.post(f"{base}/jobs", json=spec, headers=auth("trainer"), timeout=30)
        assert created.status_code == 201, created.text
        jobs[created.json()["id"]] = model_name
    return jobs


def wait_for_jobs(base: str, jobs: dict[str, str], killer: Killer, workers: Workers) -> dict[str, Any]:
    """Every job once all have ended and the killer is done; fails after :data:`RUN_BOUND_S`."""

    def get(job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{base}/jobs/{job_id}", headers=auth("viewer"), timeout=30).json())

    def done() -> dict[str, Any] | None:
        if killer.error is not None:
            raise AssertionError(f"the killer failed: {killer.error!r}")
        found = {job_id: get(job_id) for job_id in jobs}
        if not all(job["state"] in TERMINAL for job in found.values()):
            return None
        killer.stop.set()  # all ended: nothing is left to kill (the count of kills says if too soon)
        killer.join(timeout=10)
        return found

    try:
        return dict(wait_for(done, timeout=RUN_BOUND_S, interval=1.0, what="every job to end"))
    except AssertionError as exc:
        killer.stop.set()
        states = Counter(get(job_id)["state"] for job_id in jobs)
        tails = "\n".join(f"--- {w.log_path.name}\n{w.log_tail(15)}" for w in workers.all[-3:])
        raise AssertionError(f"{exc}\nkills: {len(killer.hits)} hits, {killer.misses} misses; "
                             f"jobs: {dict(states)}\n{tails}") from None


def check_exactly_once(
    jobs: dict[str, str], finished: dict[str, Any], hits: list[tuple[int, str]], workers: Workers,
    mlflow_uri: str, database_url: str,
) -> None:
    """Each job: succeeded, one run and one version, attempts = 1 + its kills, and every start but its
    last made by a worker killed while it held the job."""
    logs = {index: workers.starts(worker) for index, worker in enumerate(workers.all)}
    database = Database(database_url)
    with database.session() as session:
        attempts = {row.id: row.attempts for row in session.query(JobRecord).filter(JobRecord.id.in_(jobs))}
    database.dispose()
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    hit_count = Counter(job_id for _, job_id in hits)
    # A kill in the middle of a checkpoint's upload leaves a torn file: that job trains from epoch 1
    # again (services.trainer.engines.resume), on the same run; otherwise each resumes where it was.
    torn = any("training starts at epoch 1" in w.log_path.read_text(errors="replace") for w in workers.all)
    for job_id, model_name in jobs.items():
        job = finished[job_id]
        assert job["state"] == "succeeded", (job_id, job["error"])
        assert attempts[job_id] == 1 + hit_count[job_id], (job_id, attempts[job_id], hits)
        starts = [(index, started) for index, lines in logs.items() for started in lines if started == job_id]
        assert len(starts) == attempts[job_id], (job_id, starts)
        # Every worker that started it, but the one that finished it, was killed holding it.
        finisher = [index for index, _ in starts if (index, job_id) not in hits]
        assert len(finisher) == 1 and Counter(starts) - Counter({(finisher[0], job_id): 1}) == Counter(
            (index, j) for index, j in hits if j == job_id), (job_id, starts, hits)
        versions = client.search_model_versions(f"tags.`{TAG_JOB_ID}` = '{job_id}'")
        assert [(v.name, v.version) for v in versions] == [(model_name, "1")], job_id
        assert job["model_version"] == "1"
        experiment = client.get_experiment_by_name(model_name)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        assert [run.info.run_id for run in runs] == [job["mlflow_run_id"]], job_id
        assert runs[0].info.status == "FINISHED" and runs[0].data.tags[TAG_JOB_ID] == job_id
        steps = {m.step for m in client.get_metric_history(job["mlflow_run_id"], "val_accuracy")}
        assert steps == set(range(1, EPOCHS + 1)), (job_id, sorted(steps))
        if hit_count[job_id] and not torn:
            assert job["progress"]["resumed_from_epoch"] is not None, job["progress"]
