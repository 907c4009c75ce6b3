"""Framework ``keras``: training in a child process, its events, checkpoints, resume and exports."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_digits, load_wine

from services.trainer.engines import engine, keras_job
from services.trainer.engines.types import FitContext
from services.trainer.jobs.schemas import ExportFormat, JobCreate
from shipyard_common.errors import InvalidInput
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"


class Stop(Exception):
    """What the job's observer raises on a cancel."""


def wine() -> pd.DataFrame:
    return load_wine(as_frame=True).frame  # 13 numeric features and "target" (3 classes)


def keras_spec(**changes: Any) -> JobCreate:
    base = {
        "model_name": "wine", "framework": "keras", "data__dataset": "wine",
        "model": {"type": "mlp", "hidden": [32]},
        "training__epochs": 6, "training__batch_size": 16, "training__learning_rate": 0.01,
    }
    return JobCreate.model_validate(job_spec(rev=REV, **{**base, **changes}))


@dataclass
class Recorder:
    """The job's side of a FitContext: what arrived, and when to cancel."""

    checkpoint_dir: Path
    stop_after_epoch: int | None = None
    plans: list[int] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)
    epochs: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)
    # The epoch each checkpoint_saved() call found in the checkpoint folder.
    checkpoints: list[int] = field(default_factory=list)

    def observer(self, epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        if metrics is None:
            self.steps.append((epoch, step))
            return
        self.epochs.append((epoch, step, metrics))
        if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
            raise Stop(f"cancelled after epoch {epoch}")

    @property
    def uploaded(self) -> Path:
        return self.checkpoint_dir.parent / "uploaded"

    def checkpoint_saved(self) -> None:
        # As the job does: upload the folder's files now (the child goes on with the next epoch).
        shutil.rmtree(self.uploaded, ignore_errors=True)
        shutil.copytree(self.checkpoint_dir, self.uploaded)
        state = json.loads((self.uploaded / keras_job.CHECKPOINT_STATE).read_text())
        assert (self.uploaded / keras_job.CHECKPOINT_MODEL).is_file()
        self.checkpoints.append(int(state["epoch"]))


def context_for(tmp_path: Path, spec: JobCreate, frame: pd.DataFrame, *, name: str = "run",
                resume_dir: Path | None = None, stop_after_epoch: int | None = None,
                ) -> tuple[FitContext, Recorder]:
    root = tmp_path / name
    workdir, checkpoint_dir, tensorboard_dir = root / "work", root / "checkpoint", root / "tensorboard"
    for folder in (workdir, checkpoint_dir, tensorboard_dir):
        folder.mkdir(parents=True)
    recorder = Recorder(checkpoint_dir=checkpoint_dir, stop_after_epoch=stop_after_epoch)
    context = FitContext(
        spec=spec, frame=frame, device="cpu", workdir=workdir, observer=recorder.observer,
        checkpoint_dir=checkpoint_dir, checkpoint_saved=recorder.checkpoint_saved, resume_dir=resume_dir,
        tensorboard_dir=tensorboard_dir, plan=recorder.plans.append,
    )
    return context, recorder


def test_mlp_on_wine_checkpoints_resumes_after_a_cancel_and_exports_onnx(tmp_path):
    frame = wine()
    spec = keras_spec(training__early_stopping={"metric": "val_accuracy", "patience": 20})

    # A cancel (the observer raises) after epoch 3 kills the child; its checkpoint stays.
    first, seen = context_for(tmp_path, spec, frame, name="first", stop_after_epoch=3)
    with pytest.raises(Stop):
        keras_job.fit(first)
    assert seen.plans == [9 * 6]  # ceil(142 / 16) steps per epoch, 6 epochs
    assert [epoch for epoch, _, _ in seen.epochs] == [1, 2, 3]
    assert seen.checkpoints == [1, 2, 3]
    assert seen.steps and seen.steps[-1] == (3, 27)
    metrics = seen.epochs[0][2]
    assert set(metrics) == {"train_loss", "val_loss", "val_accuracy", "val_f1_macro", "lr"}
    assert metrics["lr"] == pytest.approx(0.01)

    # Another worker continues from those files at epoch 4, not 1.
    second, resumed = context_for(tmp_path, spec, frame, name="second", resume_dir=seen.uploaded)
    outcome = keras_job.fit(second)
    assert [epoch for epoch, _, _ in resumed.epochs] == [4, 5, 6]
    assert resumed.epochs[0][1] == 4 * 9  # the step count goes on too
    assert resumed.checkpoints == [4, 5, 6]
    assert [int(entry["epoch"]) for entry in outcome.history] == [1, 2, 3, 4, 5, 6]

    data = engine.prepare_data(frame, spec)
    assert outcome.metrics["val_accuracy"] >= 0.9, outcome.history
    assert outcome.classes == [0, 1, 2] and outcome.n_train == len(data.x_train) == 142
    assert outcome.best_epoch is not None and not outcome.stopped_early
    assert outcome.device == "cpu" and outcome.state_dict is None
    assert outcome.card["backend"] == "torch" and outcome.card["parameters"] == 13 * 32 + 32 + 32 * 3 + 3
    assert sum(sum(row) for row in outcome.confusion or []) == len(data.x_val)

    (export,) = outcome.exports
    assert export.format == ExportFormat.ONNX and export.max_abs_diff <= 1e-4
    assert export.signature["inputs"] == [{"name": "input", "shape": [None, 13], "dtype": "float32"}]
    assert export.signature["outputs"] == [{"name": "probabilities", "shape": [None, 3], "dtype": "float32"}]
    assert export.signature["classes"] == [0, 1, 2]
    assert onnx.load(str(export.path)).ir_version <= 10
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input": data.x_val})  # raw rows, any batch size
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probabilities.argmax(axis=1) == data.y_val).mean())
    assert accuracy == pytest.approx(outcome.metrics["val_accuracy"])


