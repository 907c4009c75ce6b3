"""Hostile model files where the platform loads them: each refused, and a marker file proves that no
payload code ran (each payload creates the marker when executed; the controls show it would).

Loaders covered: serving's (``runtimes.loader.load_runtime``: ONNX Runtime, ``torch.jit.load``),
the trainer's fine-tuning (``worker.runner._parent_weights``) and resume (``engines.checkpoints``,
``engines.keras_checkpoint``). The rule, checked over the source too: never unpickle a user
artifact (``torch.load(..., weights_only=True)``, no ``pickle``/``joblib`` loads, Keras in safe
mode, ``np.load`` without pickles), and external data stays inside the model's folder.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from services.serving.runtimes.base import ModelLoadError
from services.serving.runtimes.loader import load_runtime
from services.serving.settings import ServingSettings
from services.trainer.engines.checkpoints import load_checkpoint
from services.trainer.engines.resume import CHECKPOINT_FILE, load_resume
from services.trainer.worker.runner import _parent_weights
from shipyard_common.errors import InvalidInput
from tests.support import test_platform

pytestmark = pytest.mark.security

ROOT = Path(__file__).resolve().parents[2]
SIGNATURE = {"inputs": [{"name": "x", "shape": [-1, 2], "dtype": "float32"}],
             "outputs": [{"name": "y", "shape": [-1, 2], "dtype": "float32"}]}


class Payload:
    """Unpickled, this creates ``marker`` (``open(marker, "w")``): proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "payload-ran"
    yield path
    path.unlink(missing_ok=True)


