"""The sweep driver: ask the study for trials, make each a job, tell the study how each ended, and
register the best trial's model once the budget is spent.

:func:`advance` is idempotent and resumable: every step reads its state from the database (the sweep and
trial rows, Optuna's study), so it may run anywhere, any number of times. It runs when the sweep is
created, when a trial's job ends (the worker that ran it) and every ``reconcile_interval_s`` (the API's
reconciler): a worker that dies loses nothing, since its job is retried as any job is and the next
advance carries on. A lease on the sweep row keeps two processes from advancing one sweep at once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import or_, select, update

from services.trainer.jobs import store
from services.trainer.jobs.schemas import JobState, Progress
from services.trainer.jobs.tables import JobRecord
from services.trainer.sweeps import space as sweep_space
from services.trainer.sweeps.schemas import SweepCreate, SweepState, TrialState
from services.trainer.sweeps.tables import SweepRecord, TrialRecord
from services.trainer.sweeps.trials import PRUNED_PREFIX, TAG_SWEEP
from shipyard_common.db import Database, utcnow

if TYPE_CHECKING:
    import optuna

    from services.trainer.engines.tracking import Tracking

log = logging.getLogger("shipyard.trainer.sweeps")

LEASE_S = 120.0
ENDED_JOB_STATES = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)


@dataclass(frozen=True)
class Driving:
    """What advancing a sweep needs: the database (and its URL, for Optuna), MLflow, the broker."""

    database: Database
    database_url: str
    tracking_uri: str
    enqueue: store.Enqueue


@contextmanager
def lease(database: Database, sweep_id: str) -> Iterator[bool]:
    """Hold the sweep for ``LEASE_S`` (yields True), or yield False when another process holds it."""
    now = utcnow()
    with database.session() as session:
        taken = session.execute(
            update(SweepRecord)
            .where(SweepRecord.id == sweep_id,
                   or_(SweepRecord.lease_until.is_(None), SweepRecord.lease_until < now))
            .values(lease_until=now + timedelta(seconds=LEASE_S))
        ).rowcount  # type: ignore[attr-defined]
    try:
        yield bool(taken)
    finally:
        if taken:
            with database.session() as session:
                session.execute(
                    update(SweepRecord).where(SweepRecord.id == sweep_id).values(lease_until=None))


def advance_all(driving: Driving) -> int:
    """Advance every running sweep; how many were."""
    with driving.database.session() as session:
        ids = list(session.scalars(
            select(SweepRecord.id).where(SweepRecord.state == SweepState.RUNNING.value)))
    for sweep_id in ids:
        try:
            advance(driving, sweep_id)
        except Exception:  # one sweep's trouble (MLflow away) must not stop the others
            log.exception("advancing sweep %s failed; the next round tries again", sweep_id)
    return len(ids)


def advance_after_job(driving: Driving, job_id: str) -> None:
    """If job ``job_id`` is a sweep's trial, advance that sweep now rather than at the next round."""
    with driving.database.session() as session:
        sweep_id = session.scalar(select(TrialRecord.sweep_id).where(TrialRecord.job_id == job_id))
    if sweep_id is not None:
        advance(driving, sweep_id)


def advance(driving: Driving, sweep_id: str) -> None:
    """Settle the trials whose jobs ended, start new ones up to the parallelism and the budget, and
    finish the sweep once every trial has ended."""
    from services.trainer.engines.tracking import Tracking
    from services.trainer.sweeps.study import load_study

    with lease(driving.database, sweep_id) as held:
        if not held:
            return
        record = _sweep(driving.database, sweep_id)
        if record is None or record.state != SweepState.RUNNING.value:
            return
        spec = SweepCreate.model_validate(record.spec)
        tracking = Tracking(driving.tracking_uri)
        parent = record.mlflow_run_id or _start_parent_run(driving.database, record, spec, tracking)
        study = load_study(driving.database_url, sweep_id, spec)
        _settle(driving, study, sweep_id, spec, tracking, parent)
        running = _adopt_orphans(driving, study, sweep_id, spec)
        asked = _asked(study)
        budget = _budget(study, spec)
        while running < spec.parallelism and asked < budget:
            study = load_study(driving.database_url, sweep_id, spec, asked=asked)
            trial = study.ask(_distributions(spec))
            running += _start_trial(driving, study, sweep_id, spec, trial.number, trial.params)
            asked += 1
        if running == 0 and asked >= budget:
            _finish(driving, study, record.id, spec, tracking, parent)


