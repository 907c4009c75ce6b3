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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.trainer.engines import reports
from services.trainer.jobs import store
from services.trainer.jobs.schemas import JobCreate, JobState, Progress
from services.trainer.jobs.store import Claim
from services.trainer.jobs.tables import JobRecord
from services.trainer.settings import TrainerSettings
from services.trainer.sweeps import trials as sweep_trials
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import InvalidInput, ShipyardError
from shipyard_common.lineage import (
    MODEL_CARD_FILE,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_SEQUENCE,
    TAG_SIGNATURE,
    TAG_TARGET,
    WEIGHTS_FILE,
    lineage_tags,
)
from shipyard_common.mlflow_client import Patience, Wait

if TYPE_CHECKING:
    import pandas as pd

    from services.trainer.engines.tracking import Tracking
    from services.trainer.engines.types import Export, FitOutcome

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
        self.line = store.last_log_line(database=database, job_id=job_id)
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
            store.append_log(
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
    """Run job ``job_id`` if this worker may claim it; return what the claim said.

    While it runs, a heartbeat keeps its row fresh, and its writes are fenced to the attempt claimed
    here: if another worker takes the job over, this one's next write is refused and it stops.
    """
    database = database or database_for(settings)
    lost = store.lost_worker_note(database=database, job_id=job_id)  # the claim clears it
    claim = store.claim_job(
        database=database, job_id=job_id,
        stale_after_s=settings.stale_after_s, max_attempts=settings.max_attempts,
    )
    if claim != Claim.CLAIMED:
        log.info("job %s not run here: %s", job_id, claim.value)
        return claim
    attempt = store.attempt_of(database=database, job_id=job_id)
    handler = JobLogHandler(database, job_id)
    root = logging.getLogger()
    root.addHandler(handler)
    heartbeat = _Heartbeat(database, job_id, attempt=attempt, interval_s=heartbeat_interval(settings))
    heartbeat.start()
    if lost:
        log.warning("job %s, attempt %d: the previous attempt was lost: %s", job_id, attempt, lost)
    try:
        with store.fenced(job_id, attempt):
            _run_fenced(job_id=job_id, settings=settings, database=database)
    finally:
        heartbeat.stop()
        root.removeHandler(handler)
    return claim


def _run_fenced(*, job_id: str, settings: TrainerSettings, database: Database) -> None:
    """Run the claimed job; it ends ``succeeded`` or ``failed`` with a reason, or stops quietly if the
    row stopped being this worker's (cancelled, taken over)."""
    try:
        log.info("job %s started", job_id)
        _run_claimed(job_id=job_id, settings=settings, database=database)
    except sweep_trials.TrialPruned as exc:  # a sweep's trial that lagged: ended, never retried
        log.info("job %s: %s", job_id, exc)
        store.update_job(database=database, job_id=job_id, expect_state=JobState.RUNNING,
                         state=JobState.CANCELLED, error=str(exc)[:4000])
    except JobAborted:
        state = store.get_job(database=database, job_id=job_id).state
        log.info("job %s is now %s elsewhere; training stopped, no model registered", job_id, state.value)
    except ShipyardError as exc:
        log.warning("job %s failed: %s", job_id, exc.message)
        _fail(database, job_id, exc.message)
    except Exception as exc:  # a bug or an outage must still end the job with a reason
        log.exception("job %s failed unexpectedly", job_id)
        _fail(database, job_id, f"{type(exc).__name__}: {exc}")


def heartbeat_interval(settings: TrainerSettings) -> float:
    """How often a running job's row is touched: a quarter of ``stale_after_s`` (at most 30 s), so that
    only a lost worker's job ever looks stale, whatever phase a live one is in."""
    return min(30.0, settings.stale_after_s / 4)


class _Heartbeat(threading.Thread):
    """Touches the job's row every ``interval_s`` while this worker runs it.

    Progress is written per epoch, but loading data, importing a framework, exporting, uploading or
    registering a large model can be silent for longer than ``stale_after_s``; the reconciler would
    then take the job for a lost worker's and send it again (see ``store.requeue_lost_jobs``). It stops
    on its own once the row is no longer ``running`` (ended, cancelled).
    """

    def __init__(self, database: Database, job_id: str, *, attempt: int, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.database, self.job_id, self.attempt, self.interval_s = database, job_id, attempt, interval_s
        self._stop_beating = threading.Event()

    def run(self) -> None:
        with store.fenced(self.job_id, self.attempt):  # never keeps alive a job another worker took over
            while not self._stop_beating.wait(self.interval_s):
                try:
                    if not store.update_job(database=self.database, job_id=self.job_id,
                                            expect_state=JobState.RUNNING, updated_at=utcnow()):
                        return
                except Exception as exc:  # the database away for a while: beat again next time
                    log.debug("heartbeat of job %s not written: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stop_beating.set()
        self.join(timeout=10)


def _fail(database: Database, job_id: str, message: str) -> None:
    store.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING,
        state=JobState.FAILED, error=message[:4000],
    )


@dataclass
class _ProgressWriter:
    """Turns the framework's per-step callbacks into throttled row updates and MLflow metrics."""

    database: Database
    job_id: str
    epochs: int
    tracking: Tracking
    run_id: str
    # A run that a lost worker began: the first epoch this worker reports is where it resumed.
    continuing: bool = False
    steps: int = 0
    started: float = 0.0
    last_write: float = 0.0
    resumed_from_epoch: int | None = None
    first_step: int | None = None  # the step this run began at: a resumed job does not start at 0
    # A sweep's trial: reports each epoch's metrics to the study; a TrialPruned back stops it (sweeps.trials).
    judge: Callable[[int, dict[str, float]], Exception | None] | None = None

    def plan(self, steps: int) -> None:
        self.steps = steps

    def final(self) -> Progress:
        return Progress(epoch=self.epochs, epochs=self.epochs, step=self.steps, steps=self.steps,
                        eta_seconds=0.0, resumed_from_epoch=self.resumed_from_epoch)

    def __call__(self, epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = step - 1
            if self.continuing and epoch > 1:
                self.resumed_from_epoch = epoch
                log.info("resuming at epoch %d from the lost worker's checkpoint", epoch)
                self.tracking.set_tag(self.run_id, "shipyard.resumed_from_epoch", str(epoch))
        if metrics is None and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.last_write = now
        elapsed = now - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.steps - step) if done > 0 and self.steps else None
        progress = Progress(
            # Mid-epoch, the last finished epoch is the one before this.
            epoch=epoch if metrics is not None else epoch - 1, epochs=self.epochs,
            step=step, steps=self.steps, eta_seconds=round(eta, 1) if eta is not None else None,
            resumed_from_epoch=self.resumed_from_epoch,
        )
        # The job's row, which users (and a takeover) read, is written last: once it shows an epoch, the
        # study and MLflow have it, and the worker that resumes after that epoch's checkpoint loses nothing.
        pruned = self._report_epoch(epoch, metrics) if metrics is not None else None
        values: dict[str, object] = {"progress": progress.model_dump()}
        if metrics is not None:
            values["metrics"] = metrics
        if not store.update_job(
            database=self.database, job_id=self.job_id, expect_state=JobState.RUNNING, **values
        ):
            raise JobAborted(self.job_id)
        if pruned is not None:
            raise pruned

    def _report_epoch(self, epoch: int, metrics: dict[str, float]) -> Exception | None:
        """Tell the sweep's study and MLflow an epoch's metrics; what the study's pruner says, if it stops."""
        pruned = self.judge(epoch, metrics) if self.judge is not None else None
        self.tracking.log_metrics(self.run_id, metrics, step=epoch)
        shown = ", ".join(f"{name}={value:.4g}" for name, value in metrics.items())
        log.info("epoch %d/%d: %s", epoch, self.epochs, shown)
        return pruned


@dataclass
class _Run:
    """One job's MLflow run, scratch folders and lineage, as :func:`_run_claimed` passes them on."""

    job_id: str
    spec: JobCreate
    device: str
    tracking: Tracking
    lineage: dict[str, str]
    workdir: Path
    run_id: str
    continuing: bool
    resume_dir: Path | None
    initial_weights: dict[str, Any] | None
    initial_columns: list[dict[str, Any]] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoint"

    @property
    def tensorboard_dir(self) -> Path:
        return self.workdir / "tensorboard"


def _run_claimed(*, job_id: str, settings: TrainerSettings, database: Database) -> None:
    # Imported here: the API process imports this package too and must not pay for torch.
    from services.trainer.engines import engine
    from services.trainer.engines.tracking import Tracking, git_commit

    platform = settings.platform
    spec, previous_run_id = _read_job(database, job_id)
    repo = DataRepo.from_settings(platform)
    frame = repo.read(spec.data.dataset, spec.data.rev)
    test_rev = spec.data.split.test_rev if spec.data.split is not None else None
    test_frame = repo.read(spec.data.dataset, test_rev) if test_rev is not None else None
    device = engine.pick_device(spec.resources.queue.value)
    tracking = Tracking(platform.mlflow_tracking_uri, patience=_patience(settings, database, job_id))
    lineage = lineage_tags(
        job_id=job_id, dataset=spec.data.dataset, dataset_rev=spec.data.rev,
        git_commit=settings.git_commit or git_commit(), framework=spec.framework.value,
    )
    scratch = tempfile.TemporaryDirectory(prefix="shipyard-job-")
    workdir = Path(scratch.name)
    try:
        run = _start_run(database=database, job_id=job_id, spec=spec, device=device, tracking=tracking,
                         lineage=lineage, workdir=workdir, previous_run_id=previous_run_id)
        ok = False
        try:
            version, metrics, writer = _train_and_register(run, database=database, settings=settings,
                                                           frame=frame, test_frame=test_frame)
            ok = True
        finally:
            try:
                tracking.end_run(run.run_id, ok=ok)
            except Exception:  # the job's outcome matters more than the run's status
                log.warning("could not end MLflow run %s", run.run_id, exc_info=True)
    finally:
        scratch.cleanup()

    log.info("job %s succeeded: %s %s %s", job_id, spec.model_name,
             f"v{version}" if version else "(a sweep's trial: the sweep registers its best)", metrics)
    store.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING,
        state=JobState.SUCCEEDED, model_version=version, metrics=metrics,
        progress=writer.final().model_dump(), error=None,
    )


def _patience(settings: TrainerSettings, database: Database, job_id: str) -> Patience:
    """How this job waits for an MLflow that is down: bounded backoff from the settings, each wait
    shown in the job's ``detail`` (and its log), cleared when MLflow answers again."""

    def on_wait(wait: Wait) -> None:
        if not store.set_detail(database=database, job_id=job_id, detail=wait.describe()):
            raise JobAborted(job_id)  # cancelled (or taken over) while it waited

    def on_back() -> None:
        log.info("MLflow at %s answers again; job %s goes on", settings.platform.mlflow_tracking_uri, job_id)
        store.set_detail(database=database, job_id=job_id, detail=None)

    # The row is written before each wait: a wait as long as stale_after_s would make it look lost.
    longest = min(settings.mlflow_wait_max_backoff_s, settings.stale_after_s / 2)
    return Patience(
        tracking_uri=settings.platform.mlflow_tracking_uri, retries=settings.mlflow_wait_retries,
        backoff_s=min(settings.mlflow_wait_backoff_s, longest), max_backoff_s=longest,
        on_wait=on_wait, on_back=on_back,
    )


def _read_job(database: Database, job_id: str) -> tuple[JobCreate, str | None]:
    """The job's spec, and the MLflow run of a lost worker that ran it before (or None)."""
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None:  # deleted between the claim and now
            raise JobAborted(job_id)
        return JobCreate.model_validate(record.spec), record.mlflow_run_id


def _start_run(
    *, database: Database, job_id: str, spec: JobCreate, device: str, tracking: Tracking,
    lineage: dict[str, str], workdir: Path, previous_run_id: str | None,
) -> _Run:
    """The parent's weights, then a new MLflow run, or the lost worker's run and its checkpoint."""
    (workdir / "checkpoint").mkdir()
    (workdir / "tensorboard").mkdir()
    initial_weights, initial_columns = None, None
    if spec.init_from is not None:
        parent = spec.init_from
        lineage.update(lineage_tags(parent=f"{parent.model_name}/{parent.version}"))
        files = tracking.download_parent(model_name=parent.model_name, version=parent.version,
                                         folder=workdir / "parent")
        initial_weights = _parent_weights(files.weights, parent.model_name, parent.version)
        initial_columns = files.columns
    elif spec.model.type == "pretrained_text":
        lineage.update(lineage_tags(parent=f"pretrained:{spec.model.checkpoint}"))

    resume_dir = None
    if previous_run_id:
        # A worker that ran this job was lost: continue its run from its last checkpoint.
        run_id = previous_run_id
        resume_dir = _download_checkpoint(tracking, run_id, workdir / "resume")
    else:
        trial_tags = sweep_trials.run_tags(sweep_trials.link_for(database, job_id))  # a child of its sweep's
        run_id = tracking.start_run(
            experiment=spec.model_name, run_name=f"job-{job_id[:8]}", tags={**lineage, **trial_tags}
        )
    if not store.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING,
        mlflow_run_id=run_id, device=device,
    ):
        tracking.end_run(run_id, ok=False)
        raise JobAborted(job_id)
    log.info("training %s (%s, %s) on %s (MLflow run %s)", spec.model_name, spec.framework.value,
             spec.model.type, device, run_id)
    return _Run(job_id=job_id, spec=spec, device=device, tracking=tracking, lineage=lineage,
                workdir=workdir, run_id=run_id, continuing=previous_run_id is not None,
                resume_dir=resume_dir, initial_weights=initial_weights, initial_columns=initial_columns)