def test_savedmodel_with_the_tensorflow_backend_and_onnx_from_it(tmp_path):
    import tensorflow as tf

    frame = wine()
    spec = keras_spec(exports=["savedmodel", "onnx"], training__epochs=4,
                      training__scheduler={"name": "plateau", "patience": 1})
    context, seen = context_for(tmp_path, spec, frame)
    outcome = keras_job.fit(context)
    assert outcome.card["backend"] == "tensorflow"
    assert [epoch for epoch, _, _ in seen.epochs] == [1, 2, 3, 4] and seen.checkpoints == [1, 2, 3, 4]
    assert outcome.metrics["val_accuracy"] >= 0.9, outcome.history
    saved, exported = outcome.exports
    assert saved.format == ExportFormat.SAVEDMODEL and saved.max_abs_diff <= 1e-4
    assert saved.signature["signature_defs"] == ["serving_default"]
    assert saved.signature["inputs"] == [{"name": "input", "shape": [None, 13], "dtype": "float32"}]
    assert saved.signature["outputs"] == [{"name": "probabilities", "shape": [None, 3], "dtype": "float32"}]

    data = engine.prepare_data(frame, spec)
    serve = tf.saved_model.load(str(saved.path)).signatures["serving_default"]
    from_tf = serve(input=tf.constant(data.x_val))["probabilities"].numpy()
    # The ONNX file was written by a torch-backend process from the TensorFlow-trained weights.
    assert exported.format == ExportFormat.ONNX and exported.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(["probabilities"], {"input": data.x_val})
    np.testing.assert_allclose(from_onnx, from_tf, atol=1e-4)


def test_a_diverging_run_fails_naming_where(tmp_path):
    spec = keras_spec(training__optimizer="sgd", training__learning_rate=1e6, training__epochs=2)
    context, seen = context_for(tmp_path, spec, wine())
    with pytest.raises(engine.TrainingFailed) as failure:
        keras_job.fit(context)
    message = failure.value.message
    assert message.startswith("training diverged: ") and "is not finite at epoch 1, step " in message, message
    assert "no epoch finished" in message and not seen.epochs


def test_unsupported_options_are_refused_before_training(tmp_path):
    frame = load_diabetes(as_frame=True, scaled=False).frame
    refused = {
        "onecycle": keras_spec(data__task="regression", training__scheduler={"name": "onecycle"}),
        "fp16": keras_spec(data__task="regression", training__precision="fp16"),
        "input_shape": keras_spec(data__task="regression", model={"type": "cnn", "input_shape": [1, 3, 3]}),
        "sequence_length": keras_spec(data__task="regression", model={"type": "lstm", "sequence_length": 3}),
    }
    for words, spec in refused.items():
        context, _ = context_for(tmp_path, spec, frame, name=words)
        with pytest.raises(InvalidInput, match=words):
            keras_job.fit(context)


@pytest.mark.slow
def test_cnn_reads_rows_as_channels_height_width(tmp_path):
    frame = load_digits(as_frame=True).frame  # 64 pixel columns, 10 classes
    spec = keras_spec(model={"type": "cnn", "input_shape": [1, 8, 8], "channels": [8], "hidden": 32},
                      training__epochs=2, training__batch_size=64, training__learning_rate=0.01,
                      training__scheduler={"name": "step", "step_size": 1, "gamma": 0.5})
    context, seen = context_for(tmp_path, spec, frame)
    outcome = keras_job.fit(context)
    assert [metrics["lr"] for _, _, metrics in seen.epochs] == pytest.approx([0.01, 0.005])
    assert outcome.metrics["val_accuracy"] >= 0.8, outcome.history
    (export,) = outcome.exports
    assert export.max_abs_diff <= 1e-4
    assert export.signature["outputs"] == [{"name": "probabilities", "shape": [None, 10], "dtype": "float32"}]
    assert "Conv2D" in outcome.card["architecture"]


@pytest.mark.slow
def test_gru_regression_answers_in_the_target_units(tmp_path):
    frame = load_diabetes(as_frame=True, scaled=False).frame  # 10 features: 5 steps of 2
    spec = keras_spec(data__task="regression", model={"type": "gru", "sequence_length": 5, "hidden_size": 16},
                      training__epochs=8, training__precision="bf16", training__grad_clip_norm=1.0)
    context, _ = context_for(tmp_path, spec, frame)
    outcome = keras_job.fit(context)
    assert set(outcome.metrics) == {"train_loss", "val_loss", "val_mse", "val_mae", "lr"}
    assert outcome.confusion is None and outcome.classes == []
    data = engine.prepare_data(frame, spec)
    baseline = float(np.abs(data.y_val - data.y_train.mean()).mean())
    assert outcome.metrics["val_mae"] < baseline  # better than always answering the mean

    (export,) = outcome.exports
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    (prediction,) = session.run(["prediction"], {"input": data.x_val})
    assert prediction.shape == (len(data.x_val), 1)
    mae = float(np.abs(prediction - data.y_val).mean())
    assert mae == pytest.approx(outcome.metrics["val_mae"], rel=0.05)  # trained in bf16, exported in fp32
