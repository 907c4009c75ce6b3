"""Export ``onnx_int8``: the checked fp32 ONNX export with its weights quantized to int8.

ONNX Runtime's dynamic quantization (:func:`onnxruntime.quantization.quantize_dynamic`) stores the
weights of ``MatMul`` (PyTorch's ``Linear``, whose ``Gemm`` it rewrites to ``MatMul``; attention's
projections), ``Gather`` (embeddings) and ``LSTM`` nodes as int8, and quantizes their inputs to uint8
at run time; everything else stays fp32. Not ``Conv``: ONNX Runtime's ``ConvInteger`` on CPU ran at
a third of the fp32 convolution's speed (bench/RESULTS.md), so a CNN keeps fp32 convolutions and
gets an int8 head. The file keeps the fp32 file's input and output, so serving opens it with the
same ONNX runtime. A table's model (engines/preprocess.py) keeps its encoding in front of the network
exact: the nodes :func:`~.preprocess.prepend` wrote (LabelEncoder, the one-hot ``Gather``, IsNaN/Where)
are left out of quantization, and both files are scored on the raw columns they take.

Both files are scored on the same evaluation rows with the job's metric (accuracy for classifiers,
RMSE for regression); the int8 file is kept only when it is no worse than ``training.
quantization_tolerance`` allows, and both figures go to the run and the version either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.engines import preprocess
from services.trainer.engines.export import MAX_IR_VERSION
from services.trainer.engines.types import Export, FitOutcome, TabularData, TrainingFailed
from services.trainer.jobs.schemas import ExportFormat, JobCreate, Task

log = logging.getLogger("shipyard.trainer.quantize")

# The node types whose weights become int8 (ONNX Runtime's dynamic "integer ops"; Conv left out).
OP_TYPES = ("MatMul", "Gather", "LSTM")
# Rows per ONNX Runtime call when scoring: bounded memory for long token-id rows.
SCORE_CHUNK = 1024
#: What a file is scored on: the rows of its one input, or a table's raw columns by input name.
Inputs = np.ndarray | dict[str, np.ndarray]


@dataclass(frozen=True)
class Quantization:
    """What quantizing found: the metric on both files, and whether the int8 file was kept."""

    metric: str  # "accuracy" or "rmse"
    fp32: float
    int8: float
    tolerance: float
    kept: bool
    rows: str  # which rows scored both files: "validation", or "test" once the data has them
    n_rows: int
    export: Export | None  # the int8 export when kept

    def metrics(self) -> dict[str, float]:
        """``fp32_<metric>``, ``int8_<metric>`` and ``int8_kept`` (1 or 0), for the run and the version."""
        return {f"fp32_{self.metric}": self.fp32, f"int8_{self.metric}": self.int8,
                "int8_kept": 1.0 if self.kept else 0.0}

    def card(self) -> dict[str, Any]:
        return {"metric": self.metric, "fp32": self.fp32, "int8": self.int8, "kept": self.kept,
                "tolerance": self.tolerance, "rows": self.rows, "n_rows": self.n_rows,
                "op_types": list(OP_TYPES)}


def evaluation_rows(data: TabularData) -> tuple[str, Inputs, np.ndarray]:
    """The rows both files are scored on: the test rows when the data has a test split, else the
    validation rows (those the job reports its metrics on). ``(part name, x, y)``; with a table, x is
    the rows' raw columns, as the exported files take them."""
    if data.x_test is not None and data.y_test is not None and len(data.x_test):
        part, x, y, raw = "test", data.x_test, data.y_test, data.test_frame
    else:
        part, x, y, raw = "validation", data.x_val, data.y_val, data.val_frame
    if data.table is None:
        return part, x, y
    assert raw is not None  # prepare_data keeps a table's raw validation and test rows
    return part, preprocess.raw_inputs(data.table, raw), y


