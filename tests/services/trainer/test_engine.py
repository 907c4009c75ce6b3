"""The training loop and the ONNX export, without a job around them."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_diabetes

from services.trainer.engines import engine
from services.trainer.engines.export import example_input, export_onnx
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.errors import InvalidInput
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"


def spec(**changes) -> JobCreate:
    return JobCreate.model_validate(job_spec(rev=REV, **changes))


def test_regression_exports_a_model_on_raw_features(tmp_path):
    frame = load_diabetes(as_frame=True, scaled=False).frame
    job = spec(data__task="regression", training__epochs=30, training__learning_rate=0.01)
    data = engine.prepare_data(frame, job)
    result = engine.train(data, job, device="cpu")
    assert set(result.metrics) == {"train_loss", "val_loss", "val_mse", "val_mae", "lr"}
    # Better than always answering the training mean, in the target's own units.
    baseline = float(np.abs(data.y_val - data.y_train.mean()).mean())
    assert result.metrics["val_mae"] < 0.9 * baseline

    exported = export_onnx(
        result.model, task=data.task, example=example_input(data), path=tmp_path / "model.onnx",
        check_rows=data.x_val,
    )
    assert json.loads(exported.signature_json())["outputs"] == [
        {"name": "prediction", "shape": [None, 1], "dtype": "float32"}
    ]
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (prediction,) = session.run(None, {"input": data.x_val[:7]})
    assert prediction.shape == (7, 1)
    mae = float(np.abs(prediction - data.y_val[:7]).mean())
    assert mae < 3 * result.metrics["val_mae"]


def test_labels_need_not_be_numbers_and_split_is_stratified_and_seeded():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=200), "b": np.ones(200), "label": ["yes"] * 150 + ["no"] * 50})
    job = spec(data__target="label", data__validation_split=0.2, training__epochs=2)
    data = engine.prepare_data(frame, job)
    assert data.features == ["a", "b"] and data.classes == ["no", "yes"]
    assert (data.y_val == 0).sum() == 10 and (data.y_val == 1).sum() == 30
    again = engine.prepare_data(frame, job)
    np.testing.assert_array_equal(data.x_val, again.x_val)
    # A constant column must not divide by zero.
    result = engine.train(data, job, device="cpu")
    assert np.isfinite(list(result.metrics.values())).all()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        # Missing features and strings make a table (test_tables.py); a missing target is still refused.
        (pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "target": [0, 1, None, 1]}), "missing values"),
        (pd.DataFrame({"a": pd.to_datetime(["2026-01-01"] * 10), "target": [0, 1] * 5}),
         "dates or durations"),
        (pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "target": [0, 0, 0, 0]}), "classification needs two"),
        (pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "target": [0, 1, 1, 1]}), "cannot split"),
        (pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}), "no column(s) ['target']"),
    ],
)
def test_unusable_data_is_refused_with_a_reason(frame, message):
    with pytest.raises(InvalidInput) as caught:
        engine.prepare_data(frame, spec())
    assert message in caught.value.message


@pytest.mark.parametrize("scheduler", ["none", "onecycle", "plateau"])
def test_resuming_a_checkpoint_trains_exactly_as_an_unbroken_run(tmp_path, scheduler):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    job = spec(training__epochs=6, training__scheduler={"name": scheduler},
               training__early_stopping={"metric": "val_loss", "patience": 10})
    data = engine.prepare_data(frame, job)
    unbroken = engine.train(data, job, device="cpu")

    def save(state):
        engine.save_checkpoint(state, tmp_path / f"epoch-{state['epoch']}.pt")

    engine.train(data, job, device="cpu", checkpointer=save)
    # Loaded with weights_only=True: RNG states, optimizer and scheduler are plain tensors and values.
    state = engine.load_checkpoint(tmp_path / "epoch-3.pt")
    assert state["epoch"] == 3 and len(state["history"]) == 3 and state["grad_scaler"] is None
    resumed = engine.train(data, job, device="cpu", resume=state)
    assert resumed.history == unbroken.history and resumed.metrics == unbroken.metrics
    assert resumed.best_epoch == unbroken.best_epoch
    for name, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
