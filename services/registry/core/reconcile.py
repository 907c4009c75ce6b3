"""Aliases moved outside the registry: MLflow's aliases compared with the audit, each difference
recorded and alerted.

Every alias move the registry makes writes an audit row first (:func:`promotion.apply`). An alias
that names a version no audit row set was moved in MLflow directly: by someone who reached MLflow
with its credentials, or before MLflow ran with authentication. The reconcile reads every model's
aliases (one search per page of models) and the audit's last row per (model, alias); for each
difference it writes an audit row (``moved_outside``: the alias names ``version``, or
``removed_outside``: the alias that named ``version`` is gone), logs a WARNING and counts it in
``shipyard_registry_aliases_moved_outside_total``. ``shipyard_registry_unaudited_aliases`` is 1
for each alias that still names what no registry move set, until the registry moves it again, and 0
for every other alias the audit knows (so an alert on it has a series to watch before it fires:
``ShipyardAliasMovedOutsideRegistry`` in infra/prometheus/rules).

A difference is recorded under the model's lock (:meth:`Registry.locked`), after reading MLflow
and the audit again there: a move in progress commits its audit row only after MLflow's alias has
moved, so outside the lock it looks like a move nobody recorded. Several registry processes may
reconcile at once; the second finds the first one's row and records nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.registry.core.promotion import MOVE_ACTIONS
from services.registry.core.registry import Registry
from services.registry.core.schemas import AuditPublic, ReconcilePublic, UnauditedAlias, UnauditedPublic
from services.registry.core.store import MAX_PAGE
from services.registry.core.tables import AuditRecord
from shipyard_common.errors import NotFound

log = logging.getLogger("shipyard.registry.reconcile")

MOVED_OUTSIDE = "moved_outside"
REMOVED_OUTSIDE = "removed_outside"
OUTSIDE_ACTIONS = (MOVED_OUTSIDE, REMOVED_OUTSIDE)
# The audit rows that say what an alias names: the registry's moves and the changes found outside it.
TRACKED_ACTIONS = (*MOVE_ACTIONS, *OUTSIDE_ACTIONS)
ACTOR = "shipyard-registry (reconcile)"

Key = tuple[str, str]  # (model, alias)


def _left(row: AuditRecord | None) -> str | None:
    """The version an audit row leaves its alias naming (None: removed, or no row)."""
    if row is None or row.action in ("remove", REMOVED_OUTSIDE):
        return None
    return row.version


def _latest(session: Session, actions: Iterable[str], model: str | None = None) -> dict[Key, AuditRecord]:
    """The newest audit row among ``actions`` for each (model, alias), of ``model`` or of all."""
    newest = select(func.max(AuditRecord.id)).where(AuditRecord.action.in_(tuple(actions)))
    if model is not None:
        newest = newest.where(AuditRecord.model == model)
    newest = newest.group_by(AuditRecord.model, AuditRecord.alias)
    rows = session.scalars(select(AuditRecord).where(AuditRecord.id.in_(newest))).all()
    return {(row.model, row.alias): row for row in rows}


@dataclass(frozen=True)
class Difference:
    """MLflow's ``alias`` of ``model`` names ``now`` where the audit's last row left ``recorded``."""

    model: str
    alias: str
    now: str | None
    recorded: str | None

    def row(self) -> AuditRecord:
        """The audit row that records this difference."""
        if self.now is None:
            reason = (f"MLflow's {self.alias} alias, which the audit left naming v{self.recorded}, was "
                      "deleted outside the registry")
        else:
            was = f"v{self.recorded}" if self.recorded is not None else "no version"
            reason = (f"MLflow's {self.alias} alias names v{self.now} where the audit left it naming {was}: "
                      "it was moved outside the registry")
        return AuditRecord(
            model=self.model, alias=self.alias, version=self.now or self.recorded or "",
            previous_version=self.recorded, action=REMOVED_OUTSIDE if self.now is None else MOVED_OUTSIDE,
            actor=ACTOR, reason=reason,
        )


def differences(model: str, aliases: dict[str, str], recorded: dict[str, AuditRecord]) -> list[Difference]:
    """Each alias of ``model`` whose version in MLflow (``aliases``) is not what its last audit row
    (``recorded``, by alias) left: moved, set or deleted without the registry."""
    found = []
    for alias in sorted(set(aliases) | set(recorded)):
        now, was = aliases.get(alias), _left(recorded.get(alias))
        if now != was:
            found.append(Difference(model, alias, now, was))
    return found


def unaudited(
    session: Session, model: str | None = None, seen: dict[Key, AuditRecord] | None = None
) -> list[UnauditedAlias]:
    """The aliases (of ``model``, or of all) that name, as the last reconcile found, a version no
    registry move set: their newest row is one the reconcile wrote, and it differs from what the
    registry's last move left. A registry move of the alias ends it. ``seen``: the newest tracked
    rows, when the caller has read them already."""
    seen = _latest(session, TRACKED_ACTIONS, model) if seen is None else seen
    moved = _latest(session, MOVE_ACTIONS, model)
    found = []
    for key, row in sorted(seen.items()):
        if row.action in OUTSIDE_ACTIONS and _left(row) != _left(moved.get(key)):
            found.append(UnauditedAlias(
                model=row.model, alias=row.alias, version=_left(row), recorded_version=_left(moved.get(key)),
                audit_id=row.id, detected_at=row.at,
            ))
    return found


class ReconcileMetrics:
    """What the reconcile exports: outside changes found, aliases left unaudited, runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.moved = Counter(
            "shipyard_registry_aliases_moved_outside", "Alias changes made in MLflow without the registry, "
            "as the registry's reconcile found and recorded them", ["model", "alias"], registry=registry,
        )
        self.unaudited = Gauge(
            "shipyard_registry_unaudited_aliases", "1 for each alias that names a version no registry "
            "move set (until the registry moves it), 0 for the other aliases the audit knows",
            ["model", "alias"], registry=registry,
        )
        self.runs = Counter(
            "shipyard_registry_alias_reconciles", "Reconciles of MLflow's aliases with the audit, by outcome",
            ["outcome"], registry=registry,
        )
        self.last_success = Gauge(
            "shipyard_registry_alias_reconcile_last_success_timestamp_seconds",
            "When the last reconcile of MLflow's aliases with the audit finished", registry=registry,
        )
        self._lock = threading.Lock()

    def show(self, found: list[UnauditedAlias], known: Iterable[Key] = ()) -> None:
        """Set the unaudited gauge to exactly ``found`` (1) and the other ``known`` aliases (0)."""
        with self._lock:
            self.unaudited.clear()
            for model, alias in known:
                self.unaudited.labels(model, alias).set(0)
            for item in found:
                self.unaudited.labels(item.model, item.alias).set(1)


