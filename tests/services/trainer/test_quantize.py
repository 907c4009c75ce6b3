"""Export ``onnx_int8``: a real job through the engine quantizes its ONNX export, keeps the int8 file
only within ``training.quantization_tolerance``, records both figures, and serving answers it with
the ONNX runtime under the version's format tag."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.serving.runtimes.loader import load_runtime
from services.serving.settings import ServingSettings
from services.trainer.engines import engine, model_card, quantize, torch_job
from services.trainer.engines.export import example_input, export_onnx
from services.trainer.engines.types import Export, FitContext, TabularData
from services.trainer.jobs.schemas import FRAMEWORK_EXPORTS, ExportFormat, Framework, JobCreate, Task
from shipyard_common.lineage import TAG_FORMAT
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digits_spec(**changes: Any) -> JobCreate:
    changes = {"exports": ["onnx", "onnx_int8"], "training__epochs": 8, **changes}
    return JobCreate.model_validate(job_spec(rev=REV, dataset="digits", **changes))


def context(spec: JobCreate, frame: Any, workdir: Path) -> FitContext:
    """What the worker hands a framework, minus MLflow: callbacks that record nothing."""
    for name in ("checkpoints", "tensorboard"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    return FitContext(
        spec=spec, frame=frame, device="cpu", workdir=workdir, observer=lambda *_: None,
        checkpoint_dir=workdir / "checkpoints", checkpoint_saved=lambda: None, resume_dir=None,
        tensorboard_dir=workdir / "tensorboard", plan=lambda _: None,
    )


def test_a_job_keeps_its_int8_export_and_serving_answers_it_like_fp32(digits, tmp_path):
    outcome = torch_job.fit(context(digits_spec(), digits, tmp_path / "job"))

    formats = [e.format for e in outcome.exports]
    assert formats == [ExportFormat.ONNX, ExportFormat.ONNX_INT8]
    fp32, int8 = outcome.metrics["fp32_accuracy"], outcome.metrics["int8_accuracy"]
    assert fp32 > 0.9 and fp32 - int8 <= 0.01 and outcome.metrics["int8_kept"] == 1.0
    # The ONNX file's accuracy is the engine's own validation accuracy: the same rows, the same model.
    assert fp32 == pytest.approx(outcome.metrics["val_accuracy"], abs=1e-9)
    facts = outcome.card["quantization"]
    assert facts["kept"] and facts["rows"] in ("validation", "test") and "MatMul" in facts["op_types"]

    folder = model_card.write_model_folder(outcome=outcome, spec=digits_spec(), lineage={},
                                           folder=tmp_path / "version" / "model")
    assert folder.primary.format == ExportFormat.ONNX_INT8
    card = (folder.path / "MODEL_CARD.md").read_text()
    assert f"onnx_int8 kept: accuracy {int8:.4g} against fp32's {fp32:.4g}" in card
    assert "onnx_int8: max |difference| from the fp32 ONNX file" in card
    sizes = {fmt: (folder.path / fmt / "model.onnx").stat().st_size for fmt in ("onnx", "onnx_int8")}
    assert sizes["onnx_int8"] < sizes["onnx"]

    data = engine.prepare_data(digits, digits_spec())
    answers = {}
    for fmt in ("onnx_int8", "onnx"):
        loaded = load_runtime(tmp_path / "version", name="digits", version="1", tags={TAG_FORMAT: fmt},
                              settings=ServingSettings())
        assert loaded.runtime.format == fmt and loaded.runtime.platform == "onnxruntime_onnx"
        assert loaded.signature.classes == tuple(range(10))
        answers[fmt] = loaded.runtime.predict({"input": data.x_val})["probabilities"].argmax(axis=1)
        loaded.runtime.close()
    assert float(np.mean(answers["onnx_int8"] == answers["onnx"])) >= 0.95
    # Without the tag, serving prefers the int8 file as the trainer does.
    untagged = load_runtime(tmp_path / "version", name="digits", version="1", tags={},
                            settings=ServingSettings())
    assert untagged.runtime.format == "onnx_int8"
    untagged.runtime.close()


def test_an_int8_file_scoring_worse_than_the_tolerance_is_dropped_with_the_reason(digits, tmp_path, caplog):
    spec = digits_spec(training__epochs=5)
    data = engine.prepare_data(digits, spec)
    model = engine.train(data, spec, device="cpu").model
    # A weight of 1e4 on a pixel that is 0 in every image: the fp32 answers do not change, but one
    # int8 scale for the whole matrix now rounds every other weight of the layer to zero.
    constant = int(np.flatnonzero(data.x_train.std(axis=0) == 0)[0])
    with torch.no_grad():
        model.net[0].weight[:, constant] = 1e4
    exported = export_onnx(model, task=data.task, example=example_input(data),
                           path=tmp_path / "onnx" / "model.onnx", check_rows=data.x_val, classes=data.classes)
    onnx_export = Export(format=ExportFormat.ONNX, path=exported.path, max_abs_diff=exported.max_abs_diff,
                         signature=exported.signature)

    with caplog.at_level(logging.INFO, logger="shipyard.trainer.quantize"):
        found = quantize.quantize_export(onnx_export, data, tolerance=0.01, folder=tmp_path / "onnx_int8")

    assert not found.kept and found.export is None and not (tmp_path / "onnx_int8" / "model.onnx").exists()
    assert found.fp32 > 0.9 and found.int8 < found.fp32 - 0.01
    assert found.metrics() == {"fp32_accuracy": found.fp32, "int8_accuracy": found.int8, "int8_kept": 0.0}
    (record,) = [r for r in caplog.records if r.name == "shipyard.trainer.quantize"]
    assert record.levelno == logging.WARNING
    assert "onnx_int8 dropped" in record.message and "quantization_tolerance 0.01" in record.message
    assert "serves the fp32 ONNX export" in record.message


def test_regression_is_judged_on_rmse_relative_to_fp32s(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([[3.0], [-2.0], [0.5]], dtype=np.float32) + 100.0).astype(np.float32)
    data = TabularData(features=["a", "b", "c"], target="t", task=Task.REGRESSION,
                       x_train=x, y_train=y, x_val=x, y_val=y)
    spec = JobCreate.model_validate(job_spec(rev=REV, data__task="regression", training__epochs=1))
    model = engine.build_model(data, spec)
    exported = export_onnx(model, task=data.task, example=example_input(data),
                           path=tmp_path / "onnx" / "model.onnx", check_rows=x)
    rmse, out = quantize.score(exported.path, Task.REGRESSION, x, y)
    assert out.shape == (64, 1)
    assert rmse == pytest.approx(float(np.sqrt(np.mean((out - y) ** 2))), rel=1e-6)
    # Relative for regression (a target in the hundreds must not need a tolerance in its units).
    assert quantize.worse_by(Task.REGRESSION, 200.0, 201.0) == pytest.approx(0.005)
    assert quantize.worse_by(Task.CLASSIFICATION, 0.95, 0.94) == pytest.approx(0.01)
    assert quantize.worse_by(Task.CLASSIFICATION, 0.90, 0.92) < 0  # int8 did better: kept


def test_the_test_rows_score_both_files_once_the_data_has_them():
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    data = TabularData(features=["a", "b"], target="t", task=Task.CLASSIFICATION,
                       x_train=x, y_train=y, x_val=x[:2], y_val=y[:2])
    part, rows, _ = quantize.evaluation_rows(data)
    assert part == "validation" and len(rows) == 2
    with_test = _with_test_rows(data, x[:3], y[:3])
    part, rows, _ = quantize.evaluation_rows(with_test)
    assert part == "test" and len(rows) == 3


def _with_test_rows(data: TabularData, x: np.ndarray, y: np.ndarray) -> Any:
    """``data`` with test rows, whether or not this checkout's TabularData has those fields yet."""
    return SimpleNamespace(**{**vars(data), "x_test": x, "y_test": y})


def test_onnx_int8_needs_the_onnx_export_and_a_framework_that_writes_it(monkeypatch):
    with pytest.raises(ValidationError, match=r"quantizes the 'onnx' export .* list 'onnx' too"):
        JobCreate.model_validate(job_spec(rev=REV, exports=["onnx_int8"]))
    with pytest.raises(ValidationError, match="quantization_tolerance"):
        JobCreate.model_validate(job_spec(rev=REV, training__quantization_tolerance=-0.1))
    assert digits_spec().training.quantization_tolerance == 0.01
    for framework in Framework:
        assert ExportFormat.ONNX_INT8 in FRAMEWORK_EXPORTS[framework]
    monkeypatch.setitem(FRAMEWORK_EXPORTS, Framework.KERAS, frozenset({ExportFormat.SAVEDMODEL}))
    cannot = "quantizes the ONNX export, which framework 'keras' cannot write"
    with pytest.raises(ValidationError, match=cannot):
        JobCreate.model_validate(job_spec(rev=REV, framework="keras", exports=["savedmodel", "onnx_int8"]))
