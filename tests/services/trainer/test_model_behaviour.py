"""What a user of the ``cnn`` architecture is promised: it learns images, and a seed repeats a run."""

from __future__ import annotations

import pytest
import torch

from services.trainer.engines import engine
from services.trainer.jobs.schemas import JobCreate
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"
# load_digits: 1797 images of 8×8 pixels, flattened to 64 feature columns pixel_0_0 … pixel_7_7.
CNN = {"type": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "kernel_size": 3, "hidden": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cnn_job(**changes) -> JobCreate:
    return JobCreate.model_validate(job_spec(rev=REV, dataset="digits", model=dict(CNN), **changes))


def test_a_cnn_reads_digits_as_images_and_reaches_95_percent(digits):
    job = cnn_job(training__epochs=10, training__batch_size=32, training__learning_rate=0.001)
    data = engine.prepare_data(digits, job)
    assert len(data.features) == 64 and len(data.x_val) == 360
    result = engine.train(data, job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.95, result.history
    assert type(result.model.net).__name__ == "ConvNet"


def test_the_same_seed_gives_the_same_metrics_twice_on_cpu(digits):
    job = cnn_job(training__epochs=3, training__seed=7, model__dropout=0.2)
    runs = []
    for _ in range(2):
        data = engine.prepare_data(digits, job)
        runs.append(engine.train(data, job, device="cpu"))
    first, second = runs
    assert first.metrics == second.metrics
    assert first.history == second.history
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    # And another seed is another run: the equality above is not vacuous.
    other = cnn_job(training__epochs=3, training__seed=8, model__dropout=0.2)
    different = engine.train(engine.prepare_data(digits, other), other, device="cpu")
    assert different.metrics != first.metrics
