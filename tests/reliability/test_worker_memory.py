"""The kernel's out-of-memory killer under a training job: the job is retried, or fails saying so.

The OOM killer SIGKILLs one process, the one that grew (the highest ``/proc/<pid>/oom_score``), not a
worker's whole process group: the Celery pool process that trains a PyTorch job, or the child process a
Keras job trains in. Real parts: the trainer's API (in this process, its reconciler too), one worker
process (``python -m services.trainer.worker``, prefork pool of one), the session's Redis and MLflow,
a SQLite job store. The test picks the process as the kernel ranks them and sends it SIGKILL, as the
kernel would:

- the pool process, once: the job's next attempt resumes and finishes, one model version registered;
- the pool process, at every attempt: after ``max_attempts`` the job fails, saying SIGKILL and that the
  OOM killer is the usual cause;
- the Keras child: the job fails at once with the same reason; the pool process lives on.

Other deaths, read from billiard's own wording, say what they were and do not blame memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from billiard.common import human_status
from billiard.exceptions import WorkerLostError
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer, load_wine
from sqlalchemy import select

from services.trainer.app import create_app
from services.trainer.jobs.tables import JobLogRecord, JobRecord
from services.trainer.settings import TrainerSettings
from services.trainer.worker.lost import lost_reason
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.lineage import TAG_JOB_ID
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import auth, running_app, test_platform, wait_for

pytestmark = pytest.mark.reliability

MAX_ATTEMPTS = 2
TERMINAL = ("succeeded", "failed", "cancelled")
STARTED = "job {} started"
EPOCH_DONE = re.compile(r"epoch \d+/\d+: ")
OOM_HINT = "the kernel's out-of-memory killer is the usual cause"


@dataclass
class Stack:
    settings: TrainerSettings
    base: str
    worker: WorkerProcess
    database: Database
    revs: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str) -> Iterator[Stack]:
    """One API and one worker; a lost worker's job is taken over after 3 s, at most twice in all."""
    state = tmp_path_factory.mktemp("worker-memory")
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    settings = trainer_settings(platform, stale_after_s=3, max_attempts=MAX_ATTEMPTS,
                                reconcile_interval_s=1, lost_after_s=5)
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    revs = {"breast_cancer": repo.add("breast_cancer", load_breast_cancer(as_frame=True).frame).rev,
            "wine": repo.add("wine", load_wine(as_frame=True).frame).rev}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the worker, its Keras child and the API share two cores
        worker = WorkerProcess(settings, state / "worker.log")
    database = Database(platform.database_url)
    try:
        with running_app(create_app(settings)) as base:
            yield Stack(settings=settings, base=base, worker=worker, database=database, revs=revs)
    finally:
        worker.stop()
        database.dispose()


def submit(stack: Stack, **changes: Any) -> str:
    dataset = changes.pop("dataset", "breast_cancer")
    spec = job_spec(rev=stack.revs[dataset], dataset=dataset, **changes)
    created = httpx.post(f"{stack.base}/jobs", json=spec, headers=auth("trainer"), timeout=30)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def row(stack: Stack, job_id: str) -> JobRecord:
    with stack.database.session() as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        session.expunge(record)
        return record


def job_log(stack: Stack, job_id: str) -> str:
    with stack.database.session() as session:
        lines = session.scalars(select(JobLogRecord.message).where(JobLogRecord.job_id == job_id)
                                .order_by(JobLogRecord.line))
        return "\n".join(lines)


def training(stack: Stack, job_id: str, attempt: int) -> bool:
    """Whether attempt ``attempt`` of the job runs in the worker and has finished an epoch there."""
    text = stack.worker.log_path.read_text(errors="replace")
    starts = [m.end() for m in re.finditer(re.escape(STARTED.format(job_id)), text)]
    return (len(starts) == attempt and EPOCH_DONE.search(text, starts[-1]) is not None
            and row(stack, job_id).state == "running")


def kernels_pick(worker: WorkerProcess) -> psutil.Process:
    """The process of the worker's tree the OOM killer would kill first: the highest oom_score (the
    kernel's own ranking, mostly resident memory), as it picks within the worker's container."""
    root = psutil.Process(worker.process.pid)
    tree = [root, *root.children(recursive=True)]

    def badness(process: psutil.Process) -> tuple[int, int]:
        return int(Path(f"/proc/{process.pid}/oom_score").read_text()), process.memory_info().rss

    return max(tree, key=badness)


def oom_kill(process: psutil.Process) -> None:
    process.kill()  # SIGKILL, what the OOM killer sends
    process.wait(timeout=10)


