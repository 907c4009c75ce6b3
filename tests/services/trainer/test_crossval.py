"""Cross-validation's folds (evaluation.kfold) and how the job reports them; the end-to-end run through
the worker is tests/services/trainer/test_worker.py::test_five_fold_cross_validation_on_wine_…"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.datasets import load_wine

from services.trainer.engines import crossval, torch_job
from services.trainer.engines.tabular import prepare_data
from services.trainer.engines.types import FitContext, Fold
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.errors import InvalidInput
from tests.services.trainer.sequence_data import list_column_frame
from tests.services.trainer.support import job_spec


def spec(**changes: Any) -> JobCreate:
    return JobCreate.model_validate({
        "model_name": "m",
        "data": {"dataset": "wine", "rev": "a" * 40, "task": "classification", "target": "target"},
        "evaluation": {"kfold": 5}, **changes,
    })


@pytest.fixture(scope="module")
def wine() -> Any:
    return load_wine(as_frame=True).frame


def test_the_folds_cut_the_training_rows_once_each_keeping_the_class_shares(wine):
    job = spec()
    data = prepare_data(wine, job)
    cuts = crossval.cuts(data, job)
    held_out = [set(validation.tolist()) for _, validation in cuts]
    assert len(cuts) == 5 and set().union(*held_out) == set(range(len(data.x_train)))
    assert sum(len(rows) for rows in held_out) == len(data.x_train)
    shares = np.bincount(data.y_train) / len(data.y_train)
    for train, validation in cuts:
        assert set(train.tolist()).isdisjoint(validation.tolist())
        np.testing.assert_allclose(np.bincount(data.y_train[validation], minlength=3) / len(validation),
                                   shares, atol=0.06)
    again = crossval.cuts(data, job)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(cuts, again, strict=True))  # seeded


def test_too_many_folds_for_the_rows_or_a_class_is_refused_saying_why(wine):
    few = wine.groupby("target").head(5)  # 4 training rows a class
    job = spec(evaluation={"kfold": 5})
    with pytest.raises(InvalidInput, match="a class has only 4 training rows"):
        crossval.cuts(prepare_data(few, job), job)
    loose = spec(evaluation={"kfold": 5, "stratified": False})
    assert len(crossval.cuts(prepare_data(few, loose), loose)) == 5


def test_the_summary_is_the_mean_and_spread_of_each_validation_metric():
    folds = [Fold(metrics={"val_accuracy": a, "val_f1_macro": a / 2}, rows=[i])
             for i, a in enumerate([0.8, 1.0])]
    assert crossval.summary(folds) == pytest.approx({
        "cv_accuracy_mean": 0.9, "cv_accuracy_std": 0.1, "cv_f1_macro_mean": 0.45, "cv_f1_macro_std": 0.05})
    assert crossval.per_fold(folds[1]) == {"cv_accuracy": 1.0, "cv_f1_macro": 0.5}
    assert crossval.summary([]) == {}


@pytest.mark.parametrize(("changes", "message"), [
    ({"evaluation": {"kfold": 1}}, "greater than or equal to 2"),
    ({"framework": "keras", "model": {"type": "mlp"}}, "needs framework pytorch or transformers"),
    ({"resources": {"gpus": 2, "queue": "gpu"}}, "on one device"),
])
def test_an_impossible_cross_validation_is_refused_before_the_job_is_stored(changes, message):
    with pytest.raises(ValidationError, match=message):
        spec(**changes)


def test_sequences_are_cross_validated_fold_by_fold_on_whole_sequences(tmp_path):
    """Folds cut the training sequences (not their steps); each fold trains and scores as a job would."""
    frame = list_column_frame(240, seed=3)
    job = JobCreate.model_validate(job_spec(
        rev="a" * 40, dataset="seqs", data__target="sign", data__sequence={"column": "steps"},
        model={"type": "gru", "hidden_size": 8}, training__epochs=3, training__learning_rate=0.01,
        evaluation={"kfold": 3}))
    for name in ("work", "checkpoints", "tensorboard"):
        (tmp_path / name).mkdir()
    context = FitContext(spec=job, frame=frame, device="cpu", workdir=tmp_path / "work",
                         observer=lambda *_: None, checkpoint_dir=tmp_path / "checkpoints",
                         checkpoint_saved=lambda: None, resume_dir=None,
                         tensorboard_dir=tmp_path / "tensorboard", plan=lambda _: None)
    outcome = torch_job.fit(context)
    assert len(outcome.folds) == 3 and 0.6 <= outcome.metrics["cv_accuracy_mean"] <= 1.0
    held_out = sorted(row for fold in outcome.folds for row in fold.rows)
    assert held_out == sorted(outcome.rows["train"])  # each training sequence held out once
    assert outcome.metrics["val_accuracy"] >= 0.6 and outcome.exports[0].signature["sequence"]
