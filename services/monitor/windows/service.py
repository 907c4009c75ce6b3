"""Closing windows: the loop's step that cuts each served version's prediction log into windows and
records, for each, its status, data quality, drift (Evidently) and report.

A request never computes anything; the routes read the rows written here (:mod:`.queries`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from services.monitor.tables import WindowRecord
from services.monitor.windows import cutting, gauges, quality
from services.monitor.windows.compute import Outcome, assess
from services.monitor.windows.cutting import Due, Plan
from services.monitor.windows.deps import WindowsMonitor
from services.monitor.windows.drift import DriftOptions
from services.monitor.windows.frames import read_rows
from services.monitor.windows.lineage import Lineage, read_aliases
from services.monitor.windows.reports import prune_reports, write_report
from shipyard_common.db import utcnow
from shipyard_common.errors import ShipyardError, Unavailable
from shipyard_common.records import PredictionRecord

log = logging.getLogger("shipyard.monitor")


def close_due_windows(*, monitor: WindowsMonitor) -> int:
    """Close every window that is due and compute its drift and quality; how many closed."""
    discover(monitor=monitor)
    by_model: dict[str, list[str]] = defaultdict(list)
    for model, version in sorted(monitor.windows.known):
        by_model[model].append(version)
    closed = 0
    for model, versions in by_model.items():
        if monitor.stop.is_set():
            break
        closed += close_model(monitor=monitor, model=model, versions=versions)
    return closed


def close_model(*, monitor: WindowsMonitor, model: str, versions: list[str]) -> int:
    """Close the due windows of ``model``'s versions; note in the book whether a component was away."""
    trouble: str | None = None
    try:
        aliases = read_aliases(mlflow=monitor.mlflow, model=model)
        served: set[str] | None = set((aliases or {}).values())
    except Unavailable as exc:  # the versions are still closed; which are served is unknown
        served, trouble = None, exc.message
    closed = 0
    for version in versions:
        if monitor.stop.is_set():
            break
        try:
            closed += close_version(monitor=monitor, model=model, version=version, served=served)
        except Exception as exc:  # one version's trouble must not stop the others
            monitor.metrics.window_errors.labels(model).inc()
            log.warning("windows of %s v%s not closed this pass: %s", model, version, exc,
                        exc_info=not isinstance(exc, ShipyardError))
            if isinstance(exc, Unavailable | DBAPIError):
                trouble = trouble or (exc.message if isinstance(exc, Unavailable) else "the database is away")
    monitor.windows.note_pass(model, trouble)
    return closed


def discover(*, monitor: WindowsMonitor) -> None:
    """Add the (model, version) pairs logged since the last pass to the book."""
    book = monitor.windows
    statement = (
        select(PredictionRecord.model, PredictionRecord.version, func.max(PredictionRecord.id))
        .where(PredictionRecord.id > book.scanned_to)
        .group_by(PredictionRecord.model, PredictionRecord.version)
    )
    with monitor.database.session() as session:
        found = session.execute(statement).all()
    with book.lock:
        for model, version, newest in found:
            book.known.add((model, version))
            book.scanned_to = max(book.scanned_to, int(newest))


def close_version(*, monitor: WindowsMonitor, model: str, version: str, served: set[str] | None) -> int:
    """Close the due windows of one version (at most ``max_windows_per_pass``); how many."""
    plan = plan_windows(monitor=monitor, model=model, version=version,
                        served=served is None or version in served)
    for due in plan.due:
        record = close_window(monitor=monitor, model=model, version=version, due=due)
        gauges.record_window(monitor.metrics, record)
    monitor.metrics.pending_rows.labels(model, version).set(plan.pending_rows)
    if not plan.due and not plan.pending_rows and served is not None and version not in served:
        # Nothing left to close and no alias: forget it until it is logged again.
        with monitor.windows.lock:
            monitor.windows.known.discard((model, version))
            monitor.windows.tallies.pop((model, version), None)
        monitor.metrics.forget_windows(model, version)
    return len(plan.due)


