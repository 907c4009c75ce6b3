"""The Keras child's exports, each checked against the Keras model on the validation rows:
ONNX through Keras's own exporter (torch backend) and the TensorFlow SavedModel.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from services.trainer.engines.export import (
    INPUT_NAME,
    MAX_ABS_DIFF,
    MAX_IR_VERSION,
    OPSET,
    OUTPUT_NAMES,
    quiet_exporter,
)
from services.trainer.engines.keras_setup import Failed, Job
from services.trainer.jobs.schemas import ExportFormat, Task

log = logging.getLogger("shipyard.trainer.keras_child")


def _allowed(task: Task, reference: np.ndarray) -> float:
    # Probabilities lie in [0, 1]; a regression answers in the target's units, where float32
    # alone is off by more than 1e-4 past ~1000, so the bound grows with the largest output.
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return MAX_ABS_DIFF * (1.0 if task == Task.CLASSIFICATION else max(1.0, scale))


def _difference(name: str, task: Task, exported: np.ndarray, reference: np.ndarray) -> float:
    if exported.shape != reference.shape:
        raise Failed(f"the {name} export's output shape {exported.shape} differs from "
                     f"Keras's {reference.shape}")
    diff = float(np.max(np.abs(exported.astype(np.float64) - reference))) if reference.size else 0.0
    allowed = _allowed(task, reference)
    if not math.isfinite(diff) or diff > allowed:
        raise Failed(
            f"the {name} export disagrees with Keras by {diff:.3g} (more than {allowed:.3g}) "
            "on held-out rows; the model was not registered"
        )
    return diff


def export_onnx(serving: Any, job: Job, reference: np.ndarray) -> dict[str, Any]:
    """ONNX through Keras's own exporter (torch backend): input ``input``, output named for the task."""
    import onnx
    import onnxruntime as ort

    path = job.exports_dir / "onnx" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # and Keras's own, on top of the exporters'
        serving.export(str(path), format="onnx", verbose=False, opset_version=OPSET)
    proto = onnx.load(str(path))
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise Failed(f"the ONNX export has {len(graph.input)} inputs and {len(graph.output)} outputs; "
                     "expected one of each")
    _rename(graph, graph.input[0].name, INPUT_NAME)
    _rename(graph, graph.output[0].name, OUTPUT_NAMES[job.task])
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = np.ascontiguousarray(job.x_val, dtype=np.float32)
    (out,) = session.run(None, {INPUT_NAME: rows})
    diff = _difference("ONNX", job.task, np.asarray(out), reference)

    def describe(arg: Any) -> dict[str, Any]:
        shape = [dim if isinstance(dim, int) else None for dim in arg.shape]
        dtype = {"tensor(float)": "float32", "tensor(double)": "float64"}.get(arg.type, arg.type)
        return {"name": arg.name, "shape": shape, "dtype": dtype}

    signature = {"inputs": [describe(a) for a in session.get_inputs()],
                 "outputs": [describe(a) for a in session.get_outputs()]}
    log.info("ONNX export: max |difference| from Keras on %d held-out rows = %.3g", len(rows), diff)
    return {"format": ExportFormat.ONNX.value, "path": str(path), "max_abs_diff": diff,
            "signature": signature}


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def export_savedmodel(serving: Any, job: Job, reference: np.ndarray) -> dict[str, Any]:
    """A TF SavedModel whose ``serving_default`` signature maps ``input`` to the task's output name."""
    import keras
    import tensorflow as tf

    path = job.exports_dir / "savedmodel"
    output = OUTPUT_NAMES[job.task]
    archive = keras.export.ExportArchive()
    archive.track(serving)

    def serve(input: Any) -> dict[str, Any]:
        return {output: serving(input, training=False)}

    archive.add_endpoint(
        name="serving_default", fn=serve,
        input_signature=[tf.TensorSpec(shape=(None, len(job.features)), dtype=tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(path), verbose=False)

    loaded = tf.saved_model.load(str(path))
    function = loaded.signatures["serving_default"]
    answers = function(**{INPUT_NAME: tf.constant(np.ascontiguousarray(job.x_val, dtype=np.float32))})
    diff = _difference("SavedModel", job.task, answers[output].numpy(), reference)

    def describe(name: str, spec: Any) -> dict[str, Any]:
        return {"name": name, "shape": list(spec.shape.as_list()), "dtype": spec.dtype.name}

    signature = {
        "inputs": [describe(n, s) for n, s in sorted(function.structured_input_signature[1].items())],
        "outputs": [describe(n, s) for n, s in sorted(function.structured_outputs.items())],
        "signature_defs": sorted(loaded.signatures.keys()),
    }
    log.info("SavedModel export: max |difference| from Keras on %d held-out rows = %.3g",
             len(job.x_val), diff)
    return {"format": ExportFormat.SAVEDMODEL.value, "path": str(path), "max_abs_diff": diff,
            "signature": signature}
