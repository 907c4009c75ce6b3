"""Ground truth: labels joined to logged predictions, live metrics per version and window.

``POST /feedback`` only stores labels (:func:`store_labels`). The loop's step,
:func:`score_feedback`, does the rest, each pass:

1. *join*: each label not joined yet looks for its request in the prediction log. Found, it is
   checked against the answering version (a class it knows, a row the request has) and joined
   (``prediction_id``; ``error`` says why one cannot be scored). Every window that holds one of the
   request's predictions (production or canary, and a shadow's: a label counts for both versions)
   is marked for re-scoring by clearing its ``performance_at``. A request not logged yet is
   looked for again next pass, for ``PENDING_TTL``; then the label is kept as unmatched.
2. *score*: each marked window (and each newly closed one, which starts unmarked) is scored on
   all joined labels of its predictions, so late labels change a closed window's metrics.
3. *gauges*: each version's live gauges show its newest window with labels.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client import Gauge
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.monitor.context import Monitor
from services.monitor.feedback import scoring
from services.monitor.feedback.schemas import (
    FeedbackAccepted,
    FeedbackItem,
    FeedbackSummary,
    LiveMetricsPublic,
    RejectedLabelPublic,
    VersionLivePublic,
    WindowLivePublic,
)
from services.monitor.metrics import MonitorMetrics
from services.monitor.tables import FeedbackRecord, WindowRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Conflict, ValidationFailed
from shipyard_common.lineage import SHADOW, TAG_SIGNATURE, TAG_TASK
from shipyard_common.records import PredictionRecord

log = logging.getLogger("shipyard.monitor.feedback")

# Keys per IN (…) query: well below SQLite's and PostgreSQL's parameter limits.
CHUNK = 500
# Windows scored per pass at most; the rest wait for the next passes (they stay marked).
SCORE_BATCH = 200
# How long a label waits for its request to appear in the prediction log.
PENDING_TTL = timedelta(days=7)
RECENT_REJECTED = 10
# Versions per model whose live gauges are kept: those labelled most recently.
LIVE_VERSIONS = 5

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- POST /feedback: store only -------------------------------------------------------------------


def store_labels(*, database: Database, items: list[FeedbackItem], created_by: str) -> FeedbackAccepted:
    """Store ``items``; a different label for a row already labelled replaces it (last write wins)."""
    refuse_repeats(items=items)
    try:
        return _store(database=database, items=items, created_by=created_by)
    except IntegrityError:
        pass  # another call labelled one of these rows meanwhile; this attempt sees its row
    try:
        return _store(database=database, items=items, created_by=created_by)
    except IntegrityError as exc:
        raise Conflict("other calls are labelling the same rows right now; send the labels again") from exc


def refuse_repeats(*, items: list[FeedbackItem]) -> None:
    seen: dict[tuple[str, int], int] = {}
    for index, item in enumerate(items):
        first = seen.setdefault((item.request_id, item.row), index)
        if first != index:
            raise ValidationFailed(
                f"labels {first} and {index} both label row {item.row} of request {item.request_id!r}; "
                "send one label per row"
            )


def _store(*, database: Database, items: list[FeedbackItem], created_by: str) -> FeedbackAccepted:
    outcomes: Counter[str] = Counter()
    matched = 0
    with database.session() as session:
        for chunk in chunks(items):
            ids = {item.request_id for item in chunk}
            existing = {(r.request_id, r.row): r for r in session.scalars(
                select(FeedbackRecord).where(FeedbackRecord.request_id.in_(ids)))}
            for item in chunk:
                outcomes[_put(session, existing.get((item.request_id, item.row)), item, created_by)] += 1
            logged = set(session.scalars(
                select(PredictionRecord.request_id).where(PredictionRecord.request_id.in_(ids)).distinct()))
            matched += sum(1 for item in chunk if item.request_id in logged)
    return FeedbackAccepted(received=len(items), created=outcomes["created"], replaced=outcomes["replaced"],
                            unchanged=outcomes["unchanged"], matched=matched, pending=len(items) - matched)


def _put(session: Session, found: FeedbackRecord | None, item: FeedbackItem, created_by: str) -> str:
    if found is None:
        session.add(FeedbackRecord(request_id=item.request_id, row=item.row, label=item.label,
                                   created_by=created_by, created_at=utcnow()))
        return "created"
    if type(found.label) is type(item.label) and found.label == item.label:
        return "unchanged"
    # Joined again by the loop, which re-scores the windows the old label counted in.
    found.label, found.created_by, found.created_at = item.label, created_by, utcnow()
    found.prediction_id = found.model = found.version = found.error = None
    return "replaced"


# -- the loop's step ------------------------------------------------------------------------------


class TargetUnavailable(Exception):
    """MLflow cannot say what a version predicts now; its labels and windows wait for the next pass."""


class Targets:
    """Versions' targets from their MLflow tags, read once per pass."""

    def __init__(self, mlflow: MlflowClient) -> None:
        self._mlflow = mlflow
        self._found: dict[tuple[str, str], scoring.Target | Exception] = {}

    def get(self, model: str, version: str) -> scoring.Target:
        key = (model, version)
        if key not in self._found:
            try:
                self._found[key] = read_target(mlflow=self._mlflow, model=model, version=version)
            except TargetUnavailable as exc:
                self._found[key] = exc
        found = self._found[key]
        if isinstance(found, Exception):
            raise found
        return found


