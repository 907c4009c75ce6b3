"""Registered ONNX model versions for the registry and serving tests, without the trainer.

A version is a tiny softmax classifier built with ``onnx.helper`` from known weights, logged as
the artifact folder ``onnx/`` of an MLflow run and registered from it: the same shape as the
trainer's output (one ``input`` [batch, n_features] float32, one ``probabilities`` output).
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from shipyard_common.lineage import ONNX_ARTIFACT_PATH, ONNX_FILE_NAME, TAG_FORMAT

N_FEATURES = 4
N_CLASSES = 3
EXPERIMENT = "shipyard-tests"
# onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses; 10 is what every opset below needs.
IR_VERSION = 10


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def classifier_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct seeds give distinct weights, so two versions answer with different numbers."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(N_FEATURES, N_CLASSES)).astype(np.float32)
    bias = rng.normal(size=(N_CLASSES,)).astype(np.float32)
    return weights, bias


def tiny_classifier(seed: int) -> bytes:
    """softmax(input @ W + b) as a serialized ONNX model."""
    weights, bias = classifier_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", N_CLASSES])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_directly(model_bytes: bytes, rows: list[list[float]]) -> np.ndarray:
    """What ONNX Runtime itself answers for ``rows``: the reference serving must match."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": np.asarray(rows, dtype=np.float32)})
    return np.asarray(output)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_bytes: bytes


class ModelFactory:
    def __init__(self, tracking_uri: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(EXPERIMENT))
        except MlflowException:  # created meanwhile by another test process
            return str(self.client.get_experiment_by_name(EXPERIMENT).experiment_id)

    def register(
        self, name: str, model_bytes: bytes, *, metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> RegisteredVersion:
        """Log ``model_bytes`` as ``onnx/model.onnx`` of a new run and register it under ``name``."""
        run = self.client.create_run(self._experiment_id())
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / ONNX_FILE_NAME).write_bytes(model_bytes)
            self.client.log_artifacts(run_id, folder, ONNX_ARTIFACT_PATH)
        for key, value in (metrics or {}).items():
            self.client.log_metric(run_id, key, value)
        self.client.set_terminated(run_id)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name,
            source=f"{self.client.get_run(run_id).info.artifact_uri}/{ONNX_ARTIFACT_PATH}",
            run_id=run_id,
            tags={TAG_FORMAT: "onnx", **(tags or {})},
        )
        return RegisteredVersion(
            name=name, version=str(version.version), run_id=run_id, model_bytes=model_bytes
        )

    def register_classifier(self, name: str, seed: int) -> RegisteredVersion:
        return self.register(name, tiny_classifier(seed), metrics={"val_accuracy": 0.5 + seed / 100})

    def register_trained(
        self, name: str, seed: int, *, metrics: dict[str, float], dataset_rev: str = "rev-1",
        params: dict[str, str] | None = None, signature: dict[str, object] | None = None,
    ) -> RegisteredVersion:
        """A version as the trainer leaves it: lineage tags and its registered metrics as tags."""
        import json

        from shipyard_common.lineage import METRIC_TAG_PREFIX, TAG_DATASET, TAG_DATASET_REV, TAG_SIGNATURE

        tags = {TAG_DATASET: "toy", TAG_DATASET_REV: dataset_rev,
                **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()}}
        if signature is not None:
            tags[TAG_SIGNATURE] = json.dumps(signature)
        registered = self.register(name, tiny_classifier(seed), tags=tags)
        for key, value in (params or {}).items():
            self.client.log_param(registered.run_id, key, value)
        return registered

    def register_corrupt(self, name: str) -> RegisteredVersion:
        """A version whose ``model.onnx`` is garbage: it downloads fine and cannot be opened."""
        garbage = np.random.default_rng(0).bytes(4096)
        return self.register(name, garbage)

    def set_production(self, name: str, version: str) -> None:
        self.client.set_registered_model_alias(name, "production", version)