def _train_and_register(
    run: _Run, *, database: Database, settings: TrainerSettings, frame: pd.DataFrame,
    test_frame: pd.DataFrame | None = None,
) -> tuple[str | None, dict[str, float], _ProgressWriter]:
    """Fit with the spec's framework, log the outcome, register the model: (version, metrics, writer).
    A sweep's trial registers nothing (version None): it keeps what it would register for its sweep."""
    from services.trainer.engines import crossval, frameworks, model_card
    from services.trainer.engines.types import FitContext

    spec, tracking, run_id, job_id, lineage = run.spec, run.tracking, run.run_id, run.job_id, run.lineage
    _log_params(run)
    writer = _ProgressWriter(database=database, job_id=job_id, epochs=spec.training.epochs,
                             tracking=tracking, run_id=run_id, started=time.monotonic(),
                             continuing=run.continuing)
    trial = sweep_trials.link_for(database, job_id)
    if trial is not None:
        writer.judge = sweep_trials.judge(settings.platform.database_url, trial)
    checkpoint_dir = run.checkpoint_dir
    context = FitContext(
        spec=spec, frame=frame, device=run.device, workdir=run.workdir, observer=writer,
        checkpoint_dir=checkpoint_dir,
        checkpoint_saved=lambda: tracking.log_checkpoint(run_id, checkpoint_dir),
        resume_dir=run.resume_dir, tensorboard_dir=run.tensorboard_dir, plan=writer.plan,
        initial_weights=run.initial_weights, initial_columns=run.initial_columns,
        plugin_dir=settings.plugin_dir, test_frame=test_frame,
    )
    outcome = frameworks.fit(context)
    _log_outcome(tracking, run_id, outcome, writer, run.workdir)
    lineage.update({TAG_FEATURES: json.dumps(outcome.features), TAG_TARGET: outcome.target,
                    **lineage_tags(task=outcome.task.value)})
    folder = model_card.write_model_folder(outcome=outcome, spec=spec, lineage=lineage,
                                           folder=run.workdir / "model")
    source = tracking.log_model_folder(run_id, folder.path)
    diffs = {f"{e.format.value}_max_abs_diff": e.max_abs_diff for e in outcome.exports}
    # Measured once, after training (test_*, the int8 export's figures): the epochs logged the rest.
    per_epoch = {key for entry in outcome.history for key in entry}
    once = {k: v for k, v in outcome.metrics.items() if k not in per_epoch}
    tracking.log_metrics(run_id, {**diffs, **once}, step=spec.training.epochs)
    for number, fold in enumerate(outcome.folds, start=1):  # cross-validation: one step per fold
        tracking.log_metrics(run_id, crossval.per_fold(fold), step=number)
    metrics = {**outcome.metrics, **diffs}
    # The last moment a cancel can still keep a model out of the registry.
    if not store.update_job(database=database, job_id=job_id, expect_state=JobState.RUNNING,
                              progress=writer.final().model_dump()):
        raise JobAborted(job_id)
    registration = _registration(run, outcome=outcome, source=source, primary=folder.primary)
    if trial is not None:
        sweep_trials.defer_registration(database, trial, run_id=run_id, registration=registration)
        return None, metrics, writer
    version = run.tracking.register(model_name=spec.model_name, job_id=job_id, run_id=run_id, **registration)
    return version, metrics, writer


