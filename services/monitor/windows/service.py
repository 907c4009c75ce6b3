"""Drift of a model's logged inputs against the dataset revision its production version was trained on."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import select

from services.monitor.windows.drift import DriftResult, compute_drift
from services.monitor.windows.schemas import DriftPublic, DriftSummary, FeatureDriftPublic, ReferencePublic
from services.monitor.settings import MonitorSettings
from services.monitor.windows.references import ReferenceCache
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.errors import Conflict, NotFound, ShipyardError, Unavailable
from shipyard_common.lineage import PRODUCTION, TAG_DATASET, TAG_DATASET_REV, TAG_FEATURES
from shipyard_common.records import PredictionRecord

log = logging.getLogger("shipyard.monitor")

# MLflow answers these when the model, or the alias on it, does not exist.
_MLFLOW_MISSING = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


class DriftGauges:
    """The drift gauges of one app, kept to the current feature set of each model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.feature_score = Gauge(
            "shipyard_feature_drift_score",
            "Evidently drift score of one feature (p-value for K-S, distance for Wasserstein)",
            ["model", "feature"],
            registry=registry,
        )
        self.dataset_drift = Gauge(
            "shipyard_dataset_drift", "1 when Evidently finds dataset drift, else 0", ["model"],
            registry=registry,
        )
        self.drift_share = Gauge(
            "shipyard_drift_share", "Share of features Evidently finds drifted", ["model"], registry=registry
        )
        self.refresh_errors = Counter(
            "shipyard_drift_refresh_errors",
            "Background drift computations that failed unexpectedly",
            ["model"],
            registry=registry,
        )
        self._features: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def update(self, report: DriftPublic) -> None:
        with self._lock:
            current = {feature.name for feature in report.features}
            # A newly promoted version may have other features; drop series nobody updates any more.
            for stale in self._features.get(report.model, set()) - current:
                self.feature_score.remove(report.model, stale)
            self._features[report.model] = current
            for feature in report.features:
                score = feature.score if feature.score is not None else float("nan")
                self.feature_score.labels(report.model, feature.name).set(score)
            self.dataset_drift.labels(report.model).set(1.0 if report.dataset_drift else 0.0)
            self.drift_share.labels(report.model).set(report.drift_share)


@dataclass
class Monitor:
    """What the monitor's functions need; one per app."""

    settings: MonitorSettings
    database: Database
    mlflow: MlflowClient
    references: ReferenceCache
    gauges: DriftGauges
    stop: threading.Event = field(default_factory=threading.Event)
    # The newest verdict per model, for readers that must not pay for a computation (the registry).
    latest: dict[str, DriftSummary] = field(default_factory=dict)


def create_monitor(*, settings: MonitorSettings, database: Database, registry: CollectorRegistry) -> Monitor:
    platform = settings.platform
    repo = DataRepo.from_settings(platform)
    return Monitor(
        settings=settings,
        database=database,
        mlflow=MlflowClient(tracking_uri=platform.mlflow_tracking_uri),
        references=ReferenceCache(repo.read, settings.reference_cache_size),
        gauges=DriftGauges(registry),
    )


@dataclass(frozen=True)
class Lineage:
    version: str
    dataset: str
    rev: str
    features: list[str]


def get_production_lineage(*, monitor: Monitor, model: str) -> Lineage:
    try:
        version = monitor.mlflow.get_model_version_by_alias(model, PRODUCTION)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"model {model!r} is not in the registry") from exc
        if exc.error_code in _MLFLOW_MISSING:
            raise NotFound(
                f"model {model!r} has no '{PRODUCTION}' version yet: promote one to monitor its drift"
            ) from exc
        raise Unavailable(f"the MLflow registry did not answer for model {model!r}: {exc.message}") from exc
    except Exception as exc:  # requests/connection errors surface unwrapped from the client
        raise Unavailable(f"the MLflow registry cannot be reached: {exc}") from exc

    tags: dict[str, str] = dict(version.tags or {})
    missing = [tag for tag in (TAG_DATASET, TAG_DATASET_REV, TAG_FEATURES) if not tags.get(tag)]
    if missing:
        raise Conflict(
            f"version {version.version} of {model!r} lacks the lineage tags {missing}; "
            "drift needs the dataset revision and features it was trained on"
        )
    try:
        features = json.loads(tags[TAG_FEATURES])
    except ValueError as exc:
        raise Conflict(f"tag {TAG_FEATURES} of {model!r} v{version.version} is not JSON: {exc}") from exc
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise Conflict(f"tag {TAG_FEATURES} of {model!r} v{version.version} is not a list of feature names")
    return Lineage(
        version=str(version.version), dataset=tags[TAG_DATASET], rev=tags[TAG_DATASET_REV], features=features
    )


def get_reference(*, monitor: Monitor, lineage: Lineage, model: str) -> pd.DataFrame:
    try:
        frame = monitor.references.get(lineage.dataset, lineage.rev)
    except NotFound as exc:
        # The model exists; a 404 here would read as "no such model".
        raise Conflict(
            f"the reference data of {model!r} v{lineage.version} cannot be read: {exc.message}"
        ) from exc
    absent = [name for name in lineage.features if name not in frame.columns]
    if absent:
        raise Conflict(
            f"dataset {lineage.dataset!r} at {lineage.rev[:12]} lacks features {absent[:5]} "
            f"that {model!r} v{lineage.version} was trained on"
        )
    return frame[lineage.features]


