"""What the HTTP API does with sweeps: create (check, store, start), read, list, cancel, plot."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import select

from services.trainer.sweeps import driver, plot
from services.trainer.sweeps.schemas import (
    BestTrial,
    SweepCreate,
    SweepPublic,
    SweepState,
    TrialPublic,
    TrialState,
)
from services.trainer.sweeps.space import check_space
from services.trainer.sweeps.tables import SweepRecord, TrialRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Conflict, NotFound

log = logging.getLogger("shipyard.trainer.sweeps")

MAX_LIST_LIMIT = 1000


def create_sweep(*, driving: driver.Driving, spec: SweepCreate) -> SweepPublic:
    """Check the space (422 naming the field), store the sweep and its study, start its first trials.

    The sweep is stored before anything else can fail: if MLflow or the broker is away, the caller
    still gets 201 and the reconciler's next round starts the trials (as a job is sent later).
    """
    from services.trainer.sweeps.study import create_study, study_name

    check_space(spec)
    # The direction as it is decided now, so that the sweep shows it (and a default never changes under it).
    spec = spec.model_copy(update={"objective": spec.objective.model_copy(
        update={"direction": spec.objective.goal})})
    sweep_id = str(uuid.uuid4())
    now = utcnow()
    create_study(driving.database_url, sweep_id, spec)
    with driving.database.session() as session:
        session.add(SweepRecord(id=sweep_id, state=SweepState.RUNNING.value,
                                spec=spec.model_dump(mode="json"), model_name=spec.base.model_name,
                                study_name=study_name(sweep_id),
                                created_at=now, updated_at=now))
    try:
        driver.advance(driving, sweep_id)
    except Exception as exc:  # the reconciler advances it again within reconcile_interval_s
        log.warning("sweep %s is stored but its first trials could not start yet: %s", sweep_id, exc)
    return get_sweep(database=driving.database, sweep_id=sweep_id)


def get_sweep(*, database: Database, sweep_id: str) -> SweepPublic:
    with database.session() as session:
        record = session.get(SweepRecord, sweep_id)
        if record is None:
            raise NotFound(f"no sweep with id {sweep_id!r}")
        rows = list(session.scalars(select(TrialRecord).where(TrialRecord.sweep_id == sweep_id)
                                    .order_by(TrialRecord.number)))
        return to_public(record, rows)


def list_sweeps(
    *, database: Database, state: SweepState | None = None, limit: int = 100
) -> list[SweepPublic]:
    """Newest first."""
    statement = select(SweepRecord).order_by(SweepRecord.created_at.desc(), SweepRecord.id)
    if state is not None:
        statement = statement.where(SweepRecord.state == state.value)
    with database.session() as session:
        records = list(session.scalars(statement.limit(max(1, min(limit, MAX_LIST_LIMIT)))))
        trials = list(session.scalars(select(TrialRecord).where(
            TrialRecord.sweep_id.in_([r.id for r in records])).order_by(TrialRecord.number)))
        return [to_public(r, [t for t in trials if t.sweep_id == r.id]) for r in records]


def cancel_sweep(*, driving: driver.Driving, sweep_id: str) -> SweepPublic:
    """Cancel a running sweep and its trials' jobs: 404 for an unknown id, 409 for one that has ended."""
    sweep = get_sweep(database=driving.database, sweep_id=sweep_id)
    if not driver.cancel(driving, sweep_id):
        sweep = get_sweep(database=driving.database, sweep_id=sweep_id)
        raise Conflict(f"sweep {sweep_id!r} has already ended as {sweep.state.value!r}; only a running "
                       "sweep can be cancelled", details={"state": sweep.state.value})
    return get_sweep(database=driving.database, sweep_id=sweep.id)


def plot_svg(*, database: Database, sweep_id: str) -> str:
    sweep = get_sweep(database=database, sweep_id=sweep_id)
    return plot.objective_svg(sweep)


def to_public(record: SweepRecord, rows: list[TrialRecord]) -> SweepPublic:
    spec = SweepCreate.model_validate(record.spec)
    best = driver.best_trial(rows, maximize=spec.objective.goal.value == "maximize")
    return SweepPublic(
        id=record.id, state=SweepState(record.state), model_name=record.model_name, strategy=spec.strategy,
        objective=spec.objective, trials_budget=spec.trials, parallelism=spec.parallelism,
        trials=[TrialPublic(number=r.number, state=TrialState(r.state), params=r.params, value=r.value,
                            job_id=r.job_id, mlflow_run_id=r.mlflow_run_id, error=r.error) for r in rows],
        best=BestTrial(number=best.number, value=float(best.value or 0.0), params=best.params,
                       job_id=best.job_id, mlflow_run_id=best.mlflow_run_id) if best is not None else None,
        model_version=record.model_version, mlflow_run_id=record.mlflow_run_id, error=record.error,
        created_at=record.created_at, updated_at=record.updated_at, spec=spec,
    )
