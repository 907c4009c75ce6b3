"""The model version a batch scores with: found in MLflow by version or alias, its ONNX file fetched once,
and what its tags and training run say it takes (features, classes; a sequence model's layout)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard_common.errors import InvalidInput, NotFound
from shipyard_common.lineage import ONNX_FILE_NAME, TAG_FEATURES, TAG_SIGNATURE, TAG_TASK

_LIST_FEATURE = re.compile(r"^(?P<column>.+)\[(?P<index>\d+)\]$")  # "steps[0]": a wider list column's value


@dataclass(frozen=True)
class ModelInfo:
    """The version that scores: where its ONNX file is, its features and what its outputs mean.

    ``sequence``: for a sequence model (its signature's ``sequence``), where the dataset holds its
    sequences, as the training job's ``data.sequence`` said: ``{"column": ...}`` (a list column) or
    ``{"id": ..., "step": ...}`` (long format, the steps' columns being ``features``); None otherwise.
    """

    name: str
    version: str
    alias: str | None
    onnx_path: Path
    features: list[str]
    task: str | None
    classes: list[Any] | None
    dataset: str | None
    dataset_rev: str | None
    sequence: dict[str, str] | None = None

    def describe(self) -> str:
        return f"{self.name} v{self.version}"


def mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_version(client: Any, model_name: str, alias: str | None, version: str | None) -> Any:
    """The MLflow model version that ``version``, else ``alias``, names; NotFound saying which is missing."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"model {model_name!r} is not registered") from exc
        raise
    if version is None:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a} → v{v}" for a, v in sorted(aliases.items())) or "none"
            raise NotFound(f"model {model_name!r} has no alias {alias!r} (its aliases: {known})")
        version = str(aliases[alias])
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"model {model_name!r} has no version {version!r}") from exc
        raise


def fetch_onnx(tracking_uri: str, work_dir: Path, found: Any) -> Path:
    """The version's ``model.onnx``, downloaded once into the work folder (a rename makes it whole)."""
    import mlflow.artifacts

    named = hashlib.sha256(found.name.encode()).hexdigest()[:16]
    folder = work_dir / "models" / named / str(found.version)
    target = folder / ONNX_FILE_NAME
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=found.source, dst_path=scratch, tracking_uri=tracking_uri))
        onnx_files = sorted(local.rglob(ONNX_FILE_NAME)) if local.is_dir() else [local]
        if not onnx_files or onnx_files[0].name != ONNX_FILE_NAME:
            raise InvalidInput(f"model {found.name!r} v{found.version} has no {ONNX_FILE_NAME}: batch "
                               "scoring runs ONNX versions only")
        os.replace(onnx_files[0], target)
    return target


def model_info(*, tracking_uri: str, work_dir: Path, model_name: str, alias: str | None,
               version: str | None) -> ModelInfo:
    """The version ``version`` (else the one ``alias`` names) as a :class:`ModelInfo`; InvalidInput
    when its tags do not say which dataset columns it takes."""
    client = mlflow_client(tracking_uri)
    found = resolve_version(client, model_name, alias, version)
    tags = dict(found.tags or {})
    try:
        features = json.loads(tags.get(TAG_FEATURES) or "null")
    except ValueError as exc:
        raise InvalidInput(
            f"tag {TAG_FEATURES} of {model_name!r} v{found.version} is not JSON: {exc}"
        ) from exc
    if not isinstance(features, list) or not features:
        raise InvalidInput(f"{model_name!r} v{found.version} has no {TAG_FEATURES} tag: which dataset "
                           "columns it takes is unknown")
    try:
        signature = json.loads(tags.get(TAG_SIGNATURE) or "{}")
    except ValueError:
        signature = {}
    signature = signature if isinstance(signature, dict) else {}
    classes = signature.get("classes")
    features = [str(f) for f in features]
    return ModelInfo(
        name=model_name, version=str(found.version), alias=None if version is not None else alias,
        onnx_path=fetch_onnx(tracking_uri, work_dir, found), features=features, task=tags.get(TAG_TASK),
        classes=list(classes) if isinstance(classes, list) else None,
        dataset=tags.get("shipyard.dataset"), dataset_rev=tags.get("shipyard.dataset_rev"),
        sequence=sequence_layout(client, found, features) if "sequence" in signature else None,
    )


def sequence_layout(client: Any, found: Any, features: list[str]) -> dict[str, str]:
    """Where a sequence model's sequences are: its training job's ``data.sequence`` (the run's params
    ``data.sequence.column``, ``.id``, ``.step``); for a version without such a run, a list column
    read from its features (``[steps]``, or ``[steps[0], steps[1], ...]``). Empty when neither says."""
    params: dict[str, str] = {}
    if found.run_id:
        from mlflow.exceptions import MlflowException

        try:
            params = dict(client.get_run(found.run_id).data.params)
        except MlflowException:
            params = {}
    said = {key: params.get(f"data.sequence.{key}") for key in ("column", "id", "step")}
    layout = {key: str(value) for key, value in said.items() if value not in (None, "", "null", "None")}
    if layout:
        return layout
    matches = [_LIST_FEATURE.match(name) for name in features]
    if len(features) == 1 and matches[0] is None:
        return {"column": features[0]}
    columns = {m.group("column") for m in matches if m is not None}
    if all(matches) and len(columns) == 1 and [int(m.group("index")) for m in matches if m] == list(
            range(len(features))):
        return {"column": columns.pop()}
    return {}
