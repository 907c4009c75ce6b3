"""What a sweep's trial job does differently from another job, for the runner's hooks.

Its MLflow run is a child of the sweep's run (:func:`run_tags`); each epoch's objective is reported to
the study and the pruner may stop it (:func:`judge`, raising :class:`TrialPruned`); and it does not
register its model but keeps what it would have registered (:func:`defer_registration`) for the driver,
which registers the best trial's once the sweep ends. Light to import: Optuna loads only in :func:`judge`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from services.trainer.sweeps.schemas import SweepCreate
from services.trainer.sweeps.tables import SweepRecord, TrialRecord
from shipyard_common.db import Database

log = logging.getLogger("shipyard.trainer.sweeps")

# How a pruned trial's job error begins: the driver tells a pruned trial from a cancelled one by it.
PRUNED_PREFIX = "pruned by sweep"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the trial's run under the sweep's
TAG_SWEEP = "shipyard.sweep_id"
TAG_TRIAL = "shipyard.sweep_trial"


class TrialPruned(Exception):
    """The sweep's pruner stopped this trial; the message says at which epoch and why."""


@dataclass(frozen=True)
class TrialLink:
    """Job ``job_id`` is trial ``number`` of sweep ``sweep_id``."""

    sweep_id: str
    number: int
    job_id: str
    parent_run_id: str | None
    spec: SweepCreate


def link_for(database: Database, job_id: str) -> TrialLink | None:
    """The sweep trial job ``job_id`` trains, or None for an ordinary job."""
    statement = (select(TrialRecord.sweep_id, TrialRecord.number, SweepRecord.mlflow_run_id, SweepRecord.spec)
                 .join(SweepRecord, SweepRecord.id == TrialRecord.sweep_id)
                 .where(TrialRecord.job_id == job_id))
    with database.session() as session:
        row = session.execute(statement).first()
    if row is None:
        return None
    return TrialLink(sweep_id=row[0], number=row[1], job_id=job_id, parent_run_id=row[2],
                     spec=SweepCreate.model_validate(row[3]))


def run_tags(link: TrialLink | None) -> dict[str, str]:
    """Tags of a trial's MLflow run: its parent (the sweep's run), the sweep and the trial number."""
    if link is None:
        return {}
    tags = {TAG_SWEEP: link.sweep_id, TAG_TRIAL: str(link.number)}
    if link.parent_run_id:
        tags[TAG_PARENT_RUN] = link.parent_run_id
    return tags


def defer_registration(
    database: Database, link: TrialLink, *, run_id: str, registration: dict[str, Any]
) -> None:
    """Keep what the trial's job would have registered (``source``, ``tags``, ``description``)."""
    with database.session() as session:
        session.execute(update(TrialRecord).where(TrialRecord.job_id == link.job_id)
                        .values(registration=registration, mlflow_run_id=run_id))
    log.info("trial %d of sweep %s trained; the sweep registers its best trial's model once it ends",
             link.number, link.sweep_id)


def judge(database_url: str, link: TrialLink) -> Callable[[int, dict[str, float]], TrialPruned | None]:
    """Report each epoch's objective to the study; return a :class:`TrialPruned` when the pruner says so.

    The caller reports here before it shows the epoch anywhere else (and raises what this returns after),
    so a worker killed once the job's row shows epoch N has told the study N: the takeover resumes after
    N's checkpoint and never reports it again. A report that fails (the study unreachable, the trial
    already told) costs only that report: the job trains on, as it would without a sweep.
    """
    import optuna

    from services.trainer.sweeps.study import load_study, storage, study_name

    spec = link.spec
    metric = spec.objective.epoch_metric
    study = load_study(database_url, link.sweep_id, spec)
    rdb = storage(database_url)
    study_id = rdb.get_study_id_from_name(study_name(link.sweep_id))
    trial = optuna.trial.Trial(study, rdb.get_trial_id_from_study_id_trial_number(study_id, link.number))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> TrialPruned | None:
        value = metrics.get(metric)
        if value is None:
            return None
        try:
            trial.report(float(value), epoch)
            prune = trial.should_prune()
        except Exception as exc:  # the model still matters more than one report
            log.warning("could not report epoch %d to sweep %s: %s", epoch, link.sweep_id, exc)
            return None
        if not prune:
            return None
        return TrialPruned(f"{PRUNED_PREFIX} {link.sweep_id} (trial {link.number}): its {metric} "
                           f"{value:.4g} at epoch {epoch} lagged the earlier trials' "
                           f"({spec.pruning.pruner.value if spec.pruning else 'none'} pruner)")

    return on_epoch