def read_target(*, mlflow: MlflowClient, model: str, version: str) -> scoring.Target:
    try:
        tags: dict[str, str] = dict(mlflow.get_model_version(model, version).tags or {})
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # deleted: its answers still say what it was
            return scoring.Target()
        raise TargetUnavailable(f"MLflow did not answer for {model} v{version}: {exc.message}") from exc
    except Exception as exc:  # connection errors surface unwrapped from the client
        raise TargetUnavailable(f"MLflow cannot be reached: {exc}") from exc
    return scoring.Target(task=tags.get(TAG_TASK), classes=signature_classes(tags.get(TAG_SIGNATURE)))


def signature_classes(raw: str | None) -> tuple[Any, ...] | None:
    import json

    try:
        classes = json.loads(raw).get("classes") if raw else None
    except (ValueError, AttributeError):
        return None
    return tuple(classes) if isinstance(classes, list) and classes else None


def score_feedback(*, monitor: Monitor) -> int:
    """Join new labels to their predictions and re-score the windows they fall in; windows scored."""
    targets = Targets(monitor.mlflow)
    join_labels(monitor=monitor, targets=targets)
    scored = score_windows(monitor=monitor, targets=targets)
    update_gauges(database=monitor.database, metrics=monitor.metrics)
    return scored


@dataclass(frozen=True)
class Logged:
    id: int
    request_id: str
    model: str
    version: str
    role: str
    outputs: Any


def join_labels(*, monitor: Monitor, targets: Targets) -> int:
    """Join every label whose request is logged now; how many were joined."""
    after, joined = 0, 0
    while not monitor.stop.is_set():
        with monitor.database.session() as session:
            labels = session.scalars(
                select(FeedbackRecord)
                .where(FeedbackRecord.prediction_id.is_(None), FeedbackRecord.error.is_(None),
                       FeedbackRecord.id > after)
                .order_by(FeedbackRecord.id).limit(CHUNK)
            ).all()
            if not labels:
                break
            after = labels[-1].id
            joined += _join_chunk(session, labels=labels, targets=targets, metrics=monitor.metrics)
    return joined


def _join_chunk(
    session: Session, *, labels: Sequence[FeedbackRecord], targets: Targets, metrics: MonitorMetrics
) -> int:
    logged = logged_requests(session, request_ids={label.request_id for label in labels})
    expired = utcnow() - PENDING_TTL
    touched: set[tuple[str, str, int]] = set()
    joined = 0
    for label in labels:
        found = logged.get(label.request_id)
        if not found:
            if label.created_at < expired and _settle(session, label, error=unmatched_error()):
                metrics.feedback.labels("", "false").inc()
            continue
        primary = min(found, key=lambda p: (p.role == SHADOW, p.id))
        try:
            error = check_label(label=label, primary=primary, targets=targets)
        except TargetUnavailable as exc:
            log.info("label %s waits: %s", label.id, exc)
            continue
        if _settle(session, label, error=error, primary=primary):
            joined += 1
            metrics.feedback.labels(primary.model, "false" if error else "true").inc()
            touched.update((p.model, p.version, p.id) for p in found)
    mark_windows(session, touched=touched)
    return joined


def unmatched_error() -> str:
    days = PENDING_TTL.days
    return f"no prediction with this request id was logged within {days} days of the label"


def logged_requests(session: Session, *, request_ids: set[str]) -> dict[str, list[Logged]]:
    statement = select(PredictionRecord.id, PredictionRecord.request_id, PredictionRecord.model,
                       PredictionRecord.version, PredictionRecord.role, PredictionRecord.outputs
                       ).where(PredictionRecord.request_id.in_(request_ids))
    found: dict[str, list[Logged]] = defaultdict(list)
    for row in session.execute(statement):
        found[row.request_id].append(Logged(*row))
    return found


