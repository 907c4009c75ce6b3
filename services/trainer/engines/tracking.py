"""MLflow: the run a job logs to, and the registry version it leaves behind.

Everything goes through one :class:`MlflowClient` bound to the platform's tracking URI rather
than mlflow's process-global fluent API, so that nothing depends on what else the worker did.
Given a :class:`~shipyard_common.mlflow_client.Patience`, every call waits for an MLflow that is
down (bounded, with backoff, each wait reported) instead of failing the job at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shipyard_common.errors import InvalidInput, Unavailable
from shipyard_common.lineage import (
    COLUMNS_FILE,
    METRIC_TAG_PREFIX,
    MODEL_ARTIFACT_PATH,
    TAG_JOB_ID,
    WEIGHTS_ARTIFACT_PATH,
    WEIGHTS_FILE,
)
from shipyard_common.mlflow_client import Patience, patiently

log = logging.getLogger("shipyard.trainer.tracking")

REPO_ROOT = Path(__file__).resolve().parents[3]
_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
# Where a job's run keeps its latest training checkpoint, for a worker that takes the job over.
CHECKPOINT_ARTIFACT_PATH = "checkpoints"
TENSORBOARD_ARTIFACT_PATH = "tensorboard"
# MLflow's param keys: these characters only (its own check), at most 250 characters in all.
_PARAM_PART = re.compile(r"[\w.\- :]+")
_NOT_IN_PARAM = re.compile(r"[^\w.\- :]")
_PARAM_PART_MAX = 200
#: A table's fitted columns among the run's params (:func:`column_params`).
COLUMN_PARAM_PREFIX = "columns."
COLUMN_PARAM_FIELDS = ("type", "encoding", "impute", "fill_value", "embedding_dim", "inferred")


@functools.cache
def git_commit() -> str:
    """The commit of this Shipyard checkout, or ``unknown`` (an image built without .git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"epochs": 20}}`` → ``{"training.epochs": "20"}``, for MLflow params; each key as
    :func:`param_part` makes it (a declared column's name is the user's)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{param_part(str(key))}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | dict | None) else str(value)
    return flat


def param_part(name: str) -> str:
    """``name`` as one part of an MLflow param key: as it is when MLflow takes it (letters, digits,
    ``_ - . :`` and spaces, not too long), else with each other character (``/`` included, which MLflow
    reads as a path) as ``_``, cut to 200 characters and followed by ``-`` and 8 hex digits of its hash,
    so that two names never share a key. A column may be named anything; a param key may not."""
    if len(name) <= _PARAM_PART_MAX and _PARAM_PART.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{_NOT_IN_PARAM.sub('_', name)[:_PARAM_PART_MAX]}-{digest}"


def column_params(columns: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A table's columns as fitted (``Table.describe()``, the version's ``columns.json``) as the run's
    params, ``columns.<name>.<field>``: each column's type, encoding, imputation, fill value, embedding
    size and whether it was inferred, so that runs compare in MLflow's UI. The spec's own
    ``data.columns.*`` params say what was declared; these say what training settled, inferred too."""
    params: dict[str, str] = {}
    for column in columns:
        name = param_part(str(column["name"]))
        for field in COLUMN_PARAM_FIELDS:
            if column.get(field) is not None:
                params[f"{COLUMN_PARAM_PREFIX}{name}.{field}"] = str(column[field])
    return params


@dataclass(frozen=True)
class ParentFiles:
    """A registered version's files that fine-tuning (``init_from``) starts from."""

    #: Its trained weights (a state dict), downloaded.
    weights: Path
    #: The table columns it encodes (its ``columns.json``), or None where it takes plain numbers.
    columns: list[dict[str, Any]] | None


P = ParamSpec("P")
T = TypeVar("T")


