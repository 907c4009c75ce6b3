"""Alias moves, governed: requests, a second person's decision, gates, direct admin moves, rollback.

Every move runs in :meth:`Registry.locked` (a database lock per model, held across processes):
read MLflow's alias, write the audit row, move the alias in MLflow, commit. Two approvers acting
at once, or two registry processes, therefore give exactly one move per decision, and the audit's
``previous_version`` chain matches MLflow's aliases. Events are published after the commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from services.registry.core import catalog, gates
from services.registry.core.registry import Registry
from services.registry.core.schemas import (
    AliasRemovedPublic,
    GatePublic,
    GateVerdict,
    PromotePublic,
)
from services.registry.core.sources import check_source
from services.registry.core.tables import AuditRecord, GateRecord
from shipyard_common.db import utcnow
from shipyard_common.errors import Conflict, InvalidInput, NotFound
from shipyard_common.events import Event, ModelAliasMoved, ModelAliasRemoved
from shipyard_common.lineage import (
    CANARY,
    DEFAULT_CANARY_WEIGHT,
    PRODUCTION,
    TAG_ARCHIVED,
    TAG_CANARY_WEIGHT,
)

log = logging.getLogger("shipyard.registry.promotion")

MOVE_ACTIONS = ("promote", "rollback", "remove")


@dataclass(frozen=True)
class Move:
    """What to do under the lock: point ``alias`` at ``version`` (or delete it: ``version`` None)."""

    model: str
    alias: str
    version: str | None
    actor: str
    reason: str | None
    action: str = "promote"
    weight: float | None = None
    request_id: int | None = None
    direct: bool = False


def canary_weight(tags: dict[str, str] | None) -> float | None:
    """The model's stored canary weight, or None if it has none (or an unusable one)."""
    raw = (tags or {}).get(TAG_CANARY_WEIGHT)
    try:
        weight = float(raw) if raw is not None else None
    except ValueError:
        return None
    return weight if weight is not None and 0 < weight <= 1 else None


def _announce(registry: Registry, event: Event) -> None:
    try:
        registry.events.publish(event)
    except Exception:
        # The alias has moved and is audited; subscribers reconcile from MLflow on a timer.
        log.exception("could not record the %s event for %s", event.type, event.model)


def apply(registry: Registry, session: Session, move: Move) -> tuple[AuditRecord, Event]:
    """Under the model's lock: audit ``move``, then make it in MLflow. The caller commits."""
    model = registry.store.model(move.model)
    current = (model.aliases or {}).get(move.alias)
    previous = str(current) if current is not None else None
    weight = move.weight
    if move.version is None:
        if previous is None:
            raise NotFound(f"model {move.model!r} has no alias {move.alias!r}")
        record = AuditRecord(
            model=move.model,
            version=previous,
            alias=move.alias,
            previous_version=previous,
            action="remove",
            actor=move.actor,
            reason=move.reason,
            direct=move.direct,
        )
    else:
        target = registry.store.version(move.model, move.version)
        if (target.tags or {}).get(TAG_ARCHIVED) == "true":
            raise Conflict(f"{move.model} v{target.version} is archived and can no longer be given an alias")
        check_source(registry.store, target)
        if move.alias == CANARY and weight is None:
            weight = canary_weight(model.tags) or DEFAULT_CANARY_WEIGHT
        record = AuditRecord(
            model=move.model,
            version=str(target.version),
            alias=move.alias,
            previous_version=previous,
            action=move.action,
            weight=weight,
            actor=move.actor,
            reason=move.reason,
            request_id=move.request_id,
            direct=move.direct,
        )
    # The audit row is flushed before MLflow is touched and committed after: a database that
    # cannot write fails the move instead of leaving an alias move nobody recorded.
    session.add(record)
    session.flush()
    if move.version is None:
        registry.store.delete_alias(move.model, move.alias)
        return record, ModelAliasRemoved(
            model=move.model, alias=move.alias, previous_version=previous or "", actor=move.actor
        )
    if weight is not None:  # first, so that whoever sees the new canary also sees its weight
        registry.store.set_model_tag(move.model, TAG_CANARY_WEIGHT, repr(weight))
    registry.store.set_alias(move.model, move.alias, record.version)
    return record, ModelAliasMoved(
        model=move.model,
        alias=move.alias,
        version=record.version,
        previous_version=previous,
        weight=weight,
        actor=move.actor,
    )


