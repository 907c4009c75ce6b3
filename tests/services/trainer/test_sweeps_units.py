"""Sweeps without a worker: the space applied to specs, the grid's points, the trial judge's pruning
(median and Hyperband) against a real Optuna study in SQLite, and the plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest

from services.trainer.sweeps import space, study, trials
from services.trainer.sweeps.schemas import SweepCreate, SweepState, TrialPublic, TrialState
from services.trainer.sweeps.service import to_public
from services.trainer.sweeps.tables import SweepRecord, TrialRecord
from shipyard_common.db import Database, utcnow
from tests.services.trainer.support import job_spec


def sweep(**changes: Any) -> SweepCreate:
    return SweepCreate.model_validate({
        "base": job_spec(rev="a" * 40, model_name="m"), "objective": {"metric": "val_accuracy"}, "trials": 4,
        "space": {"training.learning_rate": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
                  "model.hidden": {"type": "choice", "values": [[8], [16, 8]]}},
        **changes})


def test_a_trials_values_land_on_dotted_fields_and_a_choice_is_its_index_for_optuna():
    spec = sweep()
    values = space.values_of(spec.space, {"training.learning_rate": 0.01, "model.hidden": 1})
    assert values == {"training.learning_rate": 0.01, "model.hidden": [16, 8]}
    job = space.trial_spec(spec.base, values)
    assert job.training.learning_rate == 0.01 and job.model.hidden == [16, 8]  # type: ignore[union-attr]
    assert spec.base.training.learning_rate == 0.001  # the base is untouched
    stopping = space.trial_spec(spec.base, {"training.early_stopping.patience": 3})  # a null parent
    assert stopping.training.early_stopping is not None and stopping.training.early_stopping.patience == 3


def test_the_grid_is_every_combination_in_the_order_the_space_lists_them():
    spec = sweep(strategy="grid", space={
        "training.batch_size": {"type": "choice", "values": [16, 32]},
        "training.learning_rate": {"type": "float", "low": 0.01, "high": 0.03, "step": 0.01}})
    assert space.grid_size(spec.space) == 6
    assert space.grid_points(spec.space, limit=4) == [
        {"training.batch_size": 0, "training.learning_rate": 0.01},
        {"training.batch_size": 0, "training.learning_rate": 0.02},
        {"training.batch_size": 0, "training.learning_rate": 0.03},
        {"training.batch_size": 1, "training.learning_rate": 0.01}]


@pytest.mark.parametrize(("param", "message"), [
    ({"type": "float", "low": 0.1, "high": 0.01}, r"low \(0.1\) is above high \(0.01\)"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "a log scale needs low above 0"),
    ({"type": "int", "low": 1, "high": 100, "step": 2, "log": True}, "takes no step"),
])
def test_an_impossible_range_is_refused_by_the_schema(param, message):
    with pytest.raises(ValueError, match=message):
        sweep(space={"training.epochs": param})


def test_an_objective_no_job_reports_is_refused():
    with pytest.raises(ValueError, match="is not a metric jobs report"):
        sweep(objective={"metric": "accuracy"})
    assert sweep(objective={"metric": "cv_f1_macro_mean"}).objective.epoch_metric == "val_f1_macro"
    assert sweep(objective={"metric": "test_mae"}).objective.goal == "minimize"


def make_sweep(tmp_path: Path, spec: SweepCreate) -> tuple[str, trials.TrialLink, Any, str]:
    """A stored sweep, its study and one asked trial: (database URL, the trial's link, study, sweep id)."""
    url = f"sqlite:///{tmp_path / 'shipyard.db'}"
    database = Database(url)
    database.create_tables()
    with database.session() as session:
        session.add(SweepRecord(id="s1", state="running", spec=spec.model_dump(mode="json"), model_name="m",
                                study_name=study.study_name("s1")))
    study.create_study(url, "s1", spec)
    return url, trials.TrialLink("s1", 0, "j0", None, spec), database, "s1"


def finished_trial(url: str, spec: SweepCreate, values: list[float]) -> None:
    """One trial that reported ``values`` (epochs 1..n), asking the pruner each time as a trial's job does
    (Hyperband notes the rungs a trial reached then), and completed with the last."""
    loaded = study.load_study(url, "s1", spec)
    trial = loaded.ask(study.distributions(spec.space))
    for epoch, value in enumerate(values, start=1):
        trial.report(value, epoch)
        assert not trial.should_prune()
    loaded.tell(trial.number, values[-1])


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_the_judge_prunes_a_trial_that_lags_the_finished_ones(tmp_path, pruner):
    spec = sweep(pruning={"pruner": pruner, "startup_trials": 2})
    spec.base.training.epochs = 10  # Hyperband's brackets reach from 1 to 10 epochs
    url, _, _, _ = make_sweep(tmp_path, spec)
    for _ in range(9):  # Hyperband: every bracket has finished trials to compare with
        finished_trial(url, spec, [0.90, 0.93, 0.95, 0.96, 0.97, 0.97, 0.98, 0.98, 0.98, 0.98])
    lagging = study.load_study(url, "s1", spec).ask(study.distributions(spec.space))
    judge = trials.judge(url, trials.TrialLink("s1", lagging.number, "j", None, spec))
    verdicts = (judge(epoch, {"val_accuracy": 0.5, "val_loss": 0.7}) for epoch in range(1, 11))
    pruned = next((verdict for verdict in verdicts if verdict is not None), None)
    assert isinstance(pruned, trials.TrialPruned)
    assert re.match(r"pruned by sweep s1 \(trial 9\): its val_accuracy 0\.5", str(pruned)), str(pruned)
    judge_keeps = trials.judge(url, trials.TrialLink(
        "s1", study.load_study(url, "s1", spec).ask(study.distributions(spec.space)).number, "k", None, spec))
    for epoch in range(1, 11):
        assert judge_keeps(epoch, {"val_accuracy": 0.99}) is None  # ahead of the others: never pruned
        assert judge_keeps(epoch, {"val_loss": 0.1}) is None  # no objective in these metrics: no report


def test_the_public_sweep_has_the_best_complete_trial_and_the_plot_draws_each_value(tmp_path):
    spec = sweep(objective={"metric": "val_loss"})
    record = SweepRecord(id="s2", state=SweepState.RUNNING.value, spec=spec.model_dump(mode="json"),
                         model_name="m", study_name="x", created_at=utcnow(), updated_at=utcnow())
    rows = [TrialRecord(sweep_id="s2", number=n, params={"p": n}, state=s.value, value=v, job_id=f"j{n}")
            for n, (s, v) in enumerate([(TrialState.COMPLETE, 0.3), (TrialState.PRUNED, 0.1),
                                        (TrialState.COMPLETE, 0.2), (TrialState.FAILED, None),
                                        (TrialState.COMPLETE, 0.2)])]
    public = to_public(record, rows)
    assert public.best is not None and public.best.number == 2  # lowest loss, the earlier of equals
    assert all(isinstance(t, TrialPublic) for t in public.trials)
    from services.trainer.sweeps.plot import objective_svg

    svg = objective_svg(public)
    assert svg.count('class="trial complete"') == 3 and svg.count('class="trial pruned"') == 1
    assert 'd="M' in svg and "val_loss over trials (minimize)" in svg
    empty = objective_svg(to_public(record, []))
    assert "no trial has a value yet" in empty


def test_optunas_tables_stay_out_of_the_schema_prefect_migrates(postgres_url: str) -> None:
    """On PostgreSQL the platform database holds Prefect's tables too (``shipyard up``), versioned with
    alembic as Optuna's are: Optuna's must live in a schema of their own, or Prefect, finding Optuna's
    revision in ``public.alembic_version``, would refuse to start (it did, in CI)."""
    from sqlalchemy import create_engine, text

    storage = study.storage(postgres_url)
    storage.create_new_study(directions=[optuna.study.StudyDirection.MAXIMIZE], study_name="schema-check")
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            where = {row[0] for row in connection.execute(text(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'studies'"))}
            versions = connection.execute(text(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'alembic_version'"))
            schemas = {row[0] for row in versions}
            read = text("SELECT version_num FROM public.alembic_version")
            public = connection.execute(read).scalars().all() if "public" in schemas else []
    finally:
        engine.dispose()
    assert where == {study.OPTUNA_SCHEMA} and study.OPTUNA_SCHEMA in schemas
    assert not any(version.startswith("v3.") for version in public)  # none of Optuna's revisions there