def _patient(method: Callable[Concatenate[Tracking, P], T]) -> Callable[Concatenate[Tracking, P], T]:
    """The method, retried as a whole while MLflow is unreachable, if the Tracking has patience."""

    def call(self: Tracking, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self.patience is None:
            return method(self, *args, **kwargs)
        return patiently(lambda: method(self, *args, **kwargs), self.patience)

    return call


class Tracking:
    """One job's run in MLflow, from creation to the registered version."""

    def __init__(self, tracking_uri: str, *, patience: Patience | None = None) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.patience = patience

    def experiment_id(self, name: str) -> str:
        """The experiment called ``name``, created on first use (and restored if deleted)."""
        for _ in range(3):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment.experiment_id)
                return str(experiment.experiment_id)
            try:
                return str(self.client.create_experiment(name))
            except MlflowException as exc:
                if exc.error_code != _ALREADY_EXISTS:
                    raise
                # Another worker created it between our lookup and create; look again.
        raise Unavailable(f"MLflow experiment {name!r} can be neither found nor created")

    @_patient
    def start_run(self, *, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=dict(tags))
        return str(run.info.run_id)

    @_patient
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    @_patient
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )

    @_patient
    def log_model_folder(self, run_id: str, folder: Path) -> str:
        """Upload ``folder`` as the run's ``model/`` (see :mod:`shipyard_common.lineage`); its URI."""
        self.client.log_artifacts(run_id, str(folder), artifact_path=MODEL_ARTIFACT_PATH)
        return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"

    @_patient
    def log_reports(self, run_id: str, paths: list[Path], *, artifact_path: str = "reports") -> None:
        """Upload report files (see :mod:`services.trainer.engines.reports`) under the run's ``reports/``."""
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    @_patient
    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> None:
        if folder.is_dir() and any(folder.iterdir()):
            self.client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)

    @_patient
    def log_checkpoint(self, run_id: str, folder: Path) -> None:
        """Upload the checkpoint files in ``folder`` as the run's ``checkpoints/``, replacing the last."""
        self.client.log_artifacts(run_id, str(folder), artifact_path=CHECKPOINT_ARTIFACT_PATH)

    @_patient
    def download_checkpoint(self, run_id: str, folder: Path) -> Path | None:
        """The run's ``checkpoints/`` files copied into ``folder``; None if it has none."""
        if not self.client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_PATH):
            return None
        return Path(self.client.download_artifacts(run_id, CHECKPOINT_ARTIFACT_PATH, str(folder)))

    @_patient
    def log_weights(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=WEIGHTS_ARTIFACT_PATH)

    @_patient
    def download_parent(self, *, model_name: str, version: str, folder: Path) -> ParentFiles:
        """What fine-tuning takes from registered version ``model_name`` v``version``: its trained
        weights and its table columns, the version looked up once for both.

        Raises :class:`InvalidInput` when there is no such version, it kept no weights (a Keras
        version, or one registered before weights were kept) or its ``columns.json`` cannot be read.
        """
        run_id = self._parent_run(model_name, version)
        return ParentFiles(weights=self._parent_weights(run_id, model_name, version, folder),
                           columns=self._parent_columns(run_id, model_name, version, folder))

    def _parent_run(self, model_name: str, version: str) -> str:
        """The run that trained registered version ``model_name`` v``version``."""
        try:
            found = self.client.get_model_version(model_name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise InvalidInput(f"init_from: model {model_name!r} has no version {version}") from None
            raise
        if not found.run_id:
            raise InvalidInput(f"init_from: {model_name!r} v{version} was not trained by a run; no weights")
        return str(found.run_id)

    def _parent_weights(self, run_id: str, model_name: str, version: str, folder: Path) -> Path:
        """The parent run's trained weights copied into ``folder``."""
        wanted = f"{WEIGHTS_ARTIFACT_PATH}/{WEIGHTS_FILE}"
        if wanted not in {a.path for a in self.client.list_artifacts(run_id, WEIGHTS_ARTIFACT_PATH)}:
            raise InvalidInput(
                f"init_from: {model_name!r} v{version} kept no trained weights to fine-tune from "
                "(only PyTorch and Transformers jobs keep them)"
            )
        return Path(self.client.download_artifacts(run_id, wanted, str(folder)))

    def _parent_columns(self, run_id: str, model_name: str, version: str,
                        folder: Path) -> list[dict[str, Any]] | None:
        """The table columns the parent encodes (its ``columns.json``,
        :meth:`~.preprocess.Table.describe`), or None where it takes plain numbers (no such file)."""
        wanted = f"{MODEL_ARTIFACT_PATH}/{COLUMNS_FILE}"
        if wanted not in {a.path for a in self.client.list_artifacts(run_id, MODEL_ARTIFACT_PATH)}:
            return None
        path = Path(self.client.download_artifacts(run_id, wanted, str(folder)))
        try:
            columns = json.loads(path.read_text())["columns"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"init_from: the {COLUMNS_FILE} of {model_name!r} v{version} cannot be read "
                               f"({type(exc).__name__}: {exc})") from None
        if not isinstance(columns, list):
            raise InvalidInput(f"init_from: the {COLUMNS_FILE} of {model_name!r} v{version} lists no columns")
        return columns

    @_patient
    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def end_run(self, run_id: str, *, ok: bool) -> None:
        """Mark the run finished (waiting for MLflow, as every call does) or failed (at once: a job
        that failed, perhaps because MLflow is away, must not wait again to say so)."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        if ok and self.patience is not None:
            patiently(lambda: self.client.set_terminated(run_id, status=status), self.patience)
        else:
            self.client.set_terminated(run_id, status=status)

    @_patient
    def find_version(self, *, model_name: str, job_id: str) -> str | None:
        """The registered version of ``model_name`` that job ``job_id`` made, if any."""
        try:
            found = self.client.search_model_versions(
                f"name = '{model_name}' and tags.`{TAG_JOB_ID}` = '{job_id}'"
            )
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        versions = sorted(int(v.version) for v in found)
        return str(versions[0]) if versions else None

    @_patient
    def register(
        self, *, model_name: str, job_id: str, run_id: str, source: str, tags: Mapping[str, str],
        description: str | None = None,
    ) -> str:
        """Register ``source`` as a new version of ``model_name``; idempotent on ``job_id``.

        A job retried after its worker was lost may have registered already; it reuses that
        version (bringing its tags up to date) instead of adding a second one.
        """
        existing = self.find_version(model_name=model_name, job_id=job_id)
        if existing is not None:
            for key, value in tags.items():
                self.client.set_model_version_tag(model_name, existing, key, value)
            return existing
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != _ALREADY_EXISTS:
                raise
        version = self.client.create_model_version(
            name=model_name, source=source, run_id=run_id,
            tags={**tags, TAG_JOB_ID: job_id}, description=description,
        )
        return str(version.version)


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {f"{METRIC_TAG_PREFIX}{key}": repr(float(value)) for key, value in metrics.items()}
