"""Registered versions laid out as the trainer lays them out: ``model/`` with one folder per format.

``model/onnx/model.onnx``, ``model/torchscript/model.pt`` (``torch.jit.trace``), optionally
``model/savedmodel/`` (a ``tf.Module`` with a ``serving_default`` signature: see
``tf_serving_stand_in.write_savedmodel``), and ``model/signature.json``; the version's source is
the run's ``model`` folder and it carries ``shipyard.format``/``formats``/``signature`` tags.
All formats compute softmax(input @ W + b) with the weights of ``classifier_weights(seed)``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shipyard_common.lineage import (
    MODEL_ARTIFACT_PATH,
    SIGNATURE_FILE,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_SIGNATURE,
)
from tests.services.registry.model_factory import (
    N_CLASSES,
    N_FEATURES,
    ModelFactory,
    classifier_weights,
    tiny_classifier,
)

CLASSES = ["a", "b", "c"]
SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "input", "shape": [None, N_FEATURES], "dtype": "float32"}],
    "outputs": [{"name": "probabilities", "shape": [None, N_CLASSES], "dtype": "float32"}],
}


def expected(seed: int, rows: Any) -> np.ndarray:
    """softmax(rows @ W + b) in float64: what every format must answer, to float32 rounding."""
    weights, bias = classifier_weights(seed)
    logits = np.asarray(rows, dtype=np.float32).astype(np.float64) @ weights + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


class TinyClassifier(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        weights, bias = classifier_weights(seed)
        self.weights = torch.nn.Parameter(torch.from_numpy(weights))
        self.bias = torch.nn.Parameter(torch.from_numpy(bias))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # `input`: the signature's input name
        return torch.softmax(input @ self.weights + self.bias, dim=1)


def write_torchscript(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(TinyClassifier(seed).eval(), (torch.zeros(2, N_FEATURES),))
    torch.jit.save(traced, str(path))


@dataclass(frozen=True)
class FolderVersion:
    name: str
    version: str
    seed: int


def write_model_folder(
    folder: Path, *, seed: int, formats: tuple[str, ...] = ("onnx", "torchscript"),
    savedmodel_writer: Callable[[Path, int], None] | None = None,
    signature: dict[str, Any] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if "onnx" in formats:
        (folder / "onnx").mkdir()
        (folder / "onnx" / "model.onnx").write_bytes(tiny_classifier(seed))
    if "torchscript" in formats:
        write_torchscript(folder / "torchscript" / "model.pt", seed)
    if "savedmodel" in formats:
        assert savedmodel_writer is not None
        savedmodel_writer(folder / "savedmodel", seed)
    sig = signature or SIGNATURE
    (folder / SIGNATURE_FILE).write_text(json.dumps({
        "primary": formats[0], **sig, "classes": CLASSES, "formats": {f: sig for f in formats},
    }))


def register_folder(
    factory: ModelFactory, name: str, *, seed: int, formats: tuple[str, ...] = ("onnx", "torchscript"),
    serve: str | None = None, savedmodel_writer: Callable[[Path, int], None] | None = None,
    signature: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
) -> FolderVersion:
    """A version whose source is a run's ``model/`` folder; ``serve`` is its shipyard.format tag."""
    client = factory.client
    run_id = client.create_run(factory._experiment_id()).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        write_model_folder(Path(tmp), seed=seed, formats=formats, savedmodel_writer=savedmodel_writer,
                           signature=signature)
        client.log_artifacts(run_id, tmp, MODEL_ARTIFACT_PATH)
    client.set_terminated(run_id)
    if name not in [m.name for m in client.search_registered_models(filter_string=f"name = '{name}'")]:
        client.create_registered_model(name)
    version_tags = {TAG_FORMATS: json.dumps(list(formats)), TAG_SIGNATURE: json.dumps(signature or SIGNATURE)}
    if serve is not None:
        version_tags[TAG_FORMAT] = serve
    version = client.create_model_version(
        name, source=f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}", run_id=run_id,
        tags={**version_tags, **(tags or {})},
    )
    return FolderVersion(name=name, version=str(version.version), seed=seed)