def _sweep(database: Database, sweep_id: str) -> SweepRecord | None:
    with database.session() as session:
        record = session.get(SweepRecord, sweep_id)
        if record is not None:
            session.expunge(record)
        return record


def _distributions(spec: SweepCreate) -> dict[str, Any]:
    from services.trainer.sweeps.study import distributions

    return distributions(spec.space)


def _asked(study: optuna.Study) -> int:
    """Trials asked so far (the grid's queued points, not yet asked, left out)."""
    from optuna.trial import TrialState as OptunaState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != OptunaState.WAITING)


def _budget(study: optuna.Study, spec: SweepCreate) -> int:
    if spec.strategy.value == "grid":  # the points queued at creation: at most the budget
        return min(spec.trials, len(study.get_trials(deepcopy=False)))
    return spec.trials


def _start_parent_run(database: Database, record: SweepRecord, spec: SweepCreate, tracking: Tracking) -> str:
    """The sweep's MLflow run, in the model's experiment, that each trial's run is a child of."""
    run_id = tracking.start_run(experiment=spec.base.model_name, run_name=f"sweep-{record.id[:8]}",
                                tags={TAG_SWEEP: record.id})
    tracking.log_params(run_id, {"strategy": spec.strategy.value, "objective": spec.objective.metric,
                                 "direction": spec.objective.goal.value, "trials": spec.trials,
                                 "parallelism": spec.parallelism, "seed": spec.seed,
                                 "space": spec.model_dump(mode="json")["space"]})
    with database.session() as session:
        session.execute(update(SweepRecord).where(SweepRecord.id == record.id).values(mlflow_run_id=run_id))
    return run_id


def _adopt_orphans(driving: Driving, study: optuna.Study, sweep_id: str, spec: SweepCreate) -> int:
    """Give a job to each trial the study has running but no row names (a process that died between
    asking and storing the job); return how many trials are running now."""
    from optuna.trial import TrialState as OptunaState

    with driving.database.session() as session:
        known = set(session.scalars(select(TrialRecord.number).where(TrialRecord.sweep_id == sweep_id)))
    for trial in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,)):
        if trial.number not in known:
            log.warning("sweep %s: trial %d had no job (its process died after asking); it gets one now",
                        sweep_id, trial.number)
            _start_trial(driving, study, sweep_id, spec, trial.number, trial.params)
    with driving.database.session() as session:
        return len(list(session.scalars(select(TrialRecord.id).where(
            TrialRecord.sweep_id == sweep_id, TrialRecord.state == TrialState.RUNNING.value))))


def _start_trial(driving: Driving, study: optuna.Study, sweep_id: str, spec: SweepCreate,
                 number: int, params: dict[str, Any]) -> int:
    """Store trial ``number``'s job and its row together, then send the job: 1, or 0 when the values
    make an invalid job spec (the trial fails, saying why)."""
    values = sweep_space.values_of(spec.space, params)
    try:
        job_spec = sweep_space.trial_spec(spec.base, values)
    except ValidationError as exc:
        error = f"the trial's values make an invalid job spec: {exc.errors()[0]['msg']}"
        with driving.database.session() as session:
            session.add(TrialRecord(sweep_id=sweep_id, number=number, params=values,
                                    state=TrialState.FAILED.value, error=error))
        study.tell(number, state=_optuna_state(TrialState.FAILED))
        return 0
    now = utcnow()
    job = JobRecord(id=str(uuid.uuid4()), state=JobState.QUEUED.value, spec=job_spec.model_dump(mode="json"),
                    progress=Progress(epochs=job_spec.training.epochs).model_dump(), metrics={},
                    model_name=job_spec.model_name, attempts=0, created_at=now, updated_at=now)
    with driving.database.session() as session:  # one transaction: no job without its trial, nor the reverse
        session.add(job)
        session.add(TrialRecord(sweep_id=sweep_id, number=number, job_id=job.id, params=values,
                                state=TrialState.RUNNING.value))
    log.info("sweep %s: trial %d is job %s with %s", sweep_id, number, job.id, values)
    store.send(database=driving.database, enqueue=driving.enqueue, job_id=job.id,
               queue=job_spec.resources.queue.value)
    return 1


