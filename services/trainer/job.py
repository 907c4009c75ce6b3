"""One training job, as a worker runs it: claim → data → train → export → register → done.

The job row is updated as the job goes (progress, metrics, device) and ends ``succeeded``
with a model version, or ``failed`` with an error a person can act on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.trainer import reports, service
from services.trainer.models import JobRecord
from services.trainer.schemas import JobCreate, JobState, Progress
from services.trainer.service import Claim
from services.trainer.settings import TrainerSettings
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.errors import ShipyardError
from shipyard_common.lineage import (
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_GIT_COMMIT,
    TAG_JOB_ID,
    TAG_SIGNATURE,
    TAG_TARGET,
    TAG_TASK,
)

if TYPE_CHECKING:
    from services.trainer.tracking import Tracking

log = logging.getLogger("shipyard.trainer.job")

# Mid-epoch progress is written at most this often; every epoch end is written regardless.
PROGRESS_INTERVAL_S = 2.0


class JobAborted(Exception):
    """The row stopped being ours mid-training (cancelled, or taken over): stop quietly."""


class JobLogHandler(logging.Handler):
    """Copies the log records of one job's thread into ``job_logs``, numbered from where they stood.

    Shipyard's own records at INFO and up, and any library's warnings, so that ``GET
    /jobs/{id}/logs`` shows what the worker did without the worker's whole log.
    """

    def __init__(self, database: Database, job_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.database = database
        self.job_id = job_id
        self.thread = threading.get_ident()
        self.line = service.last_log_line(database=database, job_id=job_id)
        self._writing = False
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._writing or record.thread != self.thread:
            return
        if not record.name.startswith("shipyard") and record.levelno < logging.WARNING:
            return
        self._writing = True  # a record logged while writing (a database warning) must not recurse
        try:
            self.line += 1
            service.append_log(
                database=self.database, job_id=self.job_id, line=self.line,
                level=record.levelname.lower(), message=self.format(record)[:8000],
            )
        except Exception:  # losing a log line must never fail the job
            self.handleError(record)
        finally:
            self._writing = False


_databases: dict[int, Database] = {}


def database_for(settings: TrainerSettings) -> Database:
    # One engine per process: a prefork child must not reuse connections its parent opened.
    pid = os.getpid()
    if pid not in _databases:
        database = Database(settings.platform.database_url)
        database.create_tables()
        _databases[pid] = database
    return _databases[pid]


def run_job(*, job_id: str, settings: TrainerSettings, database: Database | None = None) -> Claim:
    """Run job ``job_id`` if this worker may claim it; return what the claim said."""
    database = database or database_for(settings)
    claim = service.claim_job(
        database=database, job_id=job_id,
        stale_after_s=settings.stale_after_s, max_attempts=settings.max_attempts,
    )
    if claim != Claim.CLAIMED:
        log.info("job %s not run here: %s", job_id, claim.value)
        return claim
    handler = JobLogHandler(database, job_id)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log.info("job %s started", job_id)
        _run_claimed(job_id=job_id, settings=settings, database=database)
    except JobAborted:
        state = service.get_job(database=database, job_id=job_id).state
        log.info("job %s is now %s elsewhere; training stopped, no model registered", job_id, state.value)
    except ShipyardError as exc:
        log.warning("job %s failed: %s", job_id, exc.message)
        _fail(database, job_id, exc.message)
    except Exception as exc:  # a bug or an outage must still end the job with a reason
        log.exception("job %s failed unexpectedly", job_id)
        _fail(database, job_id, f"{type(exc).__name__}: {exc}")
    finally:
        root.removeHandler(handler)
    return claim


def _fail(database: Database, job_id: str, message: str) -> None:
    service.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING,
        state=JobState.FAILED, error=message[:4000],
    )


@dataclass
class _ProgressWriter:
    """Turns the engine's per-step callbacks into throttled row updates and MLflow metrics."""

    database: Database
    job_id: str
    epochs: int
    steps: int
    tracking: Tracking
    run_id: str
    started: float = 0.0
    last_write: float = 0.0
    resumed_from_epoch: int | None = None
    first_step: int | None = None  # the step this run began at: a resumed job does not start at 0

    def final(self, steps: int) -> Progress:
        return Progress(epoch=self.epochs, epochs=self.epochs, step=steps, steps=steps, eta_seconds=0.0,
                        resumed_from_epoch=self.resumed_from_epoch)

    def __call__(self, epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = step - 1
        if metrics is None and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.last_write = now
        elapsed = now - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.steps - step) if done > 0 else None
        progress = Progress(
            # Mid-epoch, the last finished epoch is the one before this.
            epoch=epoch if metrics is not None else epoch - 1, epochs=self.epochs,
            step=step, steps=self.steps, eta_seconds=round(eta, 1) if eta is not None else None,
            resumed_from_epoch=self.resumed_from_epoch,
        )
        values: dict[str, object] = {"progress": progress.model_dump()}
        if metrics is not None:
            values["metrics"] = metrics
        if not service.update_job(
            database=self.database, job_id=self.job_id, expect_state=JobState.RUNNING, **values
        ):
            raise JobAborted(self.job_id)
        if metrics is not None:
            self.tracking.log_metrics(self.run_id, metrics, step=epoch)
            shown = ", ".join(f"{name}={value:.4g}" for name, value in metrics.items())
            log.info("epoch %d/%d: %s", epoch, self.epochs, shown)


