"""Every engine's version records its class labels (in output order) and feature names for serving.

Keras and Transformers (a text classifier, whose labels are its id2label) trained in process on
tables whose classes are written as names; the version's folder is laid out as the worker lays it
out (:func:`model_card.write_model_folder`) and opened with serving's own loader, whose answers carry
those labels. PyTorch through the worker and every protocol: tests/services/serving/test_labels.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine

from services.serving.runtimes.loader import load_runtime
from services.serving.settings import ServingSettings
from services.trainer.engines import engine, keras_job, model_card, text, torch_job
from services.trainer.engines.types import FitContext, FitOutcome
from services.trainer.jobs.schemas import JobCreate
from tests.services.trainer.sentiment import sentiment_frame
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"


def context(spec: JobCreate, frame: pd.DataFrame, workdir: Path) -> FitContext:
    for folder in ("checkpoints", "tensorboard"):
        (workdir / folder).mkdir(parents=True)
    return FitContext(
        spec=spec, frame=frame, device="cpu", workdir=workdir, observer=lambda *_: None,
        checkpoint_dir=workdir / "checkpoints", checkpoint_saved=lambda: None, resume_dir=None,
        tensorboard_dir=workdir / "tensorboard", plan=lambda _: None,
    )


def served_labels(outcome: FitOutcome, spec: JobCreate, folder: Path) -> tuple[dict[str, Any], Any]:
    """The version's signature.json, and serving's loaded runtime of it (to be closed by the caller)."""
    model_card.write_model_folder(outcome=outcome, spec=spec, lineage={}, folder=folder / "model")
    signature = json.loads((folder / "model" / "signature.json").read_text())
    loaded = load_runtime(folder, name="labels", version="1", tags={}, settings=ServingSettings())
    return signature, loaded


def wine_with_names() -> pd.DataFrame:
    wine = load_wine(as_frame=True)
    frame = wine.frame.copy()
    frame["target"] = np.asarray(["barolo", "grignolino", "barbera"])[wine.target]
    return frame


def test_keras_records_its_labels_and_features_and_serving_answers_with_them(tmp_path: Path):
    frame = wine_with_names()
    spec = JobCreate.model_validate(job_spec(
        rev=REV, model_name="wine", framework="keras", dataset="wine", model={"type": "mlp", "hidden": [32]},
        training__epochs=8, training__batch_size=16, training__learning_rate=0.01,
    ))
    outcome = keras_job.fit(context(spec, frame, tmp_path / "work"))
    signature, loaded = served_labels(outcome, spec, tmp_path / "version")
    try:
        # Sorted, as the outputs are: barbera, barolo, grignolino.
        assert signature["labels"] == ["barbera", "barolo", "grignolino"]
        assert signature["features"] == [c for c in frame.columns if c != "target"]
        assert loaded.signature.labels == ("barbera", "barolo", "grignolino")
        data = engine.prepare_data(frame, spec)
        probabilities = loaded.runtime.predict({"input": data.x_val})["probabilities"]
        named = loaded.signature.label_array[probabilities.argmax(axis=1)]
        truth = np.asarray(signature["labels"])[data.y_val]
        assert float(np.mean(named == truth)) >= 0.8
    finally:
        loaded.runtime.close()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_a_text_classifier_records_its_id2label_and_text_column(tmp_path: Path, offline: None):
    frame = sentiment_frame(120)
    spec = JobCreate.model_validate(job_spec(
        rev=REV, model_name="sentiment", framework="transformers", dataset="reviews",
        model={"type": "pretrained_text", "max_length": 32, "freeze_encoder": True},
        data__target="sentiment", training__epochs=2, training__batch_size=16, training__learning_rate=5e-3,
    ))
    outcome = torch_job.fit(context(spec, frame, tmp_path / "work"))
    signature, loaded = served_labels(outcome, spec, tmp_path / "version")
    try:
        # Output i is labels[i]: the classifier's id2label.
        assert signature["labels"] == ["negative", "positive"]
        assert signature["features"] == ["review"]
        assert loaded.signature.labels == ("negative", "positive")
        assert loaded.signature.inputs[0].name == "input_ids"
        # Serving takes raw text through the tokenizer stored with the version: the ids training made.
        texts = [*frame["review"].head(5), "word " * 100]
        tokenizer, _ = text.load_tokenizer(text.checkpoint_path("all-MiniLM-L6-v2"), 32)
        trained_ids = np.array([e.ids for e in tokenizer.encode_batch(texts)], dtype=np.int64)
        assert loaded.text is not None and (loaded.text.input, loaded.text.max_length) == ("input_ids", 32)
        ids, truncated = loaded.text.encode(texts)
        np.testing.assert_array_equal(ids, trained_ids)
        assert truncated == [False] * 5 + [True]
    finally:
        loaded.runtime.close()