def _optuna_state(state: TrialState) -> Any:
    from optuna.trial import TrialState as OptunaState

    return {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
            TrialState.FAILED: OptunaState.FAIL}[state]


def _settle(driving: Driving, study: optuna.Study, sweep_id: str, spec: SweepCreate, tracking: Tracking,
            parent: str) -> None:
    """Tell the study how each trial whose job ended did, and note it on the trial's row."""
    statement = (select(TrialRecord, JobRecord).join(JobRecord, JobRecord.id == TrialRecord.job_id)
                 .where(TrialRecord.sweep_id == sweep_id, TrialRecord.state == TrialState.RUNNING.value,
                        JobRecord.state.in_(ENDED_JOB_STATES)).order_by(TrialRecord.number))
    with driving.database.session() as session:
        ended = [(trial.number, job.state, dict(job.metrics or {}), job.error, job.mlflow_run_id)
                 for trial, job in session.execute(statement).tuples()]
    if not ended:
        return
    frozen = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for number, job_state, metrics, job_error, run_id in ended:
        state, value, error = _outcome(spec, job_state, metrics, job_error)
        found = frozen.get(number)
        if state == TrialState.PRUNED and found is not None and found.intermediate_values:
            value = found.intermediate_values[max(found.intermediate_values)]
        if found is not None and not found.state.is_finished():
            if state == TrialState.COMPLETE:
                study.tell(number, value)
            else:
                study.tell(number, state=_optuna_state(state))
        with driving.database.session() as session:
            session.execute(update(TrialRecord)
                            .where(TrialRecord.sweep_id == sweep_id, TrialRecord.number == number)
                            .values(state=state.value, value=value, error=error, mlflow_run_id=run_id))
        log.info("sweep %s: trial %d %s (%s %s)", sweep_id, number, state.value, spec.objective.metric, value)
        _note_on_runs(tracking, parent, number, state, value, run_id)


def _outcome(spec: SweepCreate, job_state: str, metrics: dict[str, Any],
             job_error: str | None) -> tuple[TrialState, float | None, str | None]:
    """A trial's state, objective and error from how its job ended."""
    metric = spec.objective.metric
    if job_state == JobState.SUCCEEDED.value:
        if metric not in metrics:
            return TrialState.FAILED, None, (f"the job reported no {metric} (it reported: "
                                             f"{', '.join(sorted(metrics)) or 'nothing'})")
        return TrialState.COMPLETE, float(metrics[metric]), None
    if job_state == JobState.CANCELLED.value and (job_error or "").startswith(PRUNED_PREFIX):
        return TrialState.PRUNED, None, job_error
    return TrialState.FAILED, None, job_error or f"the job ended {job_state}"


def _note_on_runs(tracking: Tracking, parent: str, number: int, state: TrialState, value: float | None,
                  run_id: str | None) -> None:
    """The objective on the sweep's run, one step per trial; a pruned trial's run marked KILLED."""
    try:
        if state == TrialState.COMPLETE and value is not None:
            tracking.log_metrics(parent, {"objective": value}, step=number)
        if state == TrialState.PRUNED and run_id:
            tracking.client.set_terminated(run_id, status="KILLED")
    except Exception as exc:  # MLflow's view of the sweep is a nicety; the study is the record
        log.warning("could not note trial %d on MLflow: %s", number, exc)


