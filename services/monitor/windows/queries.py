"""What the routes answer: stored windows, drift and reports, read from the database; nothing computed."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.monitor.tables import WindowRecord
from services.monitor.windows.deps import WindowsMonitor
from services.monitor.windows.lineage import read_aliases
from services.monitor.windows.quality import ERROR, OK
from services.monitor.windows.reports import read_snapshot, render_html
from services.monitor.windows.schemas import (
    DriftPublic,
    DriftSummary,
    FeatureDriftPublic,
    PredictionDriftPublic,
    ReferencePublic,
    ReportPage,
    ReportPublic,
    WindowPage,
    WindowPublic,
)
from shipyard_common.errors import NotFound
from shipyard_common.orm import utcnow
from shipyard_common.records import PredictionRecord


def report_url(record: WindowRecord) -> str | None:
    return f"/reports/{quote(record.model, safe='')}/{record.id}" if record.report_path else None


def require_model(session: Session, *, monitor: WindowsMonitor, model: str) -> None:
    """NotFound unless ``model`` has windows, logged predictions, or is in the registry.

    Only a model the monitor has never seen needs MLflow: while it is down, that is a 503 within
    MLflow's client limits (shipyard_common.mlflow_client), never a guess.
    """
    for table in (WindowRecord, PredictionRecord):
        if session.scalar(select(table.id).where(table.model == model).limit(1)) is not None:
            return
    if read_aliases(mlflow=monitor.mlflow, model=model) is None:
        raise NotFound(f"model {model!r} is not in the registry and has no logged predictions")


def _newest(model: str, version: str | None, before: int | None) -> Any:
    statement = select(WindowRecord).where(WindowRecord.model == model)
    if version is not None:
        statement = statement.where(WindowRecord.version == version)
    if before is not None:
        statement = statement.where(WindowRecord.id < before)
    return statement.order_by(WindowRecord.id.desc())


def list_windows(*, monitor: WindowsMonitor, model: str, version: str | None, status: str | None,
                 before: int | None, limit: int) -> WindowPage:
    statement = _newest(model, version, before)
    if status is not None:
        statement = statement.where(WindowRecord.status == status)
    statement = statement.limit(limit + 1)
    with monitor.database.session() as session:
        found = list(session.scalars(statement))
        if not found:
            require_model(session, monitor=monitor, model=model)
    items = [window_public(record) for record in found[:limit]]
    spec = monitor.settings.window_for(model).model_dump(exclude_none=True)
    return WindowPage(model=model, window=spec, items=items,
                      next_before=items[-1].id if len(found) > limit else None)


def window_public(record: WindowRecord) -> WindowPublic:
    fields = {name: getattr(record, name) for name in WindowPublic.model_fields if hasattr(record, name)}
    return WindowPublic.model_validate({**fields, "features": record.features or [],
                                        "quality": record.quality or {}, "report_url": report_url(record)})


def get_drift(*, monitor: WindowsMonitor, model: str, version: str | None) -> DriftPublic:
    """The newest ``ok`` window's drift, with its age and whether it is stale (and why); NotFound,
    saying why, when there is none yet. Read from the database alone: it answers while MLflow is down."""
    with monitor.database.session() as session:
        ok = _newest(model, version, None).where(WindowRecord.status == OK)
        record = session.scalars(ok.limit(1)).first()
        newest = session.scalars(_newest(model, version, None).limit(1)).first()
        if record is None:
            require_model(session, monitor=monitor, model=model)
    if record is None:
        which = f"{model!r}" + (f" v{version}" if version else "")
        seen = (f"its newest window (#{newest.id}) is {newest.status}: {newest.message}" if newest
                else "no window has closed yet")
        raise NotFound(f"no drift computed for {which} yet: {seen}")
    return drift_public(record, stale_reason=stale_reason(monitor, record, newest))


def stale_reason(monitor: WindowsMonitor, record: WindowRecord, newest: WindowRecord | None) -> str | None:
    """Why ``record`` may no longer be the model's drift: the loop's last pass over the model failed
    for want of a component (MLflow, the database), or its newest window could not be computed
    (the reference data unreadable …). None while the loop keeps it up to date."""
    trouble = monitor.windows.trouble(record.model)
    if trouble is not None:
        return f"the monitor cannot bring it up to date: {trouble.reason}"
    if newest is not None and newest.id > record.id and newest.status == ERROR:
        return f"the newest window (#{newest.id}) could not be computed: {newest.message}"
    return None


def age_s(computed_at: datetime) -> float:
    return round(max(0.0, (utcnow() - computed_at).total_seconds()), 3)


def drift_public(record: WindowRecord, *, stale_reason: str | None = None) -> DriftPublic:
    quality = dict(record.quality or {})
    return DriftPublic(
        model=record.model, version=record.version, window_id=record.id, kind=record.kind,
        started_at=record.started_at, ended_at=record.ended_at,
        reference=ReferencePublic(dataset=record.dataset or "", rev=record.dataset_rev or "",
                                  rows=quality.get("reference_rows")),
        current_rows=int(quality.get("checked_rows", record.rows)), dataset_drift=bool(record.dataset_drift),
        drift_share=float(record.drift_share or 0.0), drifted_count=record.drifted_count,
        features=[FeatureDriftPublic.model_validate(f) for f in record.features or []],
        prediction=_prediction(record, quality), quality=quality, report_url=report_url(record),
        computed_at=record.computed_at, age_s=age_s(record.computed_at),
        stale=stale_reason is not None, stale_reason=stale_reason,
    )


def _prediction(record: WindowRecord, quality: dict[str, Any]) -> PredictionDriftPublic | None:
    if record.prediction_drift is None:
        return None
    about = quality.get("prediction_drift") or {}
    return PredictionDriftPublic(drifted=record.prediction_drift, score=record.prediction_drift_score,
                                 method=about.get("method"), threshold=about.get("threshold"),
                                 reference=str(about.get("reference", "training target")))


def list_latest(*, monitor: WindowsMonitor) -> list[DriftSummary]:
    """Per model: the newest ok window, the newest window, and the newest window with labels."""
    newest = select(func.max(WindowRecord.id)).group_by(WindowRecord.model)
    newest_ok = newest.where(WindowRecord.status == OK)
    newest_labelled = newest.where(WindowRecord.labelled > 0)
    with monitor.database.session() as session:
        ids = {name: set(session.scalars(q)) for name, q in
               (("latest", newest), ("ok", newest_ok), ("labelled", newest_labelled))}
        every = set().union(*ids.values())
        rows = {r.id: r for r in session.scalars(select(WindowRecord).where(WindowRecord.id.in_(every)))}
    by_model: dict[str, dict[str, WindowRecord]] = {}
    for name, found in ids.items():
        for window_id in found:
            by_model.setdefault(rows[window_id].model, {})[name] = rows[window_id]
    return [_summary(monitor, model, picked) for model, picked in sorted(by_model.items())]


def _summary(monitor: WindowsMonitor, model: str, picked: dict[str, WindowRecord]) -> DriftSummary:
    ok, latest, labelled = picked.get("ok"), picked["latest"], picked.get("labelled")
    stale = stale_reason(monitor, ok, latest) if ok else None
    return DriftSummary(
        age_s=age_s(ok.computed_at) if ok else None, stale=stale is not None, stale_reason=stale,
        model=model, version=ok.version if ok else None, dataset_drift=ok.dataset_drift if ok else None,
        drift_share=ok.drift_share if ok else None,
        current_rows=int((ok.quality or {}).get("checked_rows", ok.rows)) if ok else None,
        computed_at=ok.computed_at if ok else None, window_id=ok.id if ok else None,
        status=latest.status, latest_window_id=latest.id,
        labelled=labelled.labelled if labelled else None, accuracy=labelled.accuracy if labelled else None,
        f1=labelled.f1 if labelled else None, mae=labelled.mae if labelled else None,
        rmse=labelled.rmse if labelled else None, performance_window_id=labelled.id if labelled else None,
    )


def list_reports(*, monitor: WindowsMonitor, model: str, before: int | None, limit: int) -> ReportPage:
    statement = _newest(model, None, before).where(WindowRecord.report_path.is_not(None)).limit(limit + 1)
    with monitor.database.session() as session:
        found = list(session.scalars(statement))
        if not found:
            require_model(session, monitor=monitor, model=model)
    items = [
        ReportPublic(window_id=r.id, version=r.version, started_at=r.started_at, ended_at=r.ended_at,
                     rows=r.rows, dataset_drift=r.dataset_drift, drift_share=r.drift_share,
                     url=report_url(r) or "")
        for r in found[:limit]
    ]
    following = items[-1].window_id if len(found) > limit else None
    return ReportPage(model=model, items=items, next_before=following)


def get_report(*, monitor: WindowsMonitor, model: str, window_id: int, html: bool) -> str:
    """The report of one window of ``model``: Evidently's HTML, or its snapshot JSON."""
    with monitor.database.session() as session:
        record = session.get(WindowRecord, window_id)
    if record is None or record.model != model:
        raise NotFound(f"model {model!r} has no window {window_id}")
    if not record.report_path:
        why = ("its report was pruned" if record.status == OK
               else f"it is {record.status}: no drift was computed")
        raise NotFound(f"window {window_id} of {model!r} has no report: {why}")
    snapshot = read_snapshot(monitor.settings.report_path, record.report_path)
    return render_html(snapshot) if html else snapshot
