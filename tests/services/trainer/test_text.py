"""Framework ``transformers``: the packaged MiniLM fine-tuned as a text classifier, offline.

One frozen-encoder fine-tune (module-scoped, shared by the export tests) and one short
un-frozen run, both through the engine's own loop on a synthetic sentiment set.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from services.trainer.engines import engine, text, torch_job
from services.trainer.engines.types import FitContext, FitOutcome
from services.trainer.jobs.schemas import ExportFormat, JobCreate
from shipyard_common.errors import InvalidInput
from tests.services.trainer.sentiment import sentiment_frame
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"
MAX_LENGTH = 32

def spec(**changes: Any) -> JobCreate:
    base = {
        "model_name": "sentiment",
        "framework": "transformers",
        "model": {"type": "pretrained_text", "max_length": MAX_LENGTH, "freeze_encoder": True},
        "data__dataset": "reviews",
        "data__target": "sentiment",
        "training__epochs": 2,
        "training__batch_size": 16,
        "training__learning_rate": 5e-3,
    }
    return JobCreate.model_validate(job_spec(rev=REV, **{**base, **changes}))


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Offline, and proven so: any socket connection in this module fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@dataclass
class Run:
    context: FitContext
    outcome: FitOutcome
    epochs: list[dict[str, float]]
    checkpoints: int
    planned: list[int]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The whole framework path: torch_job.fit (prepare → engine loop → ONNX and TorchScript, checked)."""
    root = tmp_path_factory.mktemp("text-job")
    epochs: list[dict[str, float]] = []
    planned: list[int] = []
    saved = [0]

    def observer(epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        if metrics is not None:
            epochs.append(metrics)

    def checkpoint_saved() -> None:
        saved[0] += 1

    context = FitContext(
        spec=spec(exports=["onnx", "torchscript"]), frame=sentiment_frame(200), device="cpu",
        workdir=root / "work", observer=observer, checkpoint_dir=root / "checkpoints",
        checkpoint_saved=checkpoint_saved, resume_dir=None, tensorboard_dir=root / "tensorboard",
        plan=planned.append,
    )
    for folder in (context.workdir, context.checkpoint_dir, context.tensorboard_dir):
        folder.mkdir(parents=True)
    outcome = torch_job.fit(context)
    return Run(context=context, outcome=outcome, epochs=epochs, checkpoints=saved[0], planned=planned)


@pytest.fixture(scope="module")
def fresh(frozen_run: Run) -> tuple[text.TextData, text.PretrainedTextClassifier]:
    """The job's data again, and a model built for it as training started (pretrained encoder, new head)."""
    data = text.prepare_text_data(frozen_run.context.frame, frozen_run.context.spec,
                                  workdir=frozen_run.context.workdir / "again")
    return data, text.build_text_model(data, frozen_run.context.spec)


def test_prepare_tokenizes_one_text_column_into_padded_ids(frozen_run, fresh):
    data, _ = fresh
    workdir = frozen_run.context.workdir / "again"
    assert isinstance(data, engine.TabularData)
    assert data.features == ["review"] and data.target == "sentiment"
    assert data.classes == ["negative", "positive"]
    assert data.x_train.dtype == np.int64 and data.x_val.dtype == np.int64
    assert data.x_train.shape == (160, MAX_LENGTH) and data.x_val.shape == (40, MAX_LENGTH)
    assert data.y_train.dtype == np.int64
    assert np.bincount(data.y_val).tolist() == [20, 20]  # stratified
    assert data.pad_token_id == 0
    assert (data.x_train[:, 0] == 101).all()  # [CLS] first
    assert (data.x_train == data.pad_token_id).any()  # short sentences are padded

    # The saved tokenizer is the one a client needs: the same ids as training, padding included.
    from transformers import AutoTokenizer

    saved = sorted(p.name for p, folder in data.artifacts if folder == "tokenizer")
    assert saved == sorted(text.TOKENIZER_FILES)
    assert all(p.is_file() and p.parent == workdir / "tokenizer" for p, _ in data.artifacts)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"), local_files_only=True)
    ids = tokenizer(frozen_run.context.frame["review"].tolist(), padding="max_length", truncation=True)
    trained_on = np.vstack([data.x_train, data.x_val]).tolist()
    assert {tuple(row) for row in ids["input_ids"]} == {tuple(row) for row in trained_on}
    long = tokenizer(["word " * 100], padding="max_length", truncation=True)["input_ids"][0]
    assert len(long) == MAX_LENGTH and long[-1] == 102  # truncated to max_length, [SEP] kept


def test_frozen_encoder_fine_tunes_to_high_accuracy_and_keeps_its_weights(frozen_run, fresh):
    outcome = frozen_run.outcome
    assert outcome.metrics["val_accuracy"] >= 0.9, outcome.history
    assert len(outcome.history) == len(frozen_run.epochs) == frozen_run.checkpoints == 2
    assert frozen_run.planned == [2 * 10]  # 160 rows in batches of 16, 2 epochs
    assert outcome.features == ["review"] and (outcome.n_train, outcome.n_val) == (160, 40)
    assert outcome.card["architecture"] == "PretrainedTextClassifier"
    uploads = {(p.name, folder) for p, folder in outcome.artifacts}
    assert uploads == {(name, "tokenizer") for name in text.TOKENIZER_FILES}

    _, model = fresh
    assert not any(p.requires_grad for p in model.encoder.parameters())
    original = model.state_dict()
    trained = outcome.state_dict
    assert trained is not None and original.keys() == trained.keys()
    encoder = [k for k in original if k.startswith("encoder.")]
    assert len(encoder) > 90 and all(torch.equal(original[k], trained[k]) for k in encoder)
    assert not torch.equal(original["head.weight"], trained["head.weight"])


def test_exports_take_input_ids_and_match_pytorch(frozen_run, fresh):
    data, model = fresh
    model.load_state_dict(frozen_run.outcome.state_dict)
    model.eval()
    by_format = {e.format: e for e in frozen_run.outcome.exports}
    assert set(by_format) == {ExportFormat.ONNX, ExportFormat.TORCHSCRIPT}
    expected_input = {"name": "input_ids", "shape": [None, MAX_LENGTH], "dtype": "int64"}
    for done in by_format.values():
        assert done.max_abs_diff <= 1e-4
        assert done.signature["inputs"] == [expected_input]
        assert done.signature["classes"] == ["negative", "positive"]

    # As serving would run it: ONNX Runtime alone, another batch size, one row of padding only.
    session = ort.InferenceSession(str(by_format[ExportFormat.ONNX].path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input_ids", "tensor(int64)")]
    rows = np.vstack([data.x_val[:4], np.zeros((1, MAX_LENGTH), dtype=np.int64)])
    (probabilities,) = session.run(None, {"input_ids": rows})
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(rows)), dim=1).numpy()
    assert probabilities.shape == (5, 2) and np.isfinite(probabilities).all()
    assert float(np.abs(probabilities - expected).max()) <= 1e-4
    assert (probabilities[:4].argmax(axis=1) == data.y_val[:4]).all()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: still what serving uses
        scripted = torch.jit.load(str(by_format[ExportFormat.TORCHSCRIPT].path))
    with torch.no_grad():
        assert float((scripted(torch.from_numpy(rows)) - torch.from_numpy(expected)).abs().max()) <= 1e-4


def test_unfrozen_encoder_is_fine_tuned(tmp_path):
    job = spec(model={"type": "pretrained_text", "max_length": 16, "freeze_encoder": False},
               training__epochs=2, training__learning_rate=1e-4)
    data = text.prepare_text_data(sentiment_frame(100, seed=1), job, workdir=tmp_path)
    result = engine.train(data, job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.9, result.history
    original = text.load_encoder(text.checkpoint_path("all-MiniLM-L6-v2")).state_dict()
    trained = result.model.encoder.state_dict()
    changed = [k for k in original if not torch.equal(original[k], trained[k])]
    assert any(k.startswith("encoder.layer.0.") for k in changed)
    assert any(k.startswith("encoder.layer.5.") for k in changed)


@pytest.mark.parametrize(
    ("frame", "changes", "message"),
    [
        (pd.DataFrame({"review": [1.0, 2.0] * 10, "sentiment": ["a", "b"] * 10}), {}, "must hold text"),
        (pd.DataFrame({"review": ["good", 3] * 10, "sentiment": ["a", "b"] * 10}), {}, "must hold text"),
        (pd.DataFrame({"review": ["good", None] * 10, "sentiment": ["a", "b"] * 10}), {}, "missing values"),
        (pd.DataFrame({"title": ["x"] * 20, "review": ["good"] * 20, "sentiment": ["a", "b"] * 10}), {},
         "exactly one text column"),
        (pd.DataFrame({"title": ["x"] * 20, "review": ["good"] * 20, "sentiment": ["a", "b"] * 10}),
         {"data__features": ["title", "review"]}, "exactly one text column"),
        (pd.DataFrame({"review": ["good"] * 20, "sentiment": ["a"] * 20}), {}, "classification needs two"),
        (pd.DataFrame({"review": ["good"] * 20, "sentiment": ["a", "b"] * 10}),
         {"data__features": ["text"]}, "no column 'text'"),
    ],
)
def test_unusable_columns_are_invalid_input(frame, changes, message, tmp_path):
    with pytest.raises(InvalidInput, match=message):
        text.prepare_text_data(frame, spec(**changes), workdir=tmp_path)


def test_features_naming_the_one_text_column_among_others(tmp_path):
    frame = sentiment_frame(40).assign(stars=3)
    with pytest.raises(InvalidInput, match="exactly one text column"):
        text.prepare_text_data(frame, spec(), workdir=tmp_path)
    data = text.prepare_text_data(frame, spec(data__features=["review"]), workdir=tmp_path)
    assert data.features == ["review"] and data.x_train.shape[1] == MAX_LENGTH

