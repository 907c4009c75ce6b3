"""``resources.gpus > 1``: the engine under torchrun with DistributedDataParallel, here two gloo
processes on CPU (the code path a multi-GPU worker runs, minus NCCL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from services.trainer.engines import distributed, engine, torch_job
from services.trainer.engines.types import FitContext
from services.trainer.jobs.schemas import JobCreate
from tests.services.trainer.sequence_data import list_column_frame
from tests.services.trainer.support import job_spec
from tests.services.trainer.table_data import DECLARED, table_frame

REV = "0123456789abcdef0123456789abcdef01234567"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, int, dict[str, float] | None]] = []
        self.checkpoints = 0
        self.plans: list[int] = []

    def observer(self, epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        self.events.append((epoch, step, metrics))

    def checkpoint_saved(self) -> None:
        self.checkpoints += 1


def context_for(
    tmp_path: Path, recorder: Recorder, frame: pd.DataFrame | None = None, **changes: Any
) -> FitContext:
    spec = JobCreate.model_validate(job_spec(rev=REV, resources__gpus=2, **changes))
    for name in ("work", "checkpoints", "tensorboard"):
        (tmp_path / name).mkdir(exist_ok=True)
    frame = load_breast_cancer(as_frame=True).frame if frame is None else frame
    return FitContext(
        spec=spec, frame=frame, device="cpu", workdir=tmp_path / "work",
        observer=recorder.observer, checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_saved=recorder.checkpoint_saved, resume_dir=None, tensorboard_dir=tmp_path / "tensorboard",
        plan=recorder.plans.append,
    )


def test_two_gloo_processes_train_like_one(tmp_path):
    recorder = Recorder()
    context = context_for(tmp_path, recorder, training__epochs=8)
    outcome = torch_job.fit(context)

    assert outcome.metrics["val_accuracy"] >= 0.9
    epochs = [(e, m) for e, _, m in recorder.events if m is not None]
    assert [e for e, _ in epochs] == list(range(1, 9))
    assert epochs[-1][1] == outcome.metrics and len(outcome.history) == 8
    # Each rank's share of the 455 training rows: 228, in 8 batches of 32; plan counts those.
    assert recorder.plans == [8 * 8] and recorder.events[-1][1] == 64
    # Only rank 0 checkpoints: one event (and one file) per epoch, not one per rank.
    assert recorder.checkpoints == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [torch_job.CHECKPOINT_FILE]
    state = engine.load_checkpoint(tmp_path / "checkpoints" / torch_job.CHECKPOINT_FILE)
    assert state["epoch"] == 8 and not any(k.startswith("module.") for k in state["model"])
    # TensorBoard: rank 0's event file only.
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # The returned weights load into a fresh model and reproduce the reported accuracy.
    data = engine.prepare_data(context.frame, context.spec)
    fresh = engine.build_model(data, context.spec)
    assert outcome.state_dict is not None
    fresh.load_state_dict(outcome.state_dict)
    fresh.eval()
    with torch.no_grad():
        predicted = fresh(torch.from_numpy(data.x_val)).argmax(dim=1).numpy()
    assert float((predicted == data.y_val).mean()) == pytest.approx(outcome.metrics["val_accuracy"])


def test_a_table_with_strings_and_nulls_trains_on_two_gloo_processes(tmp_path):
    """The ranks get the encoded rows and the table's columns (an embedded one builds the network); the
    parent exports the graph that takes raw columns, checked on the raw validation rows."""
    recorder = Recorder()
    context = context_for(tmp_path, recorder, frame=table_frame(), training__epochs=6,
                          data__split={"column": "part"}, data__columns=DECLARED)
    outcome = torch_job.fit(context)
    assert outcome.metrics["val_accuracy"] >= 0.85 and outcome.exports[0].max_abs_diff <= 1e-5
    assert [e for e, _, m in recorder.events if m is not None] == list(range(1, 7))
    data = engine.prepare_data(context.frame, context.spec)
    assert data.table is not None and outcome.columns == data.table.describe()
    assert any(column.get("encoding") == "embedding" for column in outcome.columns)
    inputs = [item["name"] for item in outcome.exports[0].signature["inputs"]]
    assert inputs == data.features  # one input per raw column


def test_variable_length_sequences_train_on_two_gloo_processes(tmp_path):
    """NaN-padded sequences go to the ranks as any rows do; the parent's export keeps a free time axis."""
    recorder = Recorder()
    context = context_for(tmp_path, recorder, frame=list_column_frame(300, seed=1), data__target="sign",
                          data__sequence={"column": "steps"}, model={"type": "lstm", "hidden_size": 16},
                          training__epochs=4, training__learning_rate=0.01)
    outcome = torch_job.fit(context)
    assert outcome.metrics["val_accuracy"] >= 0.8  # chance: about 0.5
    onnx_export = outcome.exports[0]
    assert onnx_export.signature["inputs"][0]["shape"] == [None, None, 1] and onnx_export.max_abs_diff <= 1e-5
    data = engine.prepare_data(context.frame, context.spec)
    assert onnx_export.signature["sequence"]["max_length"] == data.x_train.shape[1]


def test_a_rank_that_diverges_fails_the_job_with_the_engines_message(tmp_path):
    recorder = Recorder()
    context = context_for(tmp_path, recorder, training__epochs=3, training__optimizer="sgd",
                          training__learning_rate=1e6)
    with pytest.raises(engine.TrainingFailed) as caught:
        torch_job.fit(context)
    message = caught.value.message
    assert message.startswith("training diverged: the loss") and "not finite at epoch 1, step " in message
    assert "no epoch finished" in message and recorder.checkpoints == 0


def test_data_goes_to_the_ranks_as_npy_files_without_pickle(tmp_path):
    spec = JobCreate.model_validate(job_spec(rev=REV))
    data = engine.prepare_data(load_breast_cancer(as_frame=True).frame, spec)
    distributed.write_data(data, tmp_path)
    back = distributed.read_data(tmp_path)
    assert back.features == data.features and back.task == data.task and back.classes == data.classes
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
        np.load(tmp_path / f"{name}.npy", allow_pickle=False)

    table = engine.prepare_data(table_frame(), JobCreate.model_validate(job_spec(
        rev=REV, data__split={"column": "part"}, data__columns=DECLARED)))
    (tmp_path / "table").mkdir()
    distributed.write_data(table, tmp_path / "table")
    back = distributed.read_data(tmp_path / "table")
    assert back.table == table.table and back.val_frame is None  # the raw rows stay with the parent
    np.testing.assert_array_equal(back.x_train, table.x_train)
