"""What the registry says about a served version: its lineage tags, how it takes its inputs (its
signature tag; for sequences, where its dataset holds them: its shipyard.sequence tag, or for a version
registered before that tag its run's data.sequence params), and which versions hold an alias."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.monitor.windows.inputs import SEQUENCES, Inputs, read_inputs
from shipyard_common.datasets.sequences import sequence_layout
from shipyard_common.errors import Conflict, InvalidInput, NotFound, Unavailable
from shipyard_common.lineage import (
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_SEQUENCE,
    TAG_SIGNATURE,
    TAG_TARGET,
    TAG_TASK,
)
from shipyard_common.mlflow_client import mlflow_unavailable, mlflow_unreachable

# MLflow answers these when the model or version does not exist.
_MLFLOW_MISSING = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


@dataclass(frozen=True)
class Lineage:
    """The data a version was trained on: dataset @ rev, its features, target and task; and how the
    version takes its inputs (rows, a table's columns, sequences)."""

    model: str
    version: str
    dataset: str
    rev: str
    features: tuple[str, ...]
    target: str | None
    task: str | None
    inputs: Inputs = field(default_factory=Inputs)


def _mlflow_error(exc: Exception, what: str, tracking_uri: str) -> Exception:
    """NotFound for a missing model or version; otherwise Unavailable, the platform's one error for
    an MLflow that does not answer when it does not (:mod:`shipyard_common.mlflow_client`)."""
    if mlflow_unreachable(exc) or not isinstance(exc, MlflowException):
        return mlflow_unavailable(tracking_uri, exc)
    if exc.error_code in _MLFLOW_MISSING:
        return NotFound(f"{what} is not in the registry")
    return Unavailable(f"the MLflow registry did not answer for {what}: {exc.message}")


def read_lineage(*, mlflow: MlflowClient, model: str, version: str) -> Lineage:
    """The lineage tags of ``model`` v``version``; Conflict when they are missing or malformed."""
    try:
        found = mlflow.get_model_version(model, version)
    except Exception as exc:  # requests/connection errors surface unwrapped from the client
        raise _mlflow_error(exc, f"version {version} of {model!r}", mlflow.tracking_uri) from exc
    tags: dict[str, str] = dict(found.tags or {})
    missing = [tag for tag in (TAG_DATASET, TAG_DATASET_REV, TAG_FEATURES) if not tags.get(tag)]
    if missing:
        raise Conflict(f"version {version} of {model!r} lacks the lineage tags {missing}; "
                       "drift needs the dataset revision and features it was trained on")
    try:
        features = json.loads(tags[TAG_FEATURES])
    except ValueError as exc:
        raise Conflict(f"tag {TAG_FEATURES} of {model!r} v{version} is not JSON: {exc}") from exc
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise Conflict(f"tag {TAG_FEATURES} of {model!r} v{version} is not a list of feature names")
    inputs = read_inputs(tags.get(TAG_SIGNATURE), features=tuple(features))
    if inputs.kind == SEQUENCES:
        inputs = _with_source(mlflow, inputs, tags=tags, run_id=found.run_id, features=tuple(features),
                              what=f"{model!r} v{version}")
    return Lineage(model=model, version=version, dataset=tags[TAG_DATASET], rev=tags[TAG_DATASET_REV],
                   features=tuple(features), target=tags.get(TAG_TARGET) or None,
                   task=tags.get(TAG_TASK) or None, inputs=inputs)


def _with_source(mlflow: MlflowClient, inputs: Inputs, *, tags: dict[str, str], run_id: str | None,
                 features: tuple[str, ...], what: str) -> Inputs:
    """``inputs`` with where the training dataset holds the sequences: the version's shipyard.sequence
    tag, else (a version registered before it) the training run's params."""
    params: dict[str, str] = {}
    if run_id and not tags.get(TAG_SEQUENCE):
        try:
            params = dict(mlflow.get_run(run_id).data.params or {})
        except Exception as exc:
            error = _mlflow_error(exc, f"the training run of {what}", mlflow.tracking_uri)
            if not isinstance(error, NotFound):
                raise error from exc
    try:
        source = sequence_layout(tags, params, features=features)
    except InvalidInput as exc:
        raise Conflict(f"{what}: {exc.message}") from exc
    if source is None:
        raise Conflict(f"{what} takes sequences, but it has no {TAG_SEQUENCE} tag, its training run has no "
                       "data.sequence params (a list column, or id and step) and its features name no list "
                       "column; drift of sequences needs where its dataset holds them")
    return replace(inputs, source=source)


def read_aliases(*, mlflow: MlflowClient, model: str) -> dict[str, str] | None:
    """Alias → version of ``model``; None when it is not registered. Unavailable when MLflow is not there."""
    try:
        registered = mlflow.get_registered_model(model)
    except Exception as exc:
        error = _mlflow_error(exc, f"model {model!r}", mlflow.tracking_uri)
        if isinstance(error, NotFound):
            return None
        raise error from exc
    return {str(alias): str(version) for alias, version in (registered.aliases or {}).items()}


class LineageCache:
    """Lineage by (model, version): the trainer writes the tags once, so a hit stays valid."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._found: dict[tuple[str, str], Lineage] = {}
        self._lock = threading.Lock()

    def get(self, *, mlflow: MlflowClient, model: str, version: str) -> Lineage:
        key = (model, version)
        with self._lock:
            hit = self._found.get(key)
        if hit is not None:
            return hit
        found = read_lineage(mlflow=mlflow, model=model, version=version)
        with self._lock:
            if len(self._found) >= self._size:
                self._found.clear()
            self._found[key] = found
        return found
