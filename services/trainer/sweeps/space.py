"""The search space: a trial's values applied to the base spec's dotted fields, checked as a job spec.

Optuna sees a choice as the index of its value (its categorical values must be scalars, and a choice may
be a list such as ``model.hidden: [[64], [64, 32]]``); :func:`values_of` turns a trial's Optuna params
back into the spec values the job gets and the API shows.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from pydantic import ValidationError

from services.trainer.jobs.schemas import CLASSIFICATION_ONLY, REGRESSION_ONLY, JobCreate, Task
from services.trainer.sweeps.schemas import ChoiceParam, FloatParam, IntParam, Param, Strategy, SweepCreate
from shipyard_common.errors import ValidationFailed

# Fields a trial may not change: what data it reads (resolved once, at submission) and where it registers.
FIXED_FIELDS = ("spec_version", "model_name", "data.dataset", "data.rev", "data.split.test_rev",
                "data.task", "data.target", "data.features")


def apply(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec ``base`` with each dotted field set (missing or null parents become objects)."""
    spec = copy.deepcopy(base)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = spec
        for name in parents:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[leaf] = value
    return spec


def trial_spec(base: JobCreate, values: dict[str, Any]) -> JobCreate:
    """The job spec of a trial; :class:`ValidationError` when the values make it invalid."""
    return JobCreate.model_validate(apply(base.model_dump(mode="json"), values))


def values_of(space: dict[str, Param], params: dict[str, Any]) -> dict[str, Any]:
    """The spec values of a trial's Optuna params (a choice's index becomes its value)."""
    values = {}
    for path, param in space.items():
        value = params[path]
        values[path] = param.values[int(value)] if isinstance(param, ChoiceParam) else value
    return values


def grid_points(space: dict[str, Param], limit: int) -> list[dict[str, Any]]:
    """Every combination of the space's values as Optuna params, in the order the space lists them
    (the last field varies fastest), at most ``limit``."""
    axes = [_grid_axis(param) for param in space.values()]
    combos = itertools.islice(itertools.product(*axes), limit)
    return [dict(zip(space, combo, strict=True)) for combo in combos]


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(_grid_axis(param)) for param in space.values())


def _grid_axis(param: Param) -> list[Any]:
    if isinstance(param, ChoiceParam):
        return list(range(len(param.values)))
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step))
    assert param.step is not None  # check_space refuses a float range without a step for the grid
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    return [round(param.low + i * param.step, 12) for i in range(count)]


def check_space(sweep: SweepCreate) -> None:
    """Refuse (422, naming the field) a space a trial could not run: a fixed field, a value the job spec
    refuses, a grid over a continuous range, an objective the base spec does not report."""
    problems: list[dict[str, str]] = []
    for path, param in sweep.space.items():
        problems += _field_problems(sweep, path, param)
    problems += _objective_problems(sweep)
    if problems:
        first = problems[0]
        raise ValidationFailed(f"invalid request: {first['field']}: {first['message']}", details=problems)


def _field_problems(sweep: SweepCreate, path: str, param: Param) -> list[dict[str, str]]:
    field = f"space.{path}"
    if any(path == fixed or path.startswith(fixed + ".") for fixed in FIXED_FIELDS):
        return [{"field": field, "message": f"{path} is fixed for every trial of a sweep: set it in base"}]
    if sweep.strategy == Strategy.GRID and isinstance(param, FloatParam) and param.step is None:
        return [{"field": field, "message": "the grid strategy needs a step for a float range"}]
    samples = param.values if isinstance(param, ChoiceParam) else [param.low, param.high]
    for sample in samples:
        try:
            trial_spec(sweep.base, {path: sample})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            return [{"field": field, "message": f"the value {sample!r} makes the job spec invalid: "
                     f"{where + ': ' if where else ''}{error['msg']}"}]
    return []


def _objective_problems(sweep: SweepCreate) -> list[dict[str, str]]:
    metric, base = sweep.objective.metric, sweep.base
    wrong = REGRESSION_ONLY if base.data.task == Task.CLASSIFICATION else CLASSIFICATION_ONLY
    message = None
    if sweep.objective.epoch_metric in wrong:
        message = f"{metric} is not computed for {base.data.task.value}"
    elif metric.startswith("cv_") and base.evaluation is None:
        message = f"{metric} is cross-validation's: the base spec needs evaluation: {{kfold: k}}"
    elif metric.startswith("test_") and not _has_test_rows(base):
        message = f"{metric} is measured on test rows: the base spec needs data.split with test rows"
    return [{"field": "objective.metric", "message": message}] if message else []


def _has_test_rows(base: JobCreate) -> bool:
    split = base.data.split
    return split is not None and any(part is not None for part in (split.test, split.test_rev, split.column))
