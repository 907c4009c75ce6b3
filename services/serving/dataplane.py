"""Answering predictions: check the rows against the served model, run it, log the exchange."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.serving.metrics import ServingMetrics
from services.serving.models import LoadedModels, ModelState, ServedModel
from services.serving.prediction_log import PredictionLog
from services.serving.runtimes.onnx import OnnxModel
from services.serving.schemas import ModelStatusPublic, PredictResponse
from services.serving.settings import ServingSettings
from shipyard_common.db import utcnow
from shipyard_common.errors import NotFound, ShipyardError, UpstreamError, ValidationFailed
from shipyard_common.lineage import PRODUCTION

_NUMBER_TYPES = (int, float)


@dataclass
class DataPlane:
    settings: ServingSettings
    models: LoadedModels
    prediction_log: PredictionLog
    metrics: ServingMetrics


def parse_rows(inputs: Any, *, runtime: OnnxModel, max_rows: int) -> np.ndarray:
    """``inputs`` as the array ``runtime`` takes, or a 422 that says what is wrong with it."""
    if not isinstance(inputs, list):
        raise ValidationFailed(
            f"inputs must be a list of rows (a list of lists of numbers), not {type(inputs).__name__}"
        )
    if not inputs:
        raise ValidationFailed("inputs is empty: send at least one row")
    if len(inputs) > max_rows:
        raise ValidationFailed(f"inputs has {len(inputs)} rows; at most {max_rows} are accepted per request")
    if runtime.batch_size is not None and len(inputs) != runtime.batch_size:
        raise ValidationFailed(
            f"inputs has {len(inputs)} rows; this model takes exactly {runtime.batch_size} per request"
        )
    expected = runtime.n_features
    for index, row in enumerate(inputs):
        if not isinstance(row, list):
            hint = "; wrap a single row in a list: [[...]]" if type(row) in _NUMBER_TYPES else ""
            raise ValidationFailed(
                f"row {index} is {type(row).__name__}, not a list of {expected} numbers{hint}"
            )
        if len(row) != expected:
            raise ValidationFailed(f"row {index} has length {len(row)}; the model takes {expected} features")
        # bool is an int to Python and a string is a number to numpy; neither is a feature value.
        for column, value in enumerate(row):
            if type(value) not in _NUMBER_TYPES:
                raise ValidationFailed(
                    f"row {index}, feature {column} is {type(value).__name__} {value!r}; features are numbers"
                )
            if type(value) is float and not math.isfinite(value):
                raise ValidationFailed(f"row {index}, feature {column} is {value}; features must be finite")
    try:
        # Overflow to inf is reported below, with the row and feature, rather than warned about.
        with np.errstate(over="ignore"):
            rows = np.asarray(inputs, dtype=runtime.dtype)
    except OverflowError as exc:  # an integer beyond any float
        raise ValidationFailed(f"inputs hold a number too large for the model: {exc}") from exc
    if not np.isfinite(rows).all():
        row, column = (int(i) for i in np.argwhere(~np.isfinite(rows))[0])
        raise ValidationFailed(
            f"row {row}, feature {column} is {inputs[row][column]!r}, beyond the model's "
            f"{np.dtype(runtime.dtype).name} range"
        )
    return rows


def predict(
    *, dataplane: DataPlane, name: str, inputs: Any, request_id: str | None = None
) -> PredictResponse:
    started = time.perf_counter()
    metrics = dataplane.metrics
    try:
        served: ServedModel = dataplane.models.served(name)
    except ShipyardError as exc:
        # Only names serving knows become label values: arbitrary names would grow the metric forever.
        known = dataplane.models.state(name) is not None
        metrics.prediction_errors.labels(name if known else "(unknown)", exc.code).inc()
        raise
    try:
        rows = parse_rows(inputs, runtime=served.runtime, max_rows=dataplane.settings.max_batch_rows)
    except ValidationFailed:
        metrics.prediction_errors.labels(name, "invalid_input").inc()
        raise
    try:
        outputs = served.runtime.predict(rows).tolist()
    except Exception as exc:  # rows passed the checks, so this is the model's own failure
        metrics.prediction_errors.labels(name, "runtime_error").inc()
        raise UpstreamError(f"model {name!r} version {served.version} failed on this input: {exc}") from exc
    latency_ms = (time.perf_counter() - started) * 1000
    dataplane.prediction_log.append(
        {
            "request_id": request_id or uuid.uuid4().hex,
            "model": name,
            "version": served.version,
            "role": PRODUCTION,
            "inputs": inputs,
            "outputs": outputs,
            "latency_ms": latency_ms,
            # When it was answered, not when the writer got to it.
            "created_at": utcnow(),
        }
    )
    metrics.predictions.labels(name, served.version).inc()
    metrics.prediction_rows.labels(name, served.version).inc(len(rows))
    metrics.prediction_latency.labels(name).observe(latency_ms / 1000)
    return PredictResponse(model=name, model_version=served.version, outputs=outputs)


def _status_public(state: ModelState) -> ModelStatusPublic:
    served = state.served
    runtime = served.runtime if served else None
    return ModelStatusPublic(
        name=state.name,
        version=served.version if served else None,
        status=state.status,
        target_version=state.target_version,
        error=state.error,
        failed_version=state.failed_version,
        loaded_at=served.loaded_at if served else None,
        input_name=runtime.input_name if runtime else None,
        output_name=runtime.output_name if runtime else None,
        n_features=runtime.n_features if runtime else None,
    )


def list_models(*, dataplane: DataPlane) -> list[ModelStatusPublic]:
    return [_status_public(state) for state in dataplane.models.states()]


def get_model(*, dataplane: DataPlane, name: str) -> ModelStatusPublic:
    state = dataplane.models.state(name)
    if state is None:
        raise NotFound(
            f"model {name!r} is not served: no registered model of that name has a '{PRODUCTION}' alias"
        )
    return _status_public(state)