def test_the_payloads_are_live(tmp_path: Path, marker: Path) -> None:
    """The controls: unpickled the plain way, each payload does create the marker."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    torch.save({"weights": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def serving_settings(tmp_path_factory: pytest.TempPathFactory) -> ServingSettings:
    platform = test_platform(tmp_path_factory.mktemp("model-files") / "state")
    return ServingSettings(platform=platform, intra_op_threads=1)


def version_folder(root: Path, files: dict[str, bytes]) -> Path:
    """A downloaded version: ``files`` (relative path -> bytes) and the trainer's signature.json."""
    for relative, data in {"signature.json": json.dumps(SIGNATURE).encode(), **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def serve(folder: Path, settings: ServingSettings, tags: dict[str, str] | None = None) -> Any:
    return load_runtime(folder, name="evil", version="1", tags=tags or {}, settings=settings)


def evil_pt(tmp_path: Path, marker: Path) -> bytes:
    """A ``.pt`` as ``torch.save`` writes it, whose pickle has a ``__reduce__`` payload."""
    path = tmp_path / "evil-source.pt"
    torch.save({"weights": torch.zeros(2), "extra": Payload(marker)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("disguise", ["onnx/model.onnx", "torchscript/model.pt", "model.pkl"])
def test_serving_refuses_a_pickle_disguised_as_a_model(
    tmp_path: Path, marker: Path, serving_settings: ServingSettings, disguise: str
) -> None:
    """A bare pickle named as either format serving loads, or as a .pkl: refused, nothing ran."""
    folder = version_folder(tmp_path / "version", {disguise: pickle.dumps(Payload(marker))})
    fmt = disguise.split("/")[0]
    tags = {"shipyard.format": fmt} if "/" in disguise else {}
    with pytest.raises(ModelLoadError):
        serve(folder, serving_settings, tags)
    assert not marker.exists()


def test_serving_refuses_a_torch_save_file_as_torchscript(
    tmp_path: Path, marker: Path, serving_settings: ServingSettings
) -> None:
    """A ``torch.save`` file with a ``__reduce__`` payload where TorchScript belongs: torch.jit.load
    reads no pickle of arbitrary objects; refused, nothing ran."""
    folder = version_folder(tmp_path / "version", {"torchscript/model.pt": evil_pt(tmp_path, marker)})
    with pytest.raises(ModelLoadError):
        serve(folder, serving_settings, {"shipyard.format": "torchscript"})
    assert not marker.exists()


def onnx_with_external_weights(location: str) -> bytes:
    """``y = x @ W`` (x: [n, 2]) whose W lives in an external file at ``location``."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2, 2])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@pytest.mark.parametrize("where", ["relative", "absolute", "inside"])
def test_serving_keeps_onnx_external_data_inside_the_model_folder(
    tmp_path: Path, serving_settings: ServingSettings, where: str
) -> None:
    """External weights at ``../../outside.bin`` or an absolute path outside the version's folder:
    refused before ONNX Runtime reads them. The control: the same weights beside the model load."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.eye(2, dtype=np.float32).tobytes())
    location = {"relative": "../../outside.bin", "absolute": str(outside), "inside": "weights.bin"}[where]
    files = {"onnx/model.onnx": onnx_with_external_weights(location)}
    if where == "inside":
        files["onnx/weights.bin"] = outside.read_bytes()
    folder = version_folder(tmp_path / "version", files)
    if where == "inside":
        loaded = serve(folder, serving_settings)
        answer = loaded.runtime.predict({"x": np.ones((1, 2), dtype=np.float32)})
        assert answer["y"].tolist() == [[1.0, 1.0]]
        return
    with pytest.raises(ModelLoadError, match=r"(?i)external data"):
        serve(folder, serving_settings)


def test_fine_tuning_refuses_weights_with_a_pickle_payload(tmp_path: Path, marker: Path) -> None:
    """init_from's weights, as MLflow hands them to the worker: torch.load(weights_only=True)
    refuses the payload, and the job's error says why; nothing ran."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(evil_pt(tmp_path, marker))
    with pytest.raises(InvalidInput, match="hold Python objects besides tensors, which the trainer never"):
        _parent_weights(weights, "evil", "1")
    assert not marker.exists()


def test_resuming_refuses_a_checkpoint_with_a_pickle_payload(tmp_path: Path, marker: Path) -> None:
    """A lost worker's checkpoint, read back from MLflow to resume: refused (the job trains from
    epoch 1 instead); nothing ran."""
    checkpoint = tmp_path / CHECKPOINT_FILE
    checkpoint.write_bytes(evil_pt(tmp_path, marker))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(checkpoint)
    assert load_resume(SimpleNamespace(resume_dir=tmp_path)) is None  # type: ignore[arg-type]
    assert not marker.exists()


def test_keras_resume_refuses_a_lambda_layer(tmp_path: Path) -> None:
    """A Keras checkpoint whose Lambda layer would touch the marker: the trainer's resume does not
    load it (safe mode); the control, an unsafe load, shows the payload would have run."""
    marker = tmp_path / "lambda-ran"
    run = subprocess.run([sys.executable, "-m", "tests.security.keras_lambda", str(tmp_path / "ckpt"),
                          str(marker)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"loaded": False, "marker_after_platform": False, "marker_after_unsafe_load": True}


# Calls that unpickle what they read unless told otherwise, and the keyword that makes them safe.
UNSAFE_LOADS = {"pickle.load": None, "pickle.loads": None, "joblib.load": None, "cloudpickle.load": None,
                "dill.load": None, "torch.load": ("weights_only", True),
                "load_model": ("safe_mode", True), "np.load": ("allow_pickle", False)}


def loads_in(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line, call, safe) for each loading call in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        key = next((k for k in UNSAFE_LOADS if name == k or name.endswith("." + k)), None)
        if key is None:
            continue
        needed = UNSAFE_LOADS[key]
        safe = needed is not None and any(
            k.arg == needed[0] and isinstance(k.value, ast.Constant) and k.value.value is needed[1]
            for k in node.keywords
        )
        yield node.lineno, name, safe


def test_no_code_unpickles_what_it_loads() -> None:
    """Every torch.load passes weights_only=True, every Keras load safe_mode=True, every np.load
    allow_pickle=False, and nothing calls pickle/joblib/dill loads, in the services, the shared
    code and the pipelines: a new loader that would unpickle a user artifact fails here."""
    unsafe = [f"{path.relative_to(ROOT)}:{line} {call}"
              for folder in ("services", "shipyard_common", "pipelines")
              for path in sorted((ROOT / folder).rglob("*.py"))
              for line, call, safe in loads_in(path) if not safe]
    assert not unsafe, f"loads that may unpickle: {unsafe}"


def eye_model_files() -> dict[str, bytes]:
    """An ONNX model (``y = x @ I``) with its weights beside it."""
    return {"onnx/model.onnx": onnx_with_external_weights("weights.bin"),
            "onnx/weights.bin": np.eye(2, dtype=np.float32).tobytes()}


@pytest.mark.parametrize("link", ["onnx/model.onnx", "signature.json", "onnx"])
def test_serving_refuses_a_symbolic_link_out_of_the_version(
    tmp_path: Path, serving_settings: ServingSettings, link: str
) -> None:
    """A model file, the signature or the format's folder as a symbolic link to elsewhere on the
    host: refused before it is opened. The control: the files it points at load where they are."""
    elsewhere = version_folder(tmp_path / "elsewhere", eye_model_files())
    serve(elsewhere, serving_settings)
    folder = version_folder(tmp_path / "version", eye_model_files())
    target = folder / link
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(elsewhere / link)
    with pytest.raises(ModelLoadError, match="outside the version's files"):
        serve(folder, serving_settings)