def check_label(*, label: FeedbackRecord, primary: Logged, targets: Targets) -> str | None:
    """Why ``label`` cannot be scored against ``primary``'s answer, or None."""
    try:
        answer = scoring.answer_of(primary.outputs, label.row)
        scoring.pair(targets.get(primary.model, primary.version), answer, label.label)
    except scoring.Unscorable as exc:
        return f"{primary.model} v{primary.version}: {exc}"
    return None


def _settle(
    session: Session, label: FeedbackRecord, *, error: str | None, primary: Logged | None = None
) -> bool:
    """Record ``label``'s join, unless a POST replaced it since it was read (it is joined again then)."""
    values: dict[str, Any] = {"error": error}
    if primary is not None:
        values.update(prediction_id=primary.id, model=primary.model, version=primary.version)
    result = session.execute(
        update(FeedbackRecord)
        .where(FeedbackRecord.id == label.id, FeedbackRecord.created_at == label.created_at,
               FeedbackRecord.prediction_id.is_(None))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def mark_windows(session: Session, *, touched: Iterable[tuple[str, str, int]]) -> None:
    """Clear ``performance_at`` of every window that holds one of the ``touched`` predictions."""
    by_version: dict[tuple[str, str], list[int]] = defaultdict(list)
    for model, version, prediction_id in touched:
        by_version[(model, version)].append(prediction_id)
    for (model, version), ids in by_version.items():
        windows = session.execute(
            select(WindowRecord.id, WindowRecord.first_prediction_id, WindowRecord.last_prediction_id)
            .where(WindowRecord.model == model, WindowRecord.version == version,
                   WindowRecord.first_prediction_id <= max(ids), WindowRecord.last_prediction_id >= min(ids))
        ).all()
        marked = [w.id for w in windows if any(int(w.first_prediction_id) <= i <= int(w.last_prediction_id)
                                               for i in ids)]
        if marked:
            session.execute(update(WindowRecord).where(WindowRecord.id.in_(marked)).values(performance_at=None)
                            .execution_options(synchronize_session=False))


def score_windows(*, monitor: Monitor, targets: Targets) -> int:
    """Score every window marked for it (at most ``SCORE_BATCH`` a pass); how many were scored."""
    with monitor.database.session() as session:
        due = session.scalars(select(WindowRecord).where(WindowRecord.performance_at.is_(None))
                              .order_by(WindowRecord.id).limit(SCORE_BATCH)).all()
    scored = 0
    for window in due:
        if monitor.stop.is_set():
            break
        try:
            with monitor.database.session() as session:
                scores = score_window(session, window=window, targets=targets)
                session.execute(update(WindowRecord).where(WindowRecord.id == window.id).values(
                    labelled=scores.labelled, accuracy=scores.accuracy, f1=scores.f1, mae=scores.mae,
                    rmse=scores.rmse, confusion=scores.confusion, performance_at=utcnow(),
                ).execution_options(synchronize_session=False))
            scored += 1
        except TargetUnavailable as exc:
            log.info("window %s waits: %s", window.id, exc)
    return scored


def score_window(session: Session, *, window: WindowRecord, targets: Targets) -> scoring.Scores:
    """The live metrics of ``window`` from every joined label of its predictions."""
    if window.first_prediction_id is None or window.last_prediction_id is None:
        return scoring.Scores()
    statement = (
        select(PredictionRecord.outputs, FeedbackRecord.row, FeedbackRecord.label)
        .join(FeedbackRecord, FeedbackRecord.request_id == PredictionRecord.request_id)
        .where(PredictionRecord.model == window.model, PredictionRecord.version == window.version,
               PredictionRecord.id.between(window.first_prediction_id, window.last_prediction_id),
               FeedbackRecord.prediction_id.is_not(None))
    )
    rows = session.execute(statement).all()
    if not rows:
        return scoring.Scores()
    target = targets.get(window.model, window.version)
    by_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for outputs, row, label in rows:
        try:
            task, true, predicted = scoring.pair(target, scoring.answer_of(outputs, row), label)
        except scoring.Unscorable:
            continue  # recorded on the label when it was joined
        by_task[task].append((true, predicted))
    if not by_task:
        return scoring.Scores()
    task = max(by_task, key=lambda name: len(by_task[name]))
    return scoring.score(task, by_task[task])


def update_gauges(*, database: Database, metrics: MonitorMetrics) -> None:
    """Each version's live gauges from its newest window with labels.

    Per model, only the ``LIVE_VERSIONS`` versions labelled most recently keep series: old versions'
    are removed, so that the series stay bounded however many versions a model had.
    """
    newest = (select(func.max(WindowRecord.id)).where(WindowRecord.labelled > 0)
              .group_by(WindowRecord.model, WindowRecord.version))
    with database.session() as session:
        windows = session.scalars(select(WindowRecord).where(WindowRecord.id.in_(newest))
                                  .order_by(WindowRecord.id.desc())).all()
    kept: Counter[str] = Counter()
    for window in windows:
        kept[window.model] += 1
        if kept[window.model] > LIVE_VERSIONS:
            remove_live_gauges(metrics=metrics, model=window.model, version=window.version)
        else:
            set_live_gauges(metrics=metrics, window=window)


def live_gauges(metrics: MonitorMetrics) -> tuple[Gauge, ...]:
    return (metrics.live_labelled, metrics.live_accuracy, metrics.live_f1, metrics.live_mae,
            metrics.live_rmse)


def set_live_gauges(*, metrics: MonitorMetrics, window: WindowRecord) -> None:
    values = (window.labelled, window.accuracy, window.f1, window.mae, window.rmse)
    for gauge, value in zip(live_gauges(metrics), values, strict=True):
        if value is not None:
            gauge.labels(window.model, window.version).set(value)


def remove_live_gauges(*, metrics: MonitorMetrics, model: str, version: str) -> None:
    for gauge in live_gauges(metrics):
        with contextlib.suppress(KeyError):  # never set, or already removed
            gauge.remove(model, version)


# -- GET /feedback/{model} ------------------------------------------------------------------------


def summarize(*, database: Database, model: str, windows: int) -> FeedbackSummary:
    """Live metrics of each version of ``model`` that has labels: overall, newest window, per window."""
    with database.session() as session:
        labelled = session.scalars(
            select(WindowRecord).where(WindowRecord.model == model, WindowRecord.labelled > 0)
            .order_by(WindowRecord.id.desc())).all()
        joined, rejected = session.execute(
            select(func.count(FeedbackRecord.id), func.count(FeedbackRecord.error))
            .where(FeedbackRecord.model == model)).one()
        recent = session.scalars(
            select(FeedbackRecord).where(FeedbackRecord.model == model, FeedbackRecord.error.is_not(None))
            .order_by(FeedbackRecord.id.desc()).limit(RECENT_REJECTED)).all()
    by_version: dict[str, list[WindowRecord]] = defaultdict(list)
    for window in labelled:
        by_version[window.version].append(window)
    versions = [version_live(version=version, windows=found, limit=windows)
                for version, found in by_version.items()]
    versions.sort(key=newest_version_first)
    return FeedbackSummary(
        model=model, joined=int(joined or 0), rejected=int(rejected or 0), versions=versions,
        recent_rejected=[rejected_label(r) for r in recent],
    )


def newest_version_first(live: VersionLivePublic) -> tuple[bool, int, str]:
    number = live.version.isdigit()
    return (not number, -int(live.version) if number else 0, live.version)


def rejected_label(label: FeedbackRecord) -> RejectedLabelPublic:
    return RejectedLabelPublic(request_id=label.request_id, row=label.row, label=label.label,
                               version=label.version, error=label.error or "", created_at=label.created_at)


def version_live(*, version: str, windows: list[WindowRecord], limit: int) -> VersionLivePublic:
    """``windows``: the version's windows with labels, newest first."""
    overall = scoring.combine(stored_scores(w) for w in windows)
    public = [window_live(w) for w in windows[:limit]]
    return VersionLivePublic(
        version=version, task=scoring.CLASSIFICATION if overall.accuracy is not None else scoring.REGRESSION,
        overall=LiveMetricsPublic(labelled=overall.labelled, accuracy=overall.accuracy, f1=overall.f1,
                                  mae=overall.mae, rmse=overall.rmse),
        latest=public[0] if public else window_live(windows[0]), windows=public,
    )


def stored_scores(window: WindowRecord) -> scoring.Scores:
    return scoring.Scores(labelled=window.labelled, accuracy=window.accuracy, f1=window.f1, mae=window.mae,
                          rmse=window.rmse, confusion=window.confusion)


def window_live(window: WindowRecord) -> WindowLivePublic:
    return WindowLivePublic(
        window_id=window.id, started_at=window.started_at, ended_at=window.ended_at, rows=window.rows,
        labelled=window.labelled, accuracy=window.accuracy, f1=window.f1, mae=window.mae, rmse=window.rmse,
        performance_at=window.performance_at,
    )
