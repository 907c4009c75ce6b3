"""ONNX export of a fitted model, and the proof that ONNX Runtime computes what PyTorch did."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.trainer.engine import TrainingFailed
from services.trainer.schemas import Task

log = logging.getLogger("shipyard.trainer.export")

INPUT_NAME = "input"
OUTPUT_NAMES = {Task.CLASSIFICATION: "probabilities", Task.REGRESSION: "prediction"}
OPSET = 18
# onnx 1.23 stamps IR 14 on what it saves, which ONNX Runtime up to 1.31 refuses; an MLP uses
# nothing newer than IR 10, and IR 10 loads in every ONNX Runtime since 1.17.
MAX_IR_VERSION = 10
MAX_ABS_DIFF = 1e-4
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


class ServingModule(nn.Module):
    """What serving runs: the model, plus softmax for classifiers so that outputs are probabilities."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.classification = task == Task.CLASSIFICATION

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input's name
        out = self.model(input)
        return torch.softmax(out, dim=1) if self.classification else out


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    max_abs_diff: float
    signature: dict[str, Any]

    def signature_json(self) -> str:
        return json.dumps(self.signature, sort_keys=True)


def export_onnx(
    model: nn.Module, *, task: Task, n_features: int, path: Path, check_rows: np.ndarray,
    classes: list[Any] | None = None,
) -> ExportedModel:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis, then check it with ORT.

    Raises :class:`TrainingFailed` if ONNX Runtime's answers on ``check_rows`` differ from
    PyTorch's by more than ``MAX_ABS_DIFF``: a version that serves other numbers than the
    ones it was validated with must not be registered.
    """
    import onnx

    module = ServingModule(model, task).eval().cpu()
    example = torch.zeros(2, n_features, dtype=torch.float32)
    output_name = OUTPUT_NAMES[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is deprecated; the dynamo one handles an MLP and writes the
    # dynamic batch axis from ``dynamic_shapes``.
    with _quiet_exporter():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    diff, scale, signature = check_onnx(path, module, check_rows)
    if classes:
        signature["classes"] = list(classes)
    # Probabilities lie in [0, 1], so the bound is absolute there. A regression answers in the
    # target's units, where float32 alone is off by more than 1e-4 once values pass ~1000;
    # the bound then grows with the largest output.
    allowed = MAX_ABS_DIFF * (1.0 if task == Task.CLASSIFICATION else max(1.0, scale))
    if not np.isfinite(diff) or diff > allowed:
        raise TrainingFailed(
            f"the ONNX export disagrees with PyTorch by {diff:.3g} (more than {allowed:.3g}) "
            "on held-out rows; the model was not registered"
        )
    return ExportedModel(path=path, max_abs_diff=diff, signature=signature)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's chatter (optimiser passes, absent torchvision ops) out of job logs."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_onnx(path: Path, module: nn.Module, rows: np.ndarray) -> tuple[float, float, dict[str, Any]]:
    """Largest absolute ORT-vs-PyTorch difference on ``rows``, largest |output|, the file's signature."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    (onnx_out,) = session.run(None, {INPUT_NAME: rows})
    with torch.no_grad():
        torch_out = module(torch.from_numpy(rows)).numpy()
    if onnx_out.shape != torch_out.shape:
        raise TrainingFailed(f"ONNX output shape {onnx_out.shape} differs from PyTorch's {torch_out.shape}")
    diff = float(np.max(np.abs(onnx_out - torch_out))) if rows.size else 0.0
    scale = float(np.max(np.abs(torch_out))) if rows.size else 0.0

    def describe(arg: Any) -> dict[str, Any]:
        shape = [dim if isinstance(dim, int) else None for dim in arg.shape]
        return {"name": arg.name, "shape": shape, "dtype": _ORT_DTYPES.get(arg.type, arg.type)}

    signature = {
        "inputs": [describe(arg) for arg in session.get_inputs()],
        "outputs": [describe(arg) for arg in session.get_outputs()],
    }
    return diff, scale, signature