class AliasReconciler:
    """Runs the reconcile (one run at a time in this process) and keeps its metrics up to date."""

    def __init__(self, registry: Registry, metrics: ReconcileMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self._running = threading.Lock()

    def unaudited(self, model: str | None = None) -> UnauditedPublic:
        """The aliases left unaudited now, from the audit (every registry process agrees)."""
        with self.registry.database.session() as session:
            return UnauditedPublic(unaudited=unaudited(session, model))

    def refresh(self) -> UnauditedPublic:
        """Set the unaudited gauge from the audit (at start, before the first run)."""
        with self.registry.database.session() as session:
            seen = _latest(session, TRACKED_ACTIONS)
            found = UnauditedPublic(unaudited=unaudited(session, seen=seen))
        known = [key for key, row in seen.items() if _left(row) is not None]
        self.metrics.show(found.unaudited, known)
        return found

    def run(self) -> ReconcilePublic:
        """Compare every model's aliases in MLflow with the audit; record, log and count each
        difference; refresh the gauge. MLflow unreachable: the platform's 503, counted as failed."""
        with self._running:
            try:
                checked, recorded = self._scan()
            except Exception:
                self.metrics.runs.labels("failed").inc()
                raise
            for row in recorded:
                log.warning("alias changed outside the registry: %s", row.reason, extra={
                    "model": row.model, "alias": row.alias, "version": row.version,
                    "previous_version": row.previous_version, "audit_id": row.id, "action": row.action,
                })
                self.metrics.moved.labels(row.model, row.alias).inc()
            found = self.refresh()
            self.metrics.runs.labels("ok").inc()
            self.metrics.last_success.set_to_current_time()
        return ReconcilePublic(
            checked_models=checked,
            recorded=[AuditPublic.model_validate(row, from_attributes=True) for row in recorded],
            unaudited=found.unaudited,
        )

    def _scan(self) -> tuple[int, list[AuditRecord]]:
        """(models checked, audit rows written): every page of MLflow's models against the audit."""
        with self.registry.database.session() as session:
            by_model: dict[str, dict[str, AuditRecord]] = defaultdict(dict)
            for (name, alias), row in _latest(session, TRACKED_ACTIONS).items():
                by_model[name][alias] = row
        checked, recorded = 0, []
        token: str | None = None
        while True:
            page = self.registry.store.models(max_results=MAX_PAGE, page_token=token)
            for model in page.items:
                checked += 1
                if differences(model.name, model.aliases, by_model.get(model.name, {})):
                    recorded += self._record(model.name)
            if not page.token:
                return checked, recorded
            token = page.token

    def _record(self, model: str) -> list[AuditRecord]:
        """Under ``model``'s lock, read MLflow and the audit again and record what still differs."""
        with self.registry.locked(model) as session:
            try:
                aliases = self.registry.store.model(model).aliases
            except NotFound:
                return []  # deleted meanwhile
            recorded = {alias: row for (_, alias), row in _latest(session, TRACKED_ACTIONS, model).items()}
            rows = [difference.row() for difference in differences(model, aliases, recorded)]
            session.add_all(rows)
            session.flush()
        return rows


def reconcile_until(stop: threading.Event, reconciler: AliasReconciler, interval_s: float) -> None:
    """Run the reconcile every ``interval_s`` until ``stop`` is set; a failed run is logged and
    the next one tries again."""
    while not stop.wait(interval_s):
        try:
            reconciler.run()
        except Exception as exc:
            log.warning("the reconcile of MLflow's aliases with the audit failed: %s", exc)