def _log_params(run: _Run) -> None:
    from mlflow.exceptions import MlflowException

    from services.trainer.engines.tracking import flatten

    try:
        params = {**flatten(run.spec.model_dump(mode="json")), "device": run.device}
        run.tracking.log_params(run.run_id, params)
    except MlflowException:
        if not run.continuing:
            raise
        # The lost worker logged them already (MLflow refuses a changed value, e.g. the device).
        log.warning("kept the params the lost worker logged to run %s", run.run_id)


def _registration(run: _Run, *, outcome: FitOutcome, source: str, primary: Export) -> dict[str, Any]:
    """How the logged model folder is registered as a version of ``spec.model_name``: its source, its
    lineage and format tags, its description (``Tracking.register``'s arguments besides the names)."""
    from services.trainer.engines.tracking import metric_tags

    spec, job_id = run.spec, run.job_id
    return dict(
        source=source,
        tags={**run.lineage, TAG_FORMAT: primary.format.value,
              TAG_FORMATS: json.dumps([e.format.value for e in outcome.exports]),
              TAG_SIGNATURE: json.dumps(primary.signature, sort_keys=True),
              **_sequence_tag(spec, outcome=outcome, primary=primary), **metric_tags(outcome.metrics)},
        description=(f"Trained by Shipyard job {job_id} on {spec.data.dataset}@{spec.data.rev[:12]}; "
                     f"see {MODEL_CARD_FILE} in the version's files."),
    )