def moved(registry: Registry, record: AuditRecord, event: Event) -> PromotePublic:
    log.info(
        "alias %s",
        record.action,
        extra={
            "model": record.model,
            "alias": record.alias,
            "version": record.version,
            "previous_version": record.previous_version,
            "actor": record.actor,
            "request_id": record.request_id,
        },
    )
    _announce(registry, event)
    return PromotePublic(
        model=record.model,
        version=record.version,
        alias=record.alias,
        previous_version=record.previous_version,
        weight=record.weight,
        audit_id=record.id,
    )


def promote_directly(
    *,
    registry: Registry,
    name: str,
    version: str,
    alias: str,
    reason: str | None,
    actor: str,
    weight: float | None = None,
) -> PromotePublic:
    """An admin's move without a request: made at once, marked ``direct`` in the audit."""
    if weight is not None and alias != CANARY:
        raise InvalidInput(f"a weight applies to the '{CANARY}' alias only, not to {alias!r}")
    move = Move(
        model=name, alias=alias, version=version, actor=actor, reason=reason, weight=weight, direct=True
    )
    with registry.locked(name) as session:
        record, event = apply(registry, session, move)
    return moved(registry, record, event)


def remove_alias(
    *, registry: Registry, name: str, alias: str, reason: str | None, actor: str
) -> AliasRemovedPublic:
    """Delete ``alias`` of ``name`` (a canary or shadow taken down), audit it, announce it."""
    with registry.locked(name) as session:
        record, event = apply(
            registry, session, Move(model=name, alias=alias, version=None, actor=actor, reason=reason)
        )
    moved(registry, record, event)
    return AliasRemovedPublic(model=name, alias=alias, previous_version=record.version)


# Gates
def _gate_row(session: Session, model: str) -> GateRecord | None:
    return session.get(GateRecord, model)


def get_gate(*, registry: Registry, name: str) -> GatePublic:
    with registry.database.session() as session:
        row = _gate_row(session, name)
    if row is None:
        return GatePublic(model=name, rules=[], aliases=[PRODUCTION])
    return GatePublic(
        model=name,
        rules=[gates.rule_text(r) for r in row.rules],
        aliases=list(row.aliases),
        updated_by=row.updated_by,
        updated_at=row.updated_at,
    )


def set_gate(
    *, registry: Registry, name: str, rules: list[str], aliases: list[str], actor: str
) -> GatePublic:
    registry.store.model(name)  # a gate for a model that does not exist is a typo
    parsed = [gates.parse_rule(rule) for rule in rules]
    with registry.database.session() as session:
        row = _gate_row(session, name) or GateRecord(model=name)
        row.rules, row.aliases, row.updated_by, row.updated_at = parsed, list(aliases), actor, utcnow()
        session.add(row)
    log.info("gate set", extra={"model": name, "rules": rules, "actor": actor})
    return get_gate(registry=registry, name=name)


def gate_verdict(*, registry: Registry, name: str, version: str, alias: str) -> GateVerdict | None:
    """The model's gate on ``version`` for ``alias``, or None when no gate covers that alias."""
    with registry.database.session() as session:
        row = _gate_row(session, name)
    if row is None or alias not in row.aliases or not row.rules:
        return None
    candidate = catalog.get_version(store=registry.store, name=name, version=version)
    current = registry.store.model(name).aliases or {}
    production = None
    if PRODUCTION in current:
        production = catalog.get_version(store=registry.store, name=name, version=str(current[PRODUCTION]))
    return gates.judge(row.rules, candidate, production)
