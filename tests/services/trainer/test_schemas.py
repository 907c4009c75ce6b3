"""The job spec accepts what docs/contracts.md shows and rejects, by field, what it does not."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.trainer.schemas import JobCreate
from tests.services.trainer.conftest import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"


def test_contract_example_is_valid_and_defaults_fill_in():
    job = JobCreate.model_validate(job_spec(rev=REV))
    assert job.spec_version == 1 and job.data.features is None and job.exports == ["onnx"]
    minimal = JobCreate.model_validate(
        {"model_name": "m", "data": {"dataset": "d", "rev": REV[:7], "task": "regression", "target": "y"}}
    )
    assert minimal.training.optimizer == "adam" and minimal.resources.queue == "cpu"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training__learning_rate": -0.1}, "training.learning_rate"),
        ({"training__optimizer": "lbfgs"}, "training.optimizer"),
        ({"training__epochs": 0}, "training.epochs"),
        ({"data__validation_split": 1.5}, "data.validation_split"),
        ({"data__rev": "main"}, "data.rev"),
        ({"data__dataset": "../etc"}, "data.dataset"),
        ({"data__task": "clustering"}, "data.task"),
        ({"data__features": ["target"]}, "data"),
        ({"model__type": "cnn"}, "model.type"),
        ({"model__dropout": 1.0}, "model.dropout"),
        ({"resources__queue": "tpu"}, "resources.queue"),
        ({"exports": ["pickle"]}, "exports.0"),
        ({"framework": "tensorflow"}, "framework"),
        ({"spec_version": 2}, "spec_version"),
        ({"learning_rte": 0.1}, "learning_rte"),
        ({"training__momentum": 0.9}, "training.momentum"),
        ({"model_name": "bad name!"}, "model_name"),
    ],
)
def test_each_bad_field_is_named(changes, field):
    with pytest.raises(ValidationError) as caught:
        JobCreate.model_validate(job_spec(rev=REV, **changes))
    fields = {".".join(str(p) for p in err["loc"]) for err in caught.value.errors()}
    assert field in fields, fields


def test_revision_error_speaks_of_git():
    with pytest.raises(ValidationError, match="git commit id"):
        JobCreate.model_validate(job_spec(rev="HEAD"))