def _load_checkpoint(tracking: Tracking, run_id: str, folder: Path) -> dict[str, Any] | None:
    """The run's last checkpoint, or None (no checkpoint yet, or one that cannot be read)."""
    from services.trainer import engine

    try:
        path = tracking.download_checkpoint(run_id, folder)
        if path is None:
            log.info("run %s has no checkpoint; training starts from epoch 1", run_id)
            return None
        return engine.load_checkpoint(path)
    except Exception as exc:  # a torn or foreign file: training from scratch still gives a model
        log.warning("could not read the checkpoint of run %s (%s); training starts from epoch 1", run_id, exc)
        return None


def _run_claimed(*, job_id: str, settings: TrainerSettings, database: Database) -> None:
    # Imported here: the API process imports this package too and must not pay for torch.
    from mlflow.exceptions import MlflowException

    from services.trainer import engine
    from services.trainer.export import export_onnx
    from services.trainer.tracking import CHECKPOINT_FILE, Tracking, flatten, git_commit, metric_tags

    platform = settings.platform
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None:  # deleted between the claim and now
            raise JobAborted(job_id)
        spec = JobCreate.model_validate(record.spec)
        previous_run_id = record.mlflow_run_id

    frame = DataRepo(platform.data_repo_path, platform.dvc_remote_path).read(spec.data.dataset, spec.data.rev)
    data = engine.prepare_data(frame, spec)
    device = engine.pick_device(spec.resources.queue.value)
    commit = settings.git_commit or git_commit()

    tracking = Tracking(platform.mlflow_tracking_uri)
    lineage = {
        TAG_JOB_ID: job_id,
        TAG_DATASET: spec.data.dataset,
        TAG_DATASET_REV: spec.data.rev,
        TAG_GIT_COMMIT: commit,
        TAG_FEATURES: json.dumps(data.features),
        TAG_TARGET: data.target,
        TAG_TASK: data.task.value,
    }
    checkpoints = tempfile.TemporaryDirectory(prefix="shipyard-checkpoint-")
    resume = None
    if previous_run_id:
        # A worker that ran this job was lost: continue its run from its last checkpoint.
        run_id = previous_run_id
        resume = _load_checkpoint(tracking, run_id, Path(checkpoints.name) / "download")
        if resume is not None:
            tracking.client.set_tag(run_id, "shipyard.resumed_from_epoch", str(int(resume["epoch"]) + 1))
            if resume["history"]:
                # The lost worker may have died between saving this epoch and logging its metrics.
                last = {k: v for k, v in resume["history"][-1].items() if k != "epoch"}
                tracking.log_metrics(run_id, last, step=int(resume["epoch"]))
    else:
        run_id = tracking.start_run(experiment=spec.model_name, run_name=f"job-{job_id[:8]}", tags=lineage)
    if not service.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING, mlflow_run_id=run_id, device=device,
    ):
        tracking.end_run(run_id, ok=False)
        checkpoints.cleanup()
        raise JobAborted(job_id)
    resumed_from = int(resume["epoch"]) + 1 if resume is not None else None
    if resumed_from is not None:
        log.info("training %s on %s (MLflow run %s), resuming at epoch %d from the lost worker's checkpoint",
                 spec.model_name, device, run_id, resumed_from)
    else:
        log.info("training %s on %s (MLflow run %s)", spec.model_name, device, run_id)
    ok = False
    try:
        params = {
            **flatten(spec.model_dump(mode="json")),
            "device": device, "n_features": len(data.features),
            "n_train": len(data.x_train), "n_val": len(data.x_val),
        }
        try:
            tracking.log_params(run_id, params)
        except MlflowException:
            if previous_run_id is None:
                raise
            # The lost worker logged them already (MLflow refuses a changed value, e.g. the device).
            log.warning("kept the params the lost worker logged to run %s", run_id)
        steps = engine.steps_per_epoch(data, spec) * spec.training.epochs
        writer = _ProgressWriter(database=database, job_id=job_id, epochs=spec.training.epochs, steps=steps,
                                 tracking=tracking, run_id=run_id, started=time.monotonic(),
                                 resumed_from_epoch=resumed_from)
        checkpoint_file = Path(checkpoints.name) / CHECKPOINT_FILE

        def save_checkpoint(state: dict[str, object]) -> None:
            engine.save_checkpoint(state, checkpoint_file)
            tracking.log_checkpoint(run_id, checkpoint_file)

        result = engine.train(data, spec, device=device, observer=writer,
                              checkpointer=save_checkpoint, resume=resume)
        reports.log_run_reports(tracking, run_id, result, data)

        with tempfile.TemporaryDirectory(prefix="shipyard-export-") as folder:
            exported = export_onnx(
                result.model, task=data.task, n_features=len(data.features),
                path=Path(folder) / "model.onnx", check_rows=data.x_val, classes=data.classes,
            )
            metrics = {**result.metrics, "onnx_max_abs_diff": exported.max_abs_diff}
            tracking.log_metrics(
                run_id, {"onnx_max_abs_diff": exported.max_abs_diff}, step=spec.training.epochs
            )
            source = tracking.log_onnx(run_id, exported.path)
        # The last moment a cancel can still keep a model out of the registry.
        if not service.update_job(database=database, job_id=job_id, expect_state=JobState.RUNNING,
                                  progress=writer.final(steps).model_dump()):
            raise JobAborted(job_id)
        version = tracking.register(
            model_name=spec.model_name, job_id=job_id, run_id=run_id, source=source,
            tags={**lineage, TAG_FORMAT: "onnx", TAG_SIGNATURE: exported.signature_json(),
                  **metric_tags(result.metrics)},
            description=f"Trained by Shipyard job {job_id} on {spec.data.dataset}@{spec.data.rev[:12]}.",
        )
        ok = True
    finally:
        checkpoints.cleanup()
        try:
            tracking.end_run(run_id, ok=ok)
        except Exception:  # the job's outcome matters more than the run's status
            log.warning("could not end MLflow run %s", run_id, exc_info=True)

    progress = writer.final(steps)
    log.info("job %s succeeded: %s v%s %s", job_id, spec.model_name, version, metrics)
    service.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING,
        state=JobState.SUCCEEDED, model_version=version, metrics=metrics, progress=progress.model_dump(),
        error=None,
    )
