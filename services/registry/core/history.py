"""The record of alias moves: the audit, a model's history, production at a moment, rollback, archive."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.core import promotion
from services.registry.core.registry import Registry
from services.registry.core.schemas import ArchivePublic, AuditPublic, HistoryPublic, PromotePublic
from services.registry.core.tables import AuditRecord
from shipyard_common.errors import Conflict
from shipyard_common.lineage import PRODUCTION, TAG_ARCHIVED


def list_audit(*, registry: Registry, model: str | None, limit: int) -> list[AuditPublic]:
    statement = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.id.desc()).limit(limit)
    if model is not None:
        statement = statement.where(AuditRecord.model == model)
    with registry.database.session() as session:
        rows = session.scalars(statement).all()
    return [AuditPublic.model_validate(row, from_attributes=True) for row in rows]


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def history(*, registry: Registry, name: str, at: datetime | None, limit: int) -> HistoryPublic:
    """Every alias move of ``name``, newest first; with ``at``, also the production version then."""
    moves = select(AuditRecord).where(
        AuditRecord.model == name, AuditRecord.action.in_(promotion.MOVE_ACTIONS)
    )
    with registry.database.session() as session:
        rows = session.scalars(moves.order_by(AuditRecord.id.desc()).limit(limit)).all()
        production_at = None
        if at is not None:
            then = session.scalars(
                moves.where(AuditRecord.alias == PRODUCTION, AuditRecord.at <= _naive_utc(at))
                .order_by(AuditRecord.id.desc())
                .limit(1)
            ).first()
            production_at = then.version if then is not None and then.action != "remove" else None
    if not rows:
        registry.store.model(name)  # a model nobody moved yet, or one that does not exist (404)
    return HistoryPublic(
        model=name,
        moves=[AuditPublic.model_validate(r, from_attributes=True) for r in rows],
        at=at,
        production_at=production_at,
    )


def _rollback_target(session: Session, name: str) -> tuple[str | None, str | None]:
    """(production now, the version before it) by replaying the production moves in order.

    A promotion pushes its version; a rollback pops the version it left; so rolling back twice
    from v3 (after v1 → v2 → v3) gives v2, then v1, not a swing between two versions.
    """
    rows = session.scalars(
        select(AuditRecord)
        .where(
            AuditRecord.model == name,
            AuditRecord.alias == PRODUCTION,
            AuditRecord.action.in_(promotion.MOVE_ACTIONS),
        )
        .order_by(AuditRecord.id)
    ).all()
    # A first move from a version set before the registry recorded anything starts from that version.
    stack: list[str | None] = [rows[0].previous_version] if rows and rows[0].previous_version else []
    for row in rows:
        if row.action == "rollback" and stack:
            stack.pop()
        else:
            stack.append(None if row.action == "remove" else row.version)
    current = stack[-1] if stack else None
    return current, stack[-2] if len(stack) >= 2 else None


@dataclass(frozen=True)
class RollbackPlan:
    """What a rollback of a model would do now: from ``current`` to ``target``, or why it cannot."""

    current: str | None
    target: str | None
    problem: str | None


def _plan(registry: Registry, session: Session, name: str) -> RollbackPlan:
    recorded, target = _rollback_target(session, name)
    now = (registry.store.model(name).aliases or {}).get(PRODUCTION)
    current = str(now) if now is not None else None
    problem = None
    if current is None or current != recorded:
        problem = (f"{name}'s production alias ({'v' + current if current else 'none'}) is not the one the "
                   "history ends with, so a rollback cannot tell where to go; promote the version you want")
    elif target is None:
        problem = f"{name} has no earlier production version to roll back to"
    return RollbackPlan(current=current, target=target, problem=problem)


def rollback_plan(*, registry: Registry, name: str) -> RollbackPlan:
    """The rollback :func:`rollback` would make now (for a confirmation step); nothing moves."""
    with registry.database.session() as session:
        return _plan(registry, session, name)


def rollback(
    *, registry: Registry, name: str, actor: str, reason: str, expect: RollbackPlan | None = None
) -> PromotePublic:
    """Point production back at the version it named before the current one, in one call.

    ``expect``: the plan a person confirmed; if production moved since, nothing happens (409).
    """
    with registry.locked(name) as session:
        plan = _plan(registry, session, name)
        if plan.problem is not None or plan.target is None:
            raise Conflict(plan.problem or f"{name} has nothing to roll back to")
        if expect is not None and (expect.current, expect.target) != (plan.current, plan.target):
            raise Conflict(f"{name}'s production changed since the rollback was confirmed (it would now go "
                           f"from v{plan.current} to v{plan.target}); nothing was rolled back")
        target = plan.target
        move = promotion.Move(
            model=name, alias=PRODUCTION, version=target, actor=actor, reason=reason, action="rollback"
        )
        record, event = promotion.apply(registry, session, move)
    return promotion.moved(registry, record, event)


def set_archived(
    *, registry: Registry, name: str, version: str, archived: bool, actor: str, reason: str | None
) -> ArchivePublic:
    """Archive a version (it can no longer be given an alias) or restore it; audited."""
    with registry.locked(name) as session:
        found = registry.store.version(name, version)
        version = str(found.version)
        if ((found.tags or {}).get(TAG_ARCHIVED) == "true") == archived:
            raise Conflict(f"{name} v{version} is {'already' if archived else 'not'} archived")
        holding = sorted(
            a for a, v in (registry.store.model(name).aliases or {}).items() if str(v) == version
        )
        if archived and holding:
            raise Conflict(
                f"{name} v{version} is {', '.join(holding)}: move or remove "
                f"{'that alias' if len(holding) == 1 else 'those aliases'} before archiving it"
            )
        session.add(
            AuditRecord(
                model=name,
                version=version,
                alias="",
                previous_version=None,
                action="archive" if archived else "restore",
                actor=actor,
                reason=reason,
            )
        )
        session.flush()
        if archived:
            registry.store.set_version_tag(name, version, TAG_ARCHIVED, "true")
        else:
            registry.store.delete_version_tag(name, version, TAG_ARCHIVED)
    return ArchivePublic(model=name, version=version, archived=archived)