def list_current_rows(*, monitor: Monitor, model: str, width: int, window: int) -> list[list[float]]:
    """The newest ``window`` logged input rows of ``model``, oldest first.

    A logged request holds a batch of rows; rows of another width (a version with other
    features answered them) cannot be compared with this reference and are left out.
    """
    statement = (
        select(PredictionRecord.inputs)
        .where(PredictionRecord.model == model, PredictionRecord.role == PRODUCTION)
        .order_by(PredictionRecord.created_at.desc(), PredictionRecord.id.desc())
        .execution_options(yield_per=500)
    )
    newest_first: list[list[float]] = []
    with monitor.database.session() as session:
        for inputs in session.scalars(statement):
            for row in reversed(_rows(inputs)):
                if len(row) == width:
                    newest_first.append(row)
            if len(newest_first) >= window:
                break
    return list(reversed(newest_first[:window]))


def _rows(inputs: Any) -> list[list[float]]:
    if not isinstance(inputs, list) or not inputs:
        return []
    if not isinstance(inputs[0], list):  # one row logged without its batch brackets
        inputs = [inputs]
    rows = []
    for row in inputs:
        try:
            rows.append([float(value) for value in row])
        except (TypeError, ValueError):
            continue
    return rows


def get_drift(*, monitor: Monitor, model: str, window: int) -> DriftPublic:
    """Drift of the newest ``window`` rows logged for ``model`` against its training data."""
    lineage = get_production_lineage(monitor=monitor, model=model)
    reference = get_reference(monitor=monitor, lineage=lineage, model=model)
    rows = list_current_rows(monitor=monitor, model=model, width=len(lineage.features), window=window)
    needed = monitor.settings.min_rows
    if len(rows) < needed:
        raise Conflict(
            f"model {model!r} has {len(rows)} logged prediction rows; drift needs at least {needed}"
        )
    current = pd.DataFrame(rows, columns=lineage.features)
    result = compute_drift(
        reference=reference, current=current, features=lineage.features,
        drift_share=monitor.settings.drift_share,
    )
    report = to_public(model=model, lineage=lineage, reference_rows=len(reference),
                       current_rows=len(current), result=result)
    monitor.gauges.update(report)
    monitor.latest[model] = DriftSummary(
        model=model, version=report.version, dataset_drift=report.dataset_drift,
        drift_share=report.drift_share, current_rows=report.current_rows, computed_at=datetime.now(UTC),
    )
    return report


def list_latest(*, monitor: Monitor) -> list[DriftSummary]:
    """The newest verdict of every model drift was computed for since this process started."""
    return sorted(monitor.latest.values(), key=lambda summary: summary.model)


def to_public(
    *, model: str, lineage: Lineage, reference_rows: int, current_rows: int, result: DriftResult
) -> DriftPublic:
    return DriftPublic(
        model=model,
        version=lineage.version,
        reference=ReferencePublic(dataset=lineage.dataset, rev=lineage.rev, rows=reference_rows),
        current_rows=current_rows,
        dataset_drift=result.dataset_drift,
        drift_share=result.drift_share,
        features=[
            FeatureDriftPublic(
                name=f.name, score=f.score, method=f.method, threshold=f.threshold, drifted=f.drifted
            )
            for f in result.features
        ],
    )


def list_logged_models(*, monitor: Monitor) -> list[str]:
    statement = select(PredictionRecord.model).where(PredictionRecord.role == PRODUCTION).distinct()
    with monitor.database.session() as session:
        return sorted(session.scalars(statement))


def refresh_all(*, monitor: Monitor) -> int:
    """Recompute drift, and so the gauges, of every logged model that can have it; return how many."""
    refreshed = 0
    for model in list_logged_models(monitor=monitor):
        if monitor.stop.is_set():
            break
        try:
            get_drift(monitor=monitor, model=model, window=monitor.settings.default_window)
            refreshed += 1
        except (NotFound, Conflict) as exc:
            # No production version, or too few rows yet: nothing to report, nothing wrong.
            log.debug("no drift for %s: %s", model, exc.message)
        except ShipyardError as exc:
            monitor.gauges.refresh_errors.labels(model).inc()
            log.warning("drift refresh of %s failed: %s", model, exc.message)
        except Exception:
            monitor.gauges.refresh_errors.labels(model).inc()
            log.exception("drift refresh of %s failed", model)
    return refreshed


class Refresher:
    """Keeps the gauges current between requests, so that Prometheus sees drift nobody asked for."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.thread = threading.Thread(target=self._run, name="drift-refresher", daemon=True)

    def start(self) -> None:
        self.monitor.stop.clear()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.monitor.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while not self.monitor.stop.is_set():
            try:
                refresh_all(monitor=self.monitor)
            except Exception:  # a database outage must not end the thread for good
                log.exception("drift refresh pass failed")
            self.monitor.stop.wait(self.monitor.settings.refresh_interval_s)


def close_due_windows(*, monitor: object) -> int:
    """Close every window that is due and compute its drift and quality; how many closed."""
    return 0
