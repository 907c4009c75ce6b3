"""Exports of a fitted PyTorch model (ONNX, TorchScript), and the proof that each computes what PyTorch did.

Both wrap the model in :class:`ServingModule` (softmax for classifiers), write the file, load it
back the way a server would (ONNX Runtime; ``torch.jit.load``) and compare its answers with
the eager module's on held-out rows. A file that disagrees by more than ``MAX_ABS_DIFF`` raises
:class:`TrainingFailed`: a version that serves other numbers than the ones it was validated with
must not be registered.

Tabular models take float32 rows (input ``input``); text models take int64 token ids (input
``input_ids``). :func:`example_input` gives two rows of whichever the data holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.engines.types import TabularData, TrainingFailed
from services.trainer.jobs.schemas import Task

if TYPE_CHECKING:
    from services.trainer.engines.preprocess import Table

log = logging.getLogger("shipyard.trainer.export")

INPUT_NAME = "input"
TOKEN_INPUT_NAME = "input_ids"
OUTPUT_NAMES = {Task.CLASSIFICATION: "probabilities", Task.REGRESSION: "prediction"}
OPSET = 18
# onnx 1.23 stamps IR 14 on what it saves, which ONNX Runtime up to 1.31 refuses; our models use
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.model(input)
        return torch.softmax(out, dim=1) if self.classification else out


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    max_abs_diff: float
    signature: dict[str, Any]

    def signature_json(self) -> str:
        return json.dumps(self.signature, sort_keys=True)


def example_input(data: TabularData) -> torch.Tensor:
    """Two rows shaped like one input row, in the data's dtype: float32 features, or int64 token ids.

    Real training rows where there are two (token ids of all padding could trace a degenerate
    attention); two, not one, so that the exporter keeps the batch axis dynamic; likewise at least
    two steps of a sequence (a NaN step past max_length is padding to the model).
    """
    x = data.x_train
    dtype = np.int64 if x.dtype == np.int64 else np.float32
    shape = list(x.shape[1:])
    if x.ndim == 3:  # sequences: at least 2 steps (NaN after the data's own), see dynamic_axes
        shape[0] = max(2, shape[0])
    example = np.full((2, *shape), np.nan if x.ndim == 3 else 0, dtype=dtype)
    rows = x[:2]
    example[: len(rows), : x.shape[1]] = rows
    return torch.from_numpy(example)


def input_name(example: torch.Tensor) -> str:
    return TOKEN_INPUT_NAME if example.dtype == torch.int64 else INPUT_NAME


def export_onnx(
    model: nn.Module, *, task: Task, example: torch.Tensor, path: Path, check_rows: np.ndarray,
    classes: list[Any] | None = None, table: Table | None = None, check_frame: pd.DataFrame | None = None,
) -> ExportedModel:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis, then check it with ONNX Runtime.

    With a ``table``, its encoding goes in front of the network (:func:`~.preprocess.prepend`): the file
    takes the raw columns, checked on ``check_frame`` (the raw rows of ``check_rows``).
    Raises :class:`TrainingFailed` if the model cannot be exported, or if ONNX Runtime's answers
    on ``check_rows`` differ from PyTorch's by more than ``MAX_ABS_DIFF``.
    """
    import onnx

    module = ServingModule(model, task).eval().cpu()
    output_name = OUTPUT_NAMES[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript-based ONNX exporter is deprecated; the dynamo one writes the dynamic batch
    # axis from ``dynamic_shapes``.
    try:
        with quiet_exporter():
            forget_cached_rnn_kernels()
            torch.onnx.export(
                module,
                (example.cpu(),),
                str(path),
                input_names=[input_name(example)],
                output_names=[output_name],
                dynamic_shapes=(dynamic_axes(example),),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # a plugin's data-dependent control flow, an op ONNX lacks, …
        raise TrainingFailed(f"the model cannot be exported to ONNX: {_first_line(exc)}") from exc
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    if example.ndim == 3:
        check_time_axis(proto, path, module, check_rows)

    if table is not None and check_frame is not None:
        from services.trainer.engines import preprocess

        preprocess.prepend(path, table, network_input=input_name(example))
        diff, scale, signature = check_table_onnx(path, module, table, check_frame, check_rows)
    else:
        diff, scale, signature = check_onnx(path, module, check_rows)
    if classes:
        signature["classes"] = list(classes)
    sequence_signature(signature, example, max_length=int(check_rows.shape[1]))
    _within_bound("ONNX", task, diff, scale)
    return ExportedModel(path=path, max_abs_diff=diff, signature=signature)


def export_torchscript(
    model: nn.Module, *, task: Task, example: torch.Tensor, path: Path, check_rows: np.ndarray,
    classes: list[Any] | None = None,
) -> ExportedModel:
    """Trace ``model`` (with softmax for classifiers) to TorchScript at ``path``, reload it and check it.

    Raises :class:`TrainingFailed` if the model cannot be traced, or if the reloaded module's
    answers on ``check_rows`` differ from the eager module's by more than ``MAX_ABS_DIFF``.
    """
    module = ServingModule(model, task).eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_exporter(), torch.no_grad():
            # Our own check below compares the file as reloaded, on held-out rows.
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                module, (example.cpu(),), check_trace=False
            )
            torch.jit.save(traced, str(path))
    except Exception as exc:
        raise TrainingFailed(f"the model cannot be traced to TorchScript: {_first_line(exc)}") from exc

    with quiet_exporter():
        loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    rows = torch.from_numpy(np.ascontiguousarray(check_rows, dtype=_numpy_dtype(example)))
    with torch.no_grad():
        eager = module(rows).numpy()
        scripted = loaded(rows).numpy()
        n_outputs = int(module(example.cpu()).shape[1])
    diff, scale = _compare("TorchScript", scripted, eager)
    signature: dict[str, Any] = {
        "inputs": [{"name": input_name(example), "shape": [None, *example.shape[1:]],
                    "dtype": _dtype_name(example)}],
        "outputs": [{"name": OUTPUT_NAMES[task], "shape": [None, n_outputs], "dtype": "float32"}],
    }
    if classes:
        signature["classes"] = list(classes)
    sequence_signature(signature, example, max_length=int(check_rows.shape[1]))
    _within_bound("TorchScript", task, diff, scale)
    return ExportedModel(path=path, max_abs_diff=diff, signature=signature)


def dynamic_axes(example: torch.Tensor) -> dict[int, Any]:
    """The batch axis; and for padded sequences (batch, time, width: data.sequence) the time axis.

    A sequence's axes are declared from 2 up: the exporter's LSTM/GRU loop guards against 1, which
    fails torch.onnx's first capture of axes declared from 0 and leaves the axes to its retries and
    their guessed shapes. The graph still takes 1 step and 1 row (:func:`check_time_axis` proves it).
    """
    if example.ndim != 3:
        return {0: torch.export.Dim("batch")}
    return {0: torch.export.Dim("batch", min=2), 1: torch.export.Dim("time", min=2)}


def forget_cached_rnn_kernels() -> None:
    """Drop the kernels PyTorch's Python dispatcher cached for ``aten.lstm``/``aten.gru``.

    With a free time axis, torch.onnx swaps in a while-loop LSTM/GRU for the capture, but (torch
    2.13) it sets the op's kernel without clearing the op's dispatch cache; so once one export (or
    its decompositions) has cached the unrolled kernel, every later export in the process unrolls
    the time loop, and torch.onnx quietly fixes the time axis at the example's length. PyTorch
    clears the same cache when it restores a kernel itself (torch.export's CIA overrides).
    """
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        op._dispatch_cache.clear()


def check_time_axis(proto: Any, path: Path, module: nn.Module, rows: np.ndarray) -> None:
    """A sequence model's ONNX file has a free batch and time axis and answers as PyTorch does on
    ``rows`` cut to their first step and to about half their length (raises :class:`TrainingFailed`)."""
    import onnxruntime as ort

    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [name for name, dim in zip(("batch", "time"), dims, strict=False) if not dim.dim_param]
    if fixed:
        raise TrainingFailed(f"the ONNX export fixed the {' and '.join(fixed)} axis of the sequence "
                             "input; the model was not registered")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps in sorted({1, max(1, rows.shape[1] // 2)}):
        cut = np.ascontiguousarray(rows[:, :steps], dtype=np.float32)
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: cut})
        with torch.no_grad():
            torch_out = module(torch.from_numpy(cut)).numpy()
        diff, _ = _compare("ONNX", onnx_out, torch_out)
        if not np.isfinite(diff) or diff > MAX_ABS_DIFF * max(1.0, float(np.max(np.abs(torch_out)))):
            raise TrainingFailed(f"the ONNX export answers sequences of {steps} step(s) {diff:.3g} away "
                                 "from PyTorch; the model was not registered")


def sequence_signature(signature: dict[str, Any], example: torch.Tensor, *, max_length: int) -> None:
    """A sequence model's input: any number of steps, NaN steps as padding after each sequence's end
    (``nullable``, which serving reads), and the longest sequence it reads (``max_length``, the data's
    padded length: longer ones are truncated)."""
    if example.ndim != 3:
        return
    (first,) = signature["inputs"]
    first.update(shape=[None, None, int(example.shape[2])], nullable=True)
    signature["sequence"] = {"padding": "nan", "max_length": max_length}


def _within_bound(what: str, task: Task, diff: float, scale: float) -> None:
    # Probabilities lie in [0, 1], so the bound is absolute there. A regression answers in the
    # target's units, where float32 alone is off by more than 1e-4 once values pass ~1000;
    # the bound then grows with the largest output.
    allowed = MAX_ABS_DIFF * (1.0 if task == Task.CLASSIFICATION else max(1.0, scale))
    if not np.isfinite(diff) or diff > allowed:
        raise TrainingFailed(
            f"the {what} export disagrees with PyTorch by {diff:.3g} (more than {allowed:.3g}) "
            "on held-out rows; the model was not registered"
        )


def _compare(what: str, exported: np.ndarray, eager: np.ndarray) -> tuple[float, float]:
    """Largest |exported - eager| and largest |eager|."""
    if exported.shape != eager.shape:
        raise TrainingFailed(f"{what} output shape {exported.shape} differs from PyTorch's {eager.shape}")
    if not eager.size:
        return 0.0, 0.0
    return float(np.max(np.abs(exported - eager))), float(np.max(np.abs(eager)))


def _numpy_dtype(example: torch.Tensor) -> type[np.generic]:
    return np.int64 if example.dtype == torch.int64 else np.float32


def _dtype_name(example: torch.Tensor) -> str:
    return "int64" if example.dtype == torch.int64 else "float32"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500] if text else ''}"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporters' chatter (optimiser passes, absent torchvision ops, deprecations) out of logs."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined, unused-ignore]
            # nn.LSTM/GRU keep their weights in a plain list attribute; harmless for the export.
            warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_table_onnx(
    path: Path, module: nn.Module, table: Table, frame: pd.DataFrame, rows: np.ndarray
) -> tuple[float, float, dict[str, Any]]:
    """:func:`check_onnx` for a file taking raw columns: ORT on ``frame``'s columns against PyTorch on
    their encoded ``rows``. The signature has one input per column, ``nullable`` where a null is filled;
    the categories are the version's ``columns.json`` (a signature is a registry tag too: kept small)."""
    import onnxruntime as ort

    from services.trainer.engines import preprocess

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, preprocess.raw_inputs(table, frame))
    with torch.no_grad():
        torch_out = module(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))).numpy()
    diff, scale = _compare("ONNX", onnx_out, torch_out)
    signature = {
        "inputs": [{"name": column.name, "shape": [None], "nullable": column.describe()["nullable"],
                    "dtype": "string" if column.categorical else "float32"} for column in table.columns],
        "outputs": [{"name": arg.name, "shape": [d if isinstance(d, int) else None for d in arg.shape],
                     "dtype": _ORT_DTYPES.get(arg.type, arg.type)} for arg in session.get_outputs()],
    }
    return diff, scale, signature


def check_onnx(path: Path, module: nn.Module, rows: np.ndarray) -> tuple[float, float, dict[str, Any]]:
    """Largest absolute ORT-vs-PyTorch difference on ``rows``, largest |output|, the file's signature."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (arg,) = session.get_inputs()
    dtype = np.int64 if arg.type == "tensor(int64)" else np.float32
    rows = np.ascontiguousarray(rows, dtype=dtype)
    (onnx_out,) = session.run(None, {arg.name: rows})
    with torch.no_grad():
        torch_out = module(torch.from_numpy(rows)).numpy()
    diff, scale = _compare("ONNX", onnx_out, torch_out)

    def describe(arg: Any) -> dict[str, Any]:
        shape = [dim if isinstance(dim, int) else None for dim in arg.shape]
        return {"name": arg.name, "shape": shape, "dtype": _ORT_DTYPES.get(arg.type, arg.type)}

    signature = {
        "inputs": [describe(arg) for arg in session.get_inputs()],
        "outputs": [describe(arg) for arg in session.get_outputs()],
    }
    return diff, scale, signature
