"""The engine's remaining practices: mixed precision (bf16, fp16 with a GradScaler), torch.compile,
DataLoader workers, TensorBoard, fine-tuning from given weights, and the deferred NaN check."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from sklearn.datasets import load_breast_cancer

from services.trainer.engines import engine
from services.trainer.jobs.schemas import JobCreate, Precision
from shipyard_common.errors import InvalidInput
from tests.services.trainer.support import job_spec, poison_weights_after

REV = "0123456789abcdef0123456789abcdef01234567"


def spec(**changes: Any) -> JobCreate:
    raw = job_spec(rev=REV)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return JobCreate.model_validate(raw)


def breast_cancer(job: JobCreate) -> engine.TabularData:
    return engine.prepare_data(load_breast_cancer(as_frame=True).frame, job)


# --- precision ------------------------------------------------------------------------------


def test_bf16_autocast_trains_on_cpu():
    job = spec(training__epochs=10, training__precision="bf16")
    assert engine.resolve_precision(Precision.BF16, "cpu") == Precision.BF16
    result = engine.train(breast_cancer(job), job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.9
    # The returned model is fp32, whatever the training's autocast dtype.
    assert {v.dtype for v in result.model.state_dict().values()} == {torch.float32}


def test_fp16_uses_a_grad_scaler_whose_state_is_checkpointed_and_resumed(tmp_path):
    # PyTorch 2.13 autocasts fp16 on CPU too, so the real GradScaler path runs here.
    assert engine.resolve_precision(Precision.FP16, "cpu") == Precision.FP16
    job = spec(training__epochs=5, training__precision="fp16", training__grad_clip_norm=5.0)
    data = breast_cancer(job)
    saved: list[dict[str, Any]] = []

    def save(state: dict[str, Any]) -> None:
        engine.save_checkpoint(state, tmp_path / f"epoch-{state['epoch']}.pt")
        saved.append(state)

    unbroken = engine.train(data, job, device="cpu", checkpointer=save)
    assert unbroken.metrics["val_accuracy"] >= 0.9
    scaler = saved[-1]["grad_scaler"]
    assert scaler is not None and scaler["scale"] > 0 and "_growth_tracker" in scaler
    # 15 updates an epoch: the growth tracker counts every update since the last change of scale.
    assert scaler["_growth_tracker"] == 75 or scaler["scale"] != 65536.0

    state = engine.load_checkpoint(tmp_path / "epoch-2.pt")
    assert state["grad_scaler"]["_growth_tracker"] in (30, saved[1]["grad_scaler"]["_growth_tracker"])
    resumed_states: list[dict[str, Any]] = []
    resumed = engine.train(data, job, device="cpu", resume=state, checkpointer=resumed_states.append)
    assert resumed.history == unbroken.history
    assert resumed_states[-1]["grad_scaler"] == scaler
    for name, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_fp32_checkpoints_carry_no_scaler_state():
    job = spec(training__epochs=1)
    states: list[dict[str, Any]] = []
    engine.train(breast_cancer(job), job, device="cpu", checkpointer=states.append)
    assert states[0]["grad_scaler"] is None


def test_fp16_overflow_steps_skipped_by_the_scaler_are_not_divergence(monkeypatch):
    # A loss scale of 2**40 overflows fp16 gradients: the scaler skips those updates and halves
    # the scale until they fit. Clipping sees an inf norm on each; the NaN guard must stay quiet.
    real = torch.amp.GradScaler
    made: list[Any] = []

    def huge(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, init_scale=2.0**40, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    job = spec(training__epochs=6, training__precision="fp16", training__grad_clip_norm=1.0)
    result = engine.train(breast_cancer(job), job, device="cpu")
    assert made and made[0].get_scale() < 2.0**30  # it did back off from overflowing steps
    assert result.metrics["val_accuracy"] >= 0.85 and len(result.history) == 6


def test_fp16_still_reports_a_loss_that_truly_diverges():
    job = spec(training__optimizer="sgd", training__epochs=3, training__learning_rate=1e6,
               training__precision="fp16")
    with pytest.raises(engine.TrainingFailed) as caught:
        engine.train(breast_cancer(job), job, device="cpu")
    assert "the loss" in caught.value.message and "not finite at epoch 1, step " in caught.value.message


# --- the NaN guard without a host sync per batch --------------------------------------------


def test_periodic_finite_checks_name_the_same_step(monkeypatch):
    # Checked every 4 steps instead of once an epoch: the first bad step is still the one named.
    monkeypatch.setattr(engine, "FINITE_CHECK_EVERY", 4)
    # The 6th update of epoch 2 (15 batches an epoch).
    poison_weights_after(monkeypatch, update=21, value=math.nan)
    job = spec(training__epochs=3, training__grad_clip_norm=10.0)
    with pytest.raises(engine.TrainingFailed) as caught:
        engine.train(breast_cancer(job), job, device="cpu")
    message = caught.value.message
    assert "the loss (nan) is not finite at epoch 2, step 22 (batch 7 of 15)" in message, message
    assert "the last good epoch was 1" in message


# --- torch.compile, DataLoader workers, TensorBoard, initial weights -------------------------


@pytest.mark.slow
def test_compile_trains_and_returns_the_plain_module():
    # Most of the time is Inductor compiling C++ kernels. A batch size that divides the 455 training
    # rows gives every step one shape, so the graph is compiled once (a shorter last batch would
    # compile it again with dynamic shapes, doubling the time).
    job = spec(training__epochs=2, training__batch_size=91, training__compile=True, model__hidden=[16])
    data = breast_cancer(job)
    assert len(data.x_train) % 91 == 0, len(data.x_train)
    result = engine.train(data, job, device="cpu")
    assert math.isfinite(result.metrics["val_loss"])
    keys = list(result.model.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    assert type(result.model).__name__ != "OptimizedModule"


def test_dataloader_workers_keep_runs_reproducible():
    job = spec(training__epochs=2, training__num_workers=2, training__pin_memory=True)
    data = breast_cancer(job)
    first = engine.train(data, job, device="cpu")
    second = engine.train(data, job, device="cpu")
    assert first.history == second.history
    # The workers only move batches: the same order, hence the same run, as in-process loading.
    inline = engine.train(data, spec(training__epochs=2), device="cpu")
    assert inline.history == first.history


def test_tensorboard_gets_per_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = spec(training__epochs=3)
    engine.train(breast_cancer(job), job, device="cpu", tensorboard_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "val/f1_macro", "val/roc_auc", "lr"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2, 3]


def test_initial_weights_start_where_the_parent_ended():
    job = spec(training__epochs=5)
    data = breast_cancer(job)
    parent = engine.train(data, job, device="cpu")
    one = spec(training__epochs=1)
    fresh = engine.train(data, one, device="cpu")
    tuned = engine.train(data, one, device="cpu", initial_weights=parent.model.state_dict())
    assert tuned.history[0]["train_loss"] < fresh.history[0]["train_loss"]
    assert tuned.metrics["val_loss"] <= parent.metrics["val_loss"] * 1.2


def test_initial_weights_of_another_shape_are_refused_clearly():
    other = spec(training__epochs=1, model__hidden=[8])
    data = breast_cancer(other)
    weights = engine.train(data, other, device="cpu").model.state_dict()
    job = spec(training__epochs=1)
    with pytest.raises(InvalidInput) as caught:
        engine.train(data, job, device="cpu", initial_weights=weights)
    assert caught.value.message.startswith("init_from: the parent version's weights do not fit")
    assert "size mismatch" in caught.value.message
