"""What a serious training loop gets right: optimizers and schedules, clipping and accumulation,
early stopping, a divergence guard, per-epoch metrics and reports, and reproducibility."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine

from services.trainer.app import create_app
from services.trainer.engines import engine
from services.trainer.engines.reports import (
    CONFUSION_JSON,
    CONFUSION_PNG,
    CURVES_PNG,
    log_run_reports,
    write_reports,
)
from services.trainer.engines.tracking import Tracking
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.auth import Role
from shipyard_common.errors import InvalidInput
from tests.services.trainer.support import job_spec, poison_weights_after
from tests.support import auth, running_app

REV = "0123456789abcdef0123456789abcdef01234567"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_spec(**changes: Any) -> dict[str, Any]:
    """``job_spec`` that also creates nested sections the base spec lacks (``training__scheduler__name``)."""
    spec = job_spec(rev=REV)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return spec


def spec(**changes: Any) -> JobCreate:
    return JobCreate.model_validate(raw_spec(**changes))


def breast_cancer(job: JobCreate) -> engine.TabularData:
    return engine.prepare_data(load_breast_cancer(as_frame=True).frame, job)


# --- the spec -------------------------------------------------------------------------------


def test_new_fields_default_to_the_old_behaviour():
    training = JobCreate.model_validate(job_spec(rev=REV)).training
    assert training.momentum is None and training.weight_decay == 0.0
    assert training.scheduler.name == "none" and training.grad_clip_norm is None
    assert training.grad_accum_steps == 1 and training.early_stopping is None
    assert training.deterministic is False
    full = spec(
        training__optimizer="sgd", training__momentum=0.9, training__weight_decay=1e-4,
        training__scheduler={"name": "step", "step_size": 3, "gamma": 0.5},
        training__grad_clip_norm=1.0, training__grad_accum_steps=2, training__deterministic=True,
        training__early_stopping={"metric": "val_f1_macro", "patience": 3, "min_delta": 0.001},
    )
    assert full.training.early_stopping is not None and full.training.early_stopping.restore_best


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training__momentum": 0.9}, "training.momentum"),  # adam has no momentum
        ({"training__optimizer": "sgd", "training__momentum": 1.5}, "training.momentum"),
        ({"training__optimizer": "adagrad"}, "training.optimizer"),
        ({"training__weight_decay": -0.1}, "training.weight_decay"),
        ({"training__scheduler__name": "exponential"}, "training.scheduler.name"),
        ({"training__scheduler__step_size": 0}, "training.scheduler.step_size"),
        ({"training__scheduler__gamma": 1.5}, "training.scheduler.gamma"),
        ({"training__scheduler__patience": -1}, "training.scheduler.patience"),
        ({"training__scheduler__warmup": 3}, "training.scheduler.warmup"),
        ({"training__grad_clip_norm": 0}, "training.grad_clip_norm"),
        ({"training__grad_accum_steps": 0}, "training.grad_accum_steps"),
        ({"training__early_stopping__metric": "val_r2"}, "training.early_stopping.metric"),
        ({"training__early_stopping__patience": 0}, "training.early_stopping.patience"),
        ({"training__early_stopping__min_delta": -0.1}, "training.early_stopping.min_delta"),
        ({"training__early_stopping__restore_best": "maybe"}, "training.early_stopping.restore_best"),
        ({"training__deterministic": "perhaps"}, "training.deterministic"),
    ],
)
def test_each_bad_new_field_is_named(changes, field):
    with pytest.raises(ValidationError) as caught:
        JobCreate.model_validate(raw_spec(**changes))
    fields = {".".join(str(p) for p in err["loc"]) for err in caught.value.errors()}
    assert field in fields, fields


def test_an_early_stopping_metric_the_task_lacks_is_refused():
    with pytest.raises(ValidationError, match=r"training\.early_stopping\.metric 'val_mae'"):
        spec(training__early_stopping={"metric": "val_mae"})
    with pytest.raises(ValidationError, match=r"training\.early_stopping\.metric 'val_accuracy'"):
        spec(data__task="regression", training__early_stopping={"metric": "val_accuracy"})
    # ROC-AUC is for two classes; three (wine) are refused before training starts.
    job = spec(training__early_stopping={"metric": "val_roc_auc"})
    data = engine.prepare_data(load_wine(as_frame=True).frame, job)
    with pytest.raises(InvalidInput, match="needs two classes"):
        engine.train(data, job, device="cpu")


def test_api_answers_422_naming_a_bad_new_field(settings):
    body = raw_spec(training__scheduler__name="exponential")
    with running_app(create_app(settings)) as base:
        response = httpx.post(f"{base}/jobs", json=body, headers=auth(Role.TRAINER))
    assert response.status_code == 422, response.text
    assert "training.scheduler.name" in {d["field"] for d in response.json()["error"]["details"]}


# --- quality and metrics --------------------------------------------------------------------


def test_default_pipeline_spec_reaches_094_and_early_stopping_restores_the_best_epoch():
    # pipelines/flows.py trains 30 epochs of the defaults.
    plain = spec(training__epochs=30)
    data = breast_cancer(plain)
    result = engine.train(data, plain, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.94
    assert {"val_accuracy", "val_f1_macro", "val_roc_auc", "lr"} <= set(result.metrics)
    assert len(result.history) == 30 and result.best_epoch is None

    stopping = spec(training__epochs=30, training__early_stopping={"metric": "val_loss", "patience": 5})
    best = engine.train(data, stopping, device="cpu")
    assert best.best_epoch is not None and best.stopped_early
    assert len(best.history) == best.best_epoch + 5
    assert {"epoch": float(best.best_epoch), **best.metrics} == best.history[best.best_epoch - 1]
    assert best.metrics["val_loss"] == min(h["val_loss"] for h in best.history)
    assert best.metrics["val_accuracy"] >= 0.95
    # The returned weights are the best epoch's: they reproduce its metrics.
    with torch.no_grad():
        out = best.model(torch.from_numpy(data.x_val))
    scores, confusion = engine.validation_metrics(data, out, torch.from_numpy(data.y_val))
    assert scores["val_accuracy"] == best.metrics["val_accuracy"] and confusion == best.confusion


def test_classification_metrics_are_scikit_learns():
    job = spec(training__epochs=5)
    data = engine.prepare_data(load_iris(as_frame=True).frame, job)
    result = engine.train(data, job, device="cpu")
    assert "val_roc_auc" not in result.metrics  # three classes
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(data.x_val)).argmax(dim=1).numpy()
    assert result.metrics["val_accuracy"] == pytest.approx(skm.accuracy_score(data.y_val, predicted))
    f1 = skm.f1_score(data.y_val, predicted, average="macro")
    assert result.metrics["val_f1_macro"] == pytest.approx(f1)
    assert np.asarray(result.confusion).sum() == len(data.y_val) and len(result.confusion) == 3


def test_regression_reports_mse_and_mae():
    job = spec(data__task="regression", training__epochs=3, training__learning_rate=0.01)
    data = engine.prepare_data(load_diabetes(as_frame=True, scaled=False).frame, job)
    result = engine.train(data, job, device="cpu")
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(data.x_val)).numpy()
    mae, mse = skm.mean_absolute_error(data.y_val, predicted), skm.mean_squared_error(data.y_val, predicted)
    assert result.metrics["val_mae"] == pytest.approx(mae, rel=1e-5)
    assert result.metrics["val_mse"] == pytest.approx(mse, rel=1e-5)
    assert result.confusion is None


def test_reports_are_written_and_uploaded(tmp_path, mlflow_server):
    job = spec(training__epochs=3)
    data = breast_cancer(job)
    trained = engine.train(data, job, device="cpu")
    # What a job hands the reports: the fit's outcome, which carries the task and classes too.
    result = SimpleNamespace(task=data.task, classes=data.classes, confusion=trained.confusion,
                             history=trained.history, best_epoch=trained.best_epoch)
    paths = write_reports(result, tmp_path / "reports")
    assert sorted(p.name for p in paths) == sorted([CONFUSION_JSON, CONFUSION_PNG, CURVES_PNG])
    confusion = json.loads((tmp_path / "reports" / CONFUSION_JSON).read_text())
    assert confusion["labels"] == ["0", "1"] and np.asarray(confusion["matrix"]).sum() == len(data.y_val)
    for name in (CONFUSION_PNG, CURVES_PNG):
        assert (tmp_path / "reports" / name).read_bytes().startswith(PNG_MAGIC)

    tracking = Tracking(mlflow_server)
    run_id = tracking.start_run(experiment="reports-test", run_name="r", tags={})
    tracking.log_reports(run_id, paths)
    listed = {a.path for a in tracking.client.list_artifacts(run_id, "reports")}
    assert listed == {f"reports/{p.name}" for p in paths}
    # The one call a job makes: scratch folder, write, upload.
    other = tracking.start_run(experiment="reports-test", run_name="r2", tags={})
    names = log_run_reports(tracking, other, result)
    uploaded = {a.path for a in tracking.client.list_artifacts(other, "reports")}
    assert uploaded == {f"reports/{n}" for n in names} and len(names) == 3


# --- optimizers and schedules ---------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_each_optimizer_trains(optimizer):
    changes: dict[str, Any] = {"training__optimizer": optimizer, "training__epochs": 8,
                               "training__weight_decay": 1e-4}
    if optimizer == "sgd":
        changes.update(training__momentum=0.9, training__learning_rate=0.01)
    job = spec(**changes)
    result = engine.train(breast_cancer(job), job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.9


def lrs(**changes: Any) -> list[float]:
    job = spec(**changes)
    return [h["lr"] for h in engine.train(breast_cancer(job), job, device="cpu").history]


def test_step_cosine_and_onecycle_move_the_learning_rate_as_documented():
    assert lrs(training__epochs=5, training__scheduler={"name": "step", "step_size": 2, "gamma": 0.5}) == (
        pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    )
    cosine = lrs(training__epochs=10, training__scheduler={"name": "cosine"})
    assert cosine[0] == pytest.approx(1e-3)
    assert cosine == pytest.approx([5e-4 * (1 + math.cos(math.pi * e / 10)) for e in range(10)])
    assert all(a > b for a, b in itertools.pairwise(cosine))

    # One cycle, stepped per batch: starts at lr/25, peaks near lr ~30% in, then anneals.
    onecycle = lrs(training__epochs=10, training__scheduler={"name": "onecycle"})
    assert onecycle[0] == pytest.approx(1e-3 / 25)
    peak = int(np.argmax(onecycle))
    assert 1 <= peak <= 4 and onecycle[peak] > 0.8e-3
    assert all(a > b for a, b in zip(onecycle[peak:], onecycle[peak + 1 :], strict=False))
    assert onecycle[-1] < onecycle[peak] / 10
    # Each epoch starts where 15 updates an epoch (455 rows / 32) put the schedule.
    weight = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.Adam([weight], lr=1e-3), max_lr=1e-3, epochs=10, steps_per_epoch=15
    )
    expected = []
    for _ in range(10):
        expected.append(reference.get_last_lr()[0])
        for _ in range(15):
            reference.optimizer.step()
            reference.step()
    assert onecycle == pytest.approx(expected)


def test_plateau_lowers_the_rate_when_val_loss_stalls():
    # A large rate on SGD stalls quickly; patience 0 lowers it at the first epoch without progress.
    rates = lrs(training__epochs=12, training__optimizer="sgd", training__learning_rate=1.0,
                training__scheduler={"name": "plateau", "patience": 0, "gamma": 0.5})
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[-1] < rates[0]


def test_gradient_accumulation_matches_one_bigger_batch():
    # 455 rows: 15 batches of 32 pair up into the 8 batches of 64 (the odd last one alone).
    small = spec(training__epochs=3, training__optimizer="sgd", training__learning_rate=0.05,
                 training__batch_size=32, training__grad_accum_steps=2)
    big = spec(training__epochs=3, training__optimizer="sgd", training__learning_rate=0.05,
               training__batch_size=64)
    data = breast_cancer(small)
    accumulated = engine.train(data, small, device="cpu").model.state_dict()
    direct = engine.train(data, big, device="cpu").model.state_dict()
    for key, value in direct.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-5)


def test_clipping_keeps_a_too_large_rate_trainable():
    job = spec(training__epochs=10, training__optimizer="sgd", training__learning_rate=0.5,
               training__momentum=0.9, training__grad_clip_norm=0.5)
    result = engine.train(breast_cancer(job), job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.9


# --- divergence and reproducibility ---------------------------------------------------------


def test_a_loss_that_blows_up_fails_naming_epoch_and_step():
    job = spec(training__optimizer="sgd", training__epochs=3, training__learning_rate=1e6)
    with pytest.raises(engine.TrainingFailed) as caught:
        engine.train(breast_cancer(job), job, device="cpu")
    message = caught.value.message
    assert "not finite at epoch 1, step " in message and "no epoch finished" in message


def test_divergence_after_good_epochs_names_the_last_good_one(monkeypatch):
    # The first update of epoch 3 (15 batches an epoch).
    poison_weights_after(monkeypatch, update=31, value=math.inf)
    job = spec(training__epochs=4)
    with pytest.raises(engine.TrainingFailed) as caught:
        engine.train(breast_cancer(job), job, device="cpu")
    message = caught.value.message
    assert "not finite at epoch 3, step 32 (batch 2 of 15)" in message, message
    assert "the last good epoch was 2" in message


def test_same_seed_same_metrics_on_cpu():
    job = spec(training__epochs=4, training__deterministic=True, model__dropout=0.2, training__seed=7)
    data = breast_cancer(job)
    first = engine.train(data, job, device="cpu")
    second = engine.train(data, job, device="cpu")
    assert first.history == second.history
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key])
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    other = engine.train(data, spec(training__epochs=4, training__deterministic=True, model__dropout=0.2,
                                    training__seed=8), device="cpu")
    assert other.history != first.history