def _sequence_tag(spec: JobCreate, *, outcome: FitOutcome, primary: Export) -> dict[str, str]:
    """A sequence model's layout (``data.sequence``, its step features and the longest sequence it reads)
    as its version's ``shipyard.sequence`` tag, which batch scoring and the monitor read it by."""
    from shipyard_common.datasets.sequences import SequenceLayout

    sequence = spec.data.sequence
    if sequence is None:
        return {}
    read = primary.signature.get("sequence") or {}
    layout = SequenceLayout(column=sequence.column, id=sequence.id, step=sequence.step,
                            features=tuple(outcome.features), max_length=read.get("max_length"))
    return {TAG_SEQUENCE: layout.tag()}


def _parent_weights(path: Path, model_name: str, version: str) -> dict[str, Any]:
    """The registered version's trained weights (downloaded to ``path``), read as tensors only: a file
    that holds other Python objects (a pickle payload, say) is refused, never unpickled."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InvalidInput(
            f"init_from: the weights of {model_name!r} v{version} hold Python objects besides tensors, "
            f"which the trainer never unpickles ({str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict):
        raise InvalidInput(f"init_from: the weights of {model_name!r} v{version} are not a state dict")
    log.info("fine-tuning from %s v%s", model_name, version)
    return state


def _download_checkpoint(tracking: Tracking, run_id: str, folder: Path) -> Path | None:
    """The lost worker's checkpoint folder, or None (none saved, or the store failed us)."""
    try:
        found = tracking.download_checkpoint(run_id, folder)
    except Exception as exc:  # training from scratch still gives a model
        log.warning("could not fetch the checkpoint of run %s (%s); training starts from epoch 1",
                    run_id, exc)
        return None
    if found is None:
        log.info("run %s has no checkpoint; training starts from epoch 1", run_id)
    return found