def wait_ended(stack: Stack, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = dict(httpx.get(f"{stack.base}/jobs/{job_id}", headers=auth("viewer"), timeout=30).json())
        return job if job["state"] in TERMINAL else None

    try:
        return dict(wait_for(ended, timeout=timeout, interval=0.5, what=f"job {job_id} to end"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{stack.worker.log_tail()}") from None


def kill_pool_process_mid_training(stack: Stack, job_id: str, attempt: int) -> int:
    """Wait for the attempt to train, then SIGKILL the process the kernel would pick; its pid."""
    wait_for(lambda: training(stack, job_id, attempt), timeout=90, interval=0.1,
             what=f"attempt {attempt} of job {job_id} to train")
    victim = kernels_pick(stack.worker)
    # The kernel picks the pool process that grew with the job, never the worker's main process.
    assert victim.ppid() == stack.worker.process.pid, (victim, victim.cmdline())
    oom_kill(victim)
    return victim.pid


def versions_of(stack: Stack, job_id: str) -> list[tuple[str, str]]:
    uri = stack.settings.platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return [(v.name, v.version) for v in client.search_model_versions(f"tags.`{TAG_JOB_ID}` = '{job_id}'")]


def test_a_pool_process_oom_killed_once_the_next_attempt_finishes_the_job_exactly_once(stack: Stack):
    job_id = submit(stack, model_name="oom_retried", model={"type": "mlp", "hidden": [16]},
                    training__epochs=25, training__batch_size=16)
    killed = kill_pool_process_mid_training(stack, job_id, attempt=1)
    job = wait_ended(stack, job_id)

    assert job["state"] == "succeeded", job["error"]
    assert job["error"] is None and job["model_version"] == "1"
    assert row(stack, job_id).attempts == 2
    assert versions_of(stack, job_id) == [("oom_retried", "1")]
    log = job_log(stack, job_id)
    assert f"pool process (pid {killed}) running the job was killed by signal 9 (SIGKILL)" in log, log
    assert OOM_HINT in log and "dmesg" in log
    assert stack.worker.process.poll() is None  # the worker lives on, with a new pool process


def test_a_pool_process_oom_killed_at_every_attempt_fails_the_job_saying_so(stack: Stack):
    job_id = submit(stack, model_name="oom_every_time", model={"type": "mlp", "hidden": [16]},
                    training__epochs=60, training__batch_size=16)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        last = kill_pool_process_mid_training(stack, job_id, attempt)
    job = wait_ended(stack, job_id)

    assert job["state"] == "failed"
    assert row(stack, job_id).attempts == MAX_ATTEMPTS
    error = job["error"]
    assert error.startswith(f"the job was started {MAX_ATTEMPTS} times and its worker was lost each time; "
                            "giving up. The last time, "), error
    assert f"(pid {last}) running the job was killed by signal 9 (SIGKILL)" in error, error
    assert OOM_HINT in error and "dmesg" in error
    assert versions_of(stack, job_id) == []


def test_a_keras_child_oom_killed_fails_the_job_with_the_signal_and_memory(stack: Stack):
    job_id = submit(stack, dataset="wine", model_name="oom_keras", framework="keras",
                    model={"type": "mlp", "hidden": [32]}, training__epochs=200,
                    training__batch_size=16, training__learning_rate=0.01)
    wait_for(lambda: training(stack, job_id, attempt=1), timeout=90, interval=0.1,
             what=f"the Keras job {job_id} to train")
    pool = psutil.Process(stack.worker.process.pid).children()
    keras = [p for p in psutil.Process(stack.worker.process.pid).children(recursive=True)
             if "services.trainer.engines.keras_child" in p.cmdline()]
    assert len(keras) == 1 and len(pool) == 1, (pool, keras)
    oom_kill(keras[0])
    job = wait_ended(stack, job_id)

    assert job["state"] == "failed"
    assert job["error"].startswith(f"the training process (pid {keras[0].pid}) was killed by signal 9 "
                                   f"(SIGKILL); {OOM_HINT}"), job["error"]
    assert row(stack, job_id).attempts == 1
    assert versions_of(stack, job_id) == []
    assert pool[0].is_running()  # only the child died: the pool process reported it and lives on


def test_other_deaths_of_a_pool_process_say_what_they_were_and_do_not_blame_memory():
    def lost(status: int) -> str:
        return lost_reason(WorkerLostError(f"Worker exited prematurely: {human_status(status)} Job: 0."), 7)

    assert lost(-9).endswith(f"(pid 7) running the job was killed by signal 9 (SIGKILL); {OOM_HINT}: check "
                             "`dmesg` on the node (\"Out of memory: Killed process\") or the container's "
                             "memory limit (OOMKilled), and give the job more memory or a smaller batch_size")
    process = "the worker's pool process (pid 7) running the job"
    assert lost(-11) == f"{process} was killed by signal 11 (SIGSEGV)"
    assert lost(3) == f"{process} exited with status 3 before the job ended"
