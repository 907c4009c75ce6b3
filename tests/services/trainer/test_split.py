"""The rows' split (issue 16, honest evaluation): train / validation / test shares drawn with the split's
own seed and stratified, a column naming each row's part, and the test metrics named ``test_*``."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from services.trainer.engines.tabular import metrics_on_test_rows, prepare_data
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.errors import InvalidInput


def spec(**data: Any) -> JobCreate:
    return JobCreate.model_validate({
        "model_name": "m", "training": {"seed": data.pop("training_seed", 0)},
        "data": {"dataset": "bc", "rev": "a" * 40, "task": "classification", "target": "target", **data},
    })


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_breast_cancer(as_frame=True).frame


def parts(data: Any) -> dict[str, set[int]]:
    return {part: set(rows) for part, rows in data.rows.items()}


def test_without_a_split_the_validation_rows_are_those_train_test_split_draws(frame):
    data = prepare_data(frame, spec())
    x = frame.drop(columns="target").to_numpy(dtype=np.float32)
    y = frame["target"].to_numpy()
    x_train, x_val, *_ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    assert np.array_equal(data.x_train, x_train) and np.array_equal(data.x_val, x_val)
    assert data.x_test is None and set(data.rows) == {"train", "validation"}


def test_three_shares_are_disjoint_cover_every_row_and_keep_each_class_share(frame):
    data = prepare_data(frame, spec(split={"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 7}))
    found = parts(data)
    assert not (found["train"] & found["validation"] or found["train"] & found["test"]
                or found["validation"] & found["test"])
    assert found["train"] | found["validation"] | found["test"] == set(range(len(frame)))
    assert (len(found["train"]), len(found["validation"]), len(found["test"])) == (341, 114, 114)
    y = frame["target"].to_numpy()
    for part, rows in found.items():
        assert abs(y[sorted(rows)].mean() - y.mean()) < 0.01, part  # stratified
    x = frame.drop(columns="target").to_numpy(np.float32)
    np.testing.assert_array_equal(data.x_test, x[data.rows["test"]])
    np.testing.assert_array_equal(data.y_test, y[data.rows["test"]])


def test_the_split_seed_and_not_the_training_seed_decides_the_parts(frame):
    shares = {"train": 0.7, "validation": 0.15, "test": 0.15}
    one = prepare_data(frame, spec(split={**shares, "seed": 1}, training_seed=0))
    same = prepare_data(frame, spec(split={**shares, "seed": 1}, training_seed=99))
    other = prepare_data(frame, spec(split={**shares, "seed": 2}, training_seed=0))
    assert parts(one) == parts(same)
    assert parts(one)["test"] != parts(other)["test"]


def test_a_column_names_each_rows_part_and_is_no_feature(frame):
    named = frame.assign(part=np.where(np.arange(len(frame)) % 5 == 0, "test",
                                       np.where(np.arange(len(frame)) % 5 == 1, "validation", "train")))
    data = prepare_data(named, spec(split={"column": "part"}))
    assert "part" not in data.features and len(data.features) == 30
    assert sorted(data.rows["test"]) == list(range(0, len(frame), 5))
    assert sorted(data.rows["validation"]) == list(range(1, len(frame), 5))
    without_test = named.assign(part=np.where(named["part"] == "test", "train", named["part"]))
    assert "test" not in prepare_data(without_test, spec(split={"column": "part"})).rows


@pytest.mark.parametrize(("values", "message"), [
    (["train", "valid", "test"], "holds ['valid']; each row must name one of"),
    (["train", None, "test"], "holds ['(missing)']"),
    (["train", "train", "test"], "names no validation rows"),
])
def test_a_bad_split_column_is_refused_saying_what_it_holds(frame, values, message):
    named = frame.assign(part=[values[i % 3] for i in range(len(frame))])
    with pytest.raises(InvalidInput, match=re.escape(message)):
        prepare_data(named, spec(split={"column": "part"}))


@pytest.mark.parametrize(("split", "message"), [
    ({"train": 0.6, "validation": 0.2, "test": 0.1}, "must add up to 1, not 0.9"),
    ({"train": 0.8, "validation": 0.2}, "needs train, validation and test shares"),
    ({"train": 0.6, "validation": 0.2, "test": 0.2, "column": "part"}, "either as shares"),
    ({"column": "target"}, "cannot also be the target or a feature"),
])
def test_an_impossible_split_is_refused_before_the_job_is_stored(split, message):
    with pytest.raises(ValidationError, match=message):
        spec(split=split)


def test_test_metrics_are_the_validation_metrics_of_the_test_rows_named_test(frame):
    data = prepare_data(frame, spec(split={"train": 0.6, "validation": 0.2, "test": 0.2}))
    y = data.y_test
    perfect = np.eye(2, dtype=np.float32)[y] * 10
    assert metrics_on_test_rows(data, lambda rows: perfect) == {
        "test_accuracy": 1.0, "test_f1_macro": 1.0, "test_roc_auc": 1.0}
    wrong = perfect[:, ::-1]
    assert metrics_on_test_rows(data, lambda rows: wrong)["test_accuracy"] == 0.0
    assert metrics_on_test_rows(prepare_data(frame, spec()), lambda rows: perfect) == {}


def test_a_test_revision_gives_the_test_rows_and_the_shares_split_the_rest(frame):
    job = spec(split={"train": 0.75, "validation": 0.25, "test_rev": "b" * 40})
    data = prepare_data(frame.iloc[:450], job, test_frame=frame.iloc[450:])
    assert len(data.x_test) == len(data.rows["test"]) == 119
    assert len(data.rows["train"]) + len(data.rows["validation"]) == 450
    np.testing.assert_array_equal(data.y_test, frame["target"].to_numpy()[450:])


def test_a_test_revision_with_a_class_training_never_saw_is_refused(frame):
    job = spec(split={"train": 0.75, "validation": 0.25, "test_rev": "b" * 40})
    odd = frame.iloc[450:].assign(target=frame["target"].iloc[450:].replace({1: 7}))
    unseen = re.escape("holds classes [7] that the training revision does not")
    with pytest.raises(InvalidInput, match=unseen):
        prepare_data(frame.iloc[:450], job, test_frame=odd)
    with pytest.raises(InvalidInput, match=re.escape("has no column(s) ['target']")):
        prepare_data(frame.iloc[:450], job, test_frame=frame.iloc[450:].drop(columns="target"))


def test_with_a_test_revision_the_split_takes_train_and_validation_shares_only():
    with pytest.raises(ValidationError, match="give train and validation shares only"):
        spec(split={"train": 0.6, "validation": 0.2, "test": 0.2, "test_rev": "b" * 40})
    assert spec(split={"train": 0.8, "validation": 0.2, "test_rev": "b" * 40}).data.split is not None