def _log_missing_epochs(
    tracking: Tracking, run_id: str, history: list[dict[str, float]], *, before: int
) -> None:
    """Log the metrics of each epoch before ``before`` that the run lacks, from the checkpoint's history.

    A lost worker may have died between saving an epoch's checkpoint and logging its metrics, and the
    worker that resumed may have been lost in turn before it logged them: every such epoch is logged
    here, once the job has trained to its end. If MLflow cannot say which it has, the epoch just
    before ``before`` is logged again (the one the last lost worker may have missed).
    """
    entries = [entry for entry in history if int(entry["epoch"]) < before]
    key = next((name for entry in entries for name in entry if name != "epoch"), None)
    if key is None:
        return
    try:
        logged = {metric.step for metric in tracking.client.get_metric_history(run_id, key)}
    except Exception as exc:  # the history is a nicety; the model matters more
        log.warning("could not read the metric history of run %s (%s)", run_id, exc)
        logged = {int(entry["epoch"]) for entry in entries if int(entry["epoch"]) != before - 1}
    for entry in entries:
        if int(entry["epoch"]) not in logged:
            tracking.log_metrics(run_id, {k: v for k, v in entry.items() if k != "epoch"},
                                 step=int(entry["epoch"]))


def _log_outcome(tracking: Tracking, run_id: str, outcome: FitOutcome, writer: _ProgressWriter,
                 workdir: Path) -> None:
    """Reports, TensorBoard events and the weights, beside the model in the run's artifacts; a table's
    fitted columns as params."""
    import torch

    from services.trainer.engines.tracking import TENSORBOARD_ARTIFACT_PATH, column_params

    tracking.log_params(run_id, column_params(outcome.columns))
    if writer.resumed_from_epoch is not None:
        _log_missing_epochs(tracking, run_id, outcome.history, before=writer.resumed_from_epoch)
    reports.log_run_reports(tracking, run_id, outcome)
    tracking.log_folder(run_id, workdir / "tensorboard", TENSORBOARD_ARTIFACT_PATH)
    if outcome.state_dict is not None:
        path = workdir / "weights" / WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outcome.state_dict, path)
        tracking.log_weights(run_id, path)
