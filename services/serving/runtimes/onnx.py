"""ONNX Runtime: the one runtime serving uses, because an ONNX file is data, never code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shipyard_common.lineage import ONNX_FILE_NAME

_INPUT_DTYPES: dict[str, type[np.floating]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}

_GRAPH_OPTIMIZATION = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(Exception):
    """A model file that cannot be served; the message says why, for the model's status."""


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    session: ort.InferenceSession
    input_name: str
    output_name: str
    # The batch dimension is None when the model takes any number of rows.
    batch_size: int | None
    n_features: int
    dtype: type[np.floating]

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Run the model on rows already shaped and typed for it; the first output."""
        # InferenceSession.run is thread-safe and releases the GIL, so requests run in parallel.
        (output,) = self.session.run([self.output_name], {self.input_name: rows})
        return np.asarray(output)


def find_model_file(root: Path) -> Path:
    """The ``model.onnx`` under ``root``; the shallowest if the artifacts hold several."""
    found = sorted(root.rglob(ONNX_FILE_NAME), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    if not found:
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:20]
        raise ModelLoadError(f"the artifacts hold no {ONNX_FILE_NAME} (files: {present or 'none'})")
    return found[0]


def session_options(*, intra_op_threads: int, graph_optimization: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Requests already arrive on many threads; parallelism between a graph's nodes adds only contention.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _GRAPH_OPTIMIZATION[graph_optimization]
    # Spinning worker threads burn a core each between sporadic requests; sleeping costs microseconds.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _fixed(dimension: object) -> int | None:
    return dimension if isinstance(dimension, int) and dimension > 0 else None


def load_onnx_model(path: Path, *, intra_op_threads: int, graph_optimization: str) -> OnnxModel:
    """Open ``path`` with ONNX Runtime on CPU, check it takes rows of numbers, and warm it up."""
    try:
        # A path rather than bytes, so that weights stored beside the graph (external data) load too.
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(
                intra_op_threads=intra_op_threads, graph_optimization=graph_optimization
            ),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/… types
        raise ModelLoadError(f"ONNX Runtime cannot open {path.name}: {exc}") from exc

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"the model has {len(inputs)} inputs; serving needs exactly one [batch, features]"
        )
    if not outputs:
        raise ModelLoadError("the model has no outputs")
    model_input = inputs[0]
    dtype = _INPUT_DTYPES.get(model_input.type)
    if dtype is None:
        raise ModelLoadError(
            f"input {model_input.name!r} is {model_input.type}; serving feeds float or double"
        )
    shape = list(model_input.shape or [])
    if len(shape) != 2 or _fixed(shape[1]) is None:
        raise ModelLoadError(
            f"input {model_input.name!r} has shape {shape}; serving needs [batch, n_features] "
            "with a fixed number of features, to check each request against it"
        )
    model = OnnxModel(
        path=path,
        session=session,
        input_name=model_input.name,
        output_name=outputs[0].name,
        batch_size=_fixed(shape[0]),
        n_features=int(shape[1]),
        dtype=dtype,
    )
    # The first run allocates and plans; doing it here keeps that cost off the first request and
    # proves the model runs before it is allowed to replace a working version.
    try:
        model.predict(np.zeros((model.batch_size or 1, model.n_features), dtype=dtype))
    except Exception as exc:
        raise ModelLoadError(f"the model failed its warm-up run: {exc}") from exc
    return model
