"""Optuna's side of a sweep: its study in the platform database (Optuna's RDB storage), the sampler,
the pruner and each field's distribution.

Imported only where a sweep is advanced or a trial reports (Optuna is not light). Samplers are
re-created each time a process loads the study, so each is seeded with the sweep's seed and the number
of trials asked so far: a random sampler seeded the same way on every load would ask the same values.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from services.trainer.sweeps.schemas import (
    ChoiceParam,
    IntParam,
    Param,
    PrunerName,
    PruningSpec,
    Strategy,
    SweepCreate,
)
from shipyard_common.db import normalize_db_url

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger("shipyard.trainer.sweeps")

_storages: dict[tuple[int, str], RDBStorage] = {}


#: Optuna's tables in a PostgreSQL platform database: a schema of their own. Optuna versions its tables
#: with alembic (an ``alembic_version`` table), as Prefect does in the same database (``shipyard up`` puts
#: Prefect's tables there): in one schema each would find the other's revision and refuse to start.
OPTUNA_SCHEMA = "optuna"


def storage(database_url: str) -> RDBStorage:
    """Optuna's storage in the platform database, one per process (a forked worker opens its own)."""
    from optuna.storages import RDBStorage

    key = (os.getpid(), database_url)
    if key not in _storages:
        url = normalize_db_url(database_url)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
        if not url.startswith("sqlite"):
            _create_schema(url)
            engine_kwargs = {"pool_pre_ping": True,
                             "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"}}
        _storages[key] = RDBStorage(url=url, engine_kwargs=engine_kwargs)
    return _storages[key]


def _create_schema(url: str) -> None:
    """The schema Optuna's tables live in (PostgreSQL); another process may be creating it too."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
    except (IntegrityError, ProgrammingError):  # created by another process at the same moment
        pass
    finally:
        engine.dispose()


def study_name(sweep_id: str) -> str:
    return f"shipyard-sweep-{sweep_id}"


def create_study(database_url: str, sweep_id: str, spec: SweepCreate) -> None:
    """The sweep's study; for the grid strategy, every point it will try, queued in order."""
    from services.trainer.sweeps.space import grid_points

    study = optuna.create_study(
        storage=storage(database_url), study_name=study_name(sweep_id),
        direction=spec.objective.goal.value, load_if_exists=True,
    )
    if spec.strategy == Strategy.GRID and not study.get_trials(deepcopy=False):
        for params in grid_points(spec.space, limit=spec.trials):
            study.enqueue_trial(params, skip_if_exists=True)


def load_study(database_url: str, sweep_id: str, spec: SweepCreate, *, asked: int = 0) -> optuna.Study:
    """The sweep's study with its sampler (seeded for the ``asked``-th trial) and pruner."""
    seed = (spec.seed * 1_000_003 + asked) % 2**32
    sampler: optuna.samplers.BaseSampler
    if spec.strategy == Strategy.TPE:
        sampler = optuna.samplers.TPESampler(seed=seed)
    else:  # random; the grid's points are queued trials, which any sampler hands out as they are
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return optuna.load_study(study_name=study_name(sweep_id), storage=storage(database_url),
                             sampler=sampler, pruner=pruner(spec.pruning, epochs=spec.base.training.epochs))


def pruner(pruning: PruningSpec | None, *, epochs: int) -> optuna.pruners.BasePruner:
    if pruning is None or pruning.pruner == PrunerName.NONE:
        return optuna.pruners.NopPruner()
    if pruning.pruner == PrunerName.HYPERBAND:
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.MedianPruner(n_startup_trials=pruning.startup_trials,
                                       n_warmup_steps=pruning.warmup_epochs)


def distributions(space: dict[str, Param]) -> dict[str, BaseDistribution]:
    """Each field's distribution; a choice is the index of its value (see :mod:`.space`)."""
    found: dict[str, BaseDistribution] = {}
    for path, param in space.items():
        if isinstance(param, ChoiceParam):
            found[path] = CategoricalDistribution(list(range(len(param.values))))
        elif isinstance(param, IntParam):
            found[path] = IntDistribution(param.low, param.high, step=param.step, log=param.log)
        else:
            found[path] = FloatDistribution(param.low, param.high, step=param.step, log=param.log)
    return found