def quantize_onnx(source: Path, target: Path) -> None:
    """Write ``source`` (an fp32 ONNX file) to ``target`` with int8 weights for :data:`OP_TYPES`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(source))
    # The exporter stores the shapes of intermediate values and weights; quantization rewrites
    # Gemm to MatMul with its weight transposed, which leaves those stale, and infers them afresh.
    del proto.graph.value_info[:]
    encoding = [node.name for node in proto.graph.node if node.name.startswith(preprocess.GRAPH_PREFIX)]
    try:
        with _quiet_quantizer():
            quantize_dynamic(proto, target, op_types_to_quantize=list(OP_TYPES), weight_type=QuantType.QInt8,
                             nodes_to_exclude=encoding)
    except Exception as exc:
        raise TrainingFailed(f"the ONNX export cannot be quantized to int8: {type(exc).__name__}: "
                             f"{str(exc).strip()[:500]}") from exc
    quantized = onnx.load(str(target))
    quantized.ir_version = min(quantized.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(target))


def score(path: Path, task: Task, x: Inputs, y: np.ndarray) -> tuple[float, np.ndarray]:
    """``path``'s accuracy (classification) or RMSE (regression) on ``x``/``y``, and its outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if not isinstance(x, dict):
        (arg,) = session.get_inputs()
        x = {arg.name: np.ascontiguousarray(x, dtype=np.int64 if arg.type == "tensor(int64)" else np.float32)}
    parts = [session.run(None, {name: rows[i:i + SCORE_CHUNK] for name, rows in x.items()})[0]
             for i in range(0, len(y), SCORE_CHUNK)]
    out = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
    if task == Task.CLASSIFICATION:
        hits = out.argmax(axis=1) == np.asarray(y).astype(np.int64).ravel()
        return float(hits.mean()) if len(hits) else math.nan, out
    errors = out.astype(np.float64).ravel() - np.asarray(y, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean(errors**2))) if len(errors) else math.nan, out


def worse_by(task: Task, fp32: float, int8: float) -> float:
    """How much worse int8 scored, as the tolerance reads it: accuracy points lost (absolute), or
    RMSE gained relative to fp32's (absolute when fp32's is 0). Negative when int8 did better."""
    if task == Task.CLASSIFICATION:
        return fp32 - int8
    return (int8 - fp32) / fp32 if fp32 > 0 else int8 - fp32


def quantize_export(
    onnx_export: Export, data: TabularData, *, tolerance: float, folder: Path
) -> Quantization:
    """Quantize the checked fp32 ONNX export into ``folder/model.onnx``, score both files on
    :func:`evaluation_rows`, and keep the int8 file only within ``tolerance`` (else it is deleted
    and the job's log says why)."""
    part, x, y = evaluation_rows(data)
    target = folder / "model.onnx"
    quantize_onnx(onnx_export.path, target)
    metric = "accuracy" if data.task == Task.CLASSIFICATION else "rmse"
    fp32, fp32_out = score(onnx_export.path, data.task, x, y)
    int8, int8_out = score(target, data.task, x, y)
    change = worse_by(data.task, fp32, int8)
    kept = math.isfinite(change) and change <= tolerance
    if not kept:
        target.unlink(missing_ok=True)
        log.warning(
            "onnx_int8 dropped: its %s on %d %s rows is %.4g against fp32's %.4g, worse by %.4g%s, more "
            "than training.quantization_tolerance %.4g allows; the version serves the fp32 ONNX export",
            metric, len(y), part, int8, fp32, change, "" if metric == "accuracy" else " (relative)",
            tolerance)
        export = None
    else:
        diff = float(np.max(np.abs(int8_out - fp32_out))) if fp32_out.size else 0.0
        log.info("onnx_int8 kept: %s on %d %s rows %.4g (fp32 %.4g); max |difference| from fp32 %.3g",
                 metric, len(y), part, int8, fp32, diff)
        export = Export(format=ExportFormat.ONNX_INT8, path=target, max_abs_diff=diff,
                        signature=dict(onnx_export.signature))
    return Quantization(metric=metric, fp32=fp32, int8=int8, tolerance=tolerance, kept=kept, rows=part,
                        n_rows=len(y), export=export)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantization tools log through the root logger (and so into the job's log):
    their notes on pre-processing are not the job's business; their errors are."""
    import onnxruntime.quantization

    folder = str(Path(onnxruntime.quantization.__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(folder)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)



def add_int8(outcome: FitOutcome, data: TabularData, spec: JobCreate, exports_folder: Path) -> None:
    """When ``spec`` asks for ``onnx_int8``: quantize the outcome's ONNX export into
    ``exports_folder/onnx_int8``, append the int8 export if kept, and add the figures to the
    outcome's metrics (the run's and the version's) and its model card."""
    if ExportFormat.ONNX_INT8 not in spec.exports:
        return
    onnx_export = next(e for e in outcome.exports if e.format == ExportFormat.ONNX)  # the schema requires it
    found = quantize_export(onnx_export, data, tolerance=spec.training.quantization_tolerance,
                            folder=exports_folder / ExportFormat.ONNX_INT8.value)
    if found.export is not None:
        outcome.exports.append(found.export)
    outcome.metrics.update(found.metrics())
    outcome.card["quantization"] = found.card()