def plan_windows(*, monitor: WindowsMonitor, model: str, version: str, served: bool) -> Plan:
    settings = monitor.settings
    spec = settings.window_for(model)
    until = utcnow() - timedelta(seconds=settings.window_grace_s)
    most = settings.max_windows_per_pass
    with monitor.database.session() as session:
        cursor = cutting.read_cursor(session, model=model, version=version)
        if spec.rows is not None:
            return cutting.plan_rows(session, model=model, version=version, after_id=cursor.last_id,
                                     size=spec.rows, until=until, most=most, served=served)
        assert spec.seconds is not None
        tally = monitor.windows.tallies.setdefault((model, version), cutting.Tally(since=until))
        return cutting.plan_time(session, model=model, version=version, cursor=cursor, seconds=spec.seconds,
                                 until=until, served=served, most=most, tally=tally)


def close_window(*, monitor: WindowsMonitor, model: str, version: str, due: Due) -> WindowRecord:
    """Compute and store one window; Unavailable (MLflow or the database away) leaves it for later."""
    outcome, lineage = _outcome(monitor=monitor, model=model, version=version, due=due)
    settings = monitor.settings
    record = _record(model=model, version=version, due=due, outcome=outcome)
    if lineage is not None:
        record.dataset, record.dataset_rev = lineage.dataset, lineage.rev
    with monitor.database.session() as session:
        session.add(record)
        session.flush()
        if outcome.drift is not None:
            record.report_path = write_report(settings.report_path, record.id, outcome.drift.snapshot)
            prune_reports(session, root=settings.report_path, model=model, keep=settings.reports_keep)
    return record


def _outcome(
    *, monitor: WindowsMonitor, model: str, version: str, due: Due
) -> tuple[Outcome, Lineage | None]:
    if not due.rows:
        periods = f" ({due.periods} periods)" if due.periods > 1 else ""
        return Outcome(quality.EMPTY, f"no predictions were logged in this window{periods}"), None
    lineage: Lineage | None = None
    try:
        lineage = monitor.windows.lineage.get(mlflow=monitor.mlflow, model=model, version=version)
        reference = monitor.references.get(lineage.dataset, lineage.rev)
        with monitor.database.session() as session:  # not held while Evidently runs
            found = read_rows(session, model=model, version=version, due=due, features=lineage.features,
                              inputs=lineage.inputs)
        return assess(found=found, lineage=lineage, reference=reference, min_rows=monitor.settings.min_rows,
                      options=drift_options(monitor)), lineage
    except (Unavailable, DBAPIError):  # MLflow or the database away: the window waits for the next pass
        raise
    except ShipyardError as exc:  # no lineage, no reference, a feature the dataset lacks …
        return Outcome(quality.ERROR, exc.message), lineage
    except Exception as exc:  # Evidently failing on this window's data must not stop the next
        log.exception("window of %s v%s failed", model, version)
        return Outcome(quality.ERROR, f"drift could not be computed: {type(exc).__name__}: {exc}"), lineage


def drift_options(monitor: WindowsMonitor) -> DriftOptions:
    s = monitor.settings
    return DriftOptions(drift_share=s.drift_share, num_method=s.num_method, cat_method=s.cat_method,
                        num_threshold=s.num_threshold, cat_threshold=s.cat_threshold)


def _record(*, model: str, version: str, due: Due, outcome: Outcome) -> WindowRecord:
    drift = outcome.drift
    prediction = drift.prediction if drift is not None else None
    return WindowRecord(
        model=model, version=version, kind=due.kind, first_prediction_id=due.first_id,
        last_prediction_id=due.last_id, started_at=due.started_at, ended_at=due.ended_at,
        requests=due.requests, rows=due.rows, status=outcome.status, message=outcome.message,
        dataset_drift=drift.dataset_drift if drift else None,
        drift_share=drift.drift_share if drift else None,
        drifted_count=drift.drifted_count if drift else None,
        prediction_drift=prediction.drifted if prediction else None,
        prediction_drift_score=prediction.score if prediction else None,
        features=[asdict(feature) for feature in outcome.features],
        quality=_with_prediction(outcome), computed_at=utcnow(), labelled=0,
    )


def _with_prediction(outcome: Outcome) -> dict[str, object]:
    found = dict(outcome.quality)
    prediction = outcome.drift.prediction if outcome.drift is not None else None
    if prediction is not None:
        found["prediction_drift"] = {**found.get("prediction_drift", {}), "method": prediction.method,
                                     "threshold": prediction.threshold, "kind": prediction.kind}
    return found