def _finish(driving: Driving, study: optuna.Study, sweep_id: str, spec: SweepCreate, tracking: Tracking,
            parent: str) -> None:
    """Every trial ended: register the best trial's model (or fail, saying why none can be)."""
    with driving.database.session() as session:
        rows = list(session.scalars(select(TrialRecord).where(TrialRecord.sweep_id == sweep_id)))
        session.expunge_all()
    best = best_trial(rows, maximize=spec.objective.goal.value == "maximize")
    if best is None or best.registration is None or best.job_id is None:
        errors = [f"trial {row.number}: {row.error}" for row in rows if row.error][:3]
        error = "no trial completed with an objective" + (f" ({'; '.join(errors)})" if errors else "")
        _end(driving.database, sweep_id, SweepState.FAILED, error=error)
        tracking.end_run(parent, ok=False)
        log.warning("sweep %s failed: %s", sweep_id, error)
        return
    registration = best.registration
    version = tracking.register(
        model_name=spec.base.model_name, job_id=best.job_id, run_id=best.mlflow_run_id or "",
        source=registration["source"], tags={**registration["tags"], TAG_SWEEP: sweep_id},
        description=f"{registration['description']} Best of sweep {sweep_id} (trial {best.number}, "
                    f"{spec.objective.metric} {best.value:.6g}).",
    )
    store.update_job(database=driving.database, job_id=best.job_id, model_version=version)
    tracking.set_tag(parent, "shipyard.best_trial", str(best.number))
    tracking.log_metrics(parent, {"best_objective": float(best.value or 0.0)}, step=best.number)
    tracking.end_run(parent, ok=True)
    _end(driving.database, sweep_id, SweepState.SUCCEEDED, model_version=version)
    log.info("sweep %s succeeded: trial %d is best (%s %s), registered as %s v%s", sweep_id, best.number,
             spec.objective.metric, best.value, spec.base.model_name, version)


def best_trial(rows: list[TrialRecord], *, maximize: bool) -> TrialRecord | None:
    """The complete trial with the best objective (the earliest of equals), or None."""
    complete = [row for row in rows if row.state == TrialState.COMPLETE.value and row.value is not None]
    if not complete:
        return None
    sign = -1.0 if maximize else 1.0
    return min(complete, key=lambda row: (sign * float(row.value or 0.0), row.number))


def _end(database: Database, sweep_id: str, state: SweepState, **values: Any) -> None:
    with database.session() as session:
        session.execute(update(SweepRecord)
                        .where(SweepRecord.id == sweep_id, SweepRecord.state == SweepState.RUNNING.value)
                        .values(state=state.value, **values))


def cancel(driving: Driving, sweep_id: str) -> bool:
    """End a running sweep as cancelled: its queued and running trial jobs are cancelled too, and no
    model is registered. False when it was not running."""
    with driving.database.session() as session:
        changed = session.execute(
            update(SweepRecord)
            .where(SweepRecord.id == sweep_id, SweepRecord.state == SweepState.RUNNING.value)
            .values(state=SweepState.CANCELLED.value, error="cancelled on request")
        ).rowcount  # type: ignore[attr-defined]
        if not changed:
            return False
        jobs = list(session.scalars(select(TrialRecord.job_id).where(
            TrialRecord.sweep_id == sweep_id, TrialRecord.state == TrialState.RUNNING.value)))
        session.execute(update(JobRecord).where(JobRecord.id.in_(jobs), JobRecord.state.in_(
            (JobState.QUEUED.value, JobState.RUNNING.value))).values(
            state=JobState.CANCELLED.value, error=f"cancelled with sweep {sweep_id}"))
        session.execute(update(TrialRecord).where(
            TrialRecord.sweep_id == sweep_id, TrialRecord.state == TrialState.RUNNING.value).values(
            state=TrialState.CANCELLED.value, error="cancelled with the sweep"))
    log.info("sweep %s cancelled with %d running trial(s)", sweep_id, len(jobs))
    _end_parent_run(driving, sweep_id, status="KILLED")
    return True


def _end_parent_run(driving: Driving, sweep_id: str, *, status: str) -> None:
    """Mark the sweep's MLflow run ended; MLflow away costs only that mark."""
    from services.trainer.engines.tracking import Tracking

    record = _sweep(driving.database, sweep_id)
    if record is None or record.mlflow_run_id is None:
        return
    try:
        Tracking(driving.tracking_uri).client.set_terminated(record.mlflow_run_id, status=status)
    except Exception as exc:
        log.warning("could not mark the MLflow run of sweep %s %s: %s", sweep_id, status, exc)
