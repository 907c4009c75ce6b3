"""The model version a batch scores with: found in MLflow by version or alias, its ONNX file fetched once,
and what its tags and training run say it takes (features, classes; a sequence model's layout)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shipyard_common.datasets.sequences import SequenceLayout, sequence_layout
from shipyard_common.errors import InvalidInput, NotFound
from shipyard_common.lineage import ONNX_FILE_NAME, TAG_FEATURES, TAG_SEQUENCE, TAG_SIGNATURE, TAG_TASK


@dataclass(frozen=True)
class ModelInfo:
    """The version that scores: where its ONNX file is, its features and what its outputs mean.

    ``sequence``: for a sequence model (its signature's ``sequence``), where the dataset holds its
    sequences and the most steps one may have (``max_length``), as the shared reader takes them
    (:func:`~shipyard_common.datasets.sequences.sequence_layout`); None otherwise, or where nothing says.
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
    sequence: SequenceLayout | None = None

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
        sequence=model_sequence(client, found, tags=tags, signature=signature, features=features)
        if "sequence" in signature else None,
    )


def model_sequence(client: Any, found: Any, *, tags: dict[str, str], signature: dict[str, Any],
                   features: list[str]) -> SequenceLayout | None:
    """Where a sequence version's dataset holds its sequences, read as the monitor reads it: its
    shipyard.sequence tag, else (a version registered before the tag) its training run's params, else
    the list column its features name; None when none says. ``max_length``: the tag's, else the
    signature's ``sequence.max_length`` (what serving refuses a longer sequence by)."""
    params: dict[str, str] = {}
    if found.run_id and not tags.get(TAG_SEQUENCE):
        from mlflow.exceptions import MlflowException

        try:
            params = dict(client.get_run(found.run_id).data.params or {})
        except MlflowException:
            params = {}
    try:
        layout = sequence_layout(tags, params, features=features)
    except InvalidInput as exc:
        raise InvalidInput(f"{found.name!r} v{found.version}: {exc.message}") from exc
    said = signature.get("sequence")
    length = said.get("max_length") if isinstance(said, dict) else None
    if layout is not None and layout.max_length is None and type(length) is int and length > 0:
        layout = replace(layout, max_length=length)
    return layout
