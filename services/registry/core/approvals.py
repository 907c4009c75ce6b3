"""Promotion requests: asked for by one person, decided by another, gated, then moved.

``pending`` → ``approved`` (the alias moved, in the same transaction) | ``rejected`` | ``cancelled``.
The decision re-reads the request under the model's lock, so of two approvers acting at once one
decides and the other is told who did.
"""

from __future__ import annotations

from sqlalchemy import func, select

from services.registry.core import promotion
from services.registry.core.registry import Registry
from services.registry.core.schemas import PromotePublic, PromotionRequestPublic
from services.registry.core.sources import check_source
from services.registry.core.tables import PromotionRequestRecord
from shipyard_common.db import utcnow
from shipyard_common.errors import Conflict, Forbidden, InvalidInput, NotFound
from shipyard_common.lineage import CANARY, TAG_ARCHIVED

PENDING = "pending"


def _public(registry: Registry, row: PromotionRequestRecord, *, with_gate: bool) -> PromotionRequestPublic:
    public = PromotionRequestPublic.model_validate(row, from_attributes=True)
    if with_gate and row.state == PENDING:
        public.gate = promotion.gate_verdict(
            registry=registry, name=row.model, version=row.version, alias=row.alias
        )
    return public


def create_request(
    *, registry: Registry, name: str, version: str, alias: str, reason: str, weight: float | None, actor: str
) -> PromotionRequestPublic:
    """Ask for ``alias`` → ``version``; refused if it is already so, archived, or already asked for."""
    if weight is not None and alias != CANARY:
        raise InvalidInput(f"a weight applies to the '{CANARY}' alias only, not to {alias!r}")
    model = registry.store.model(name)
    target = registry.store.version(name, version)
    version = str(target.version)
    if (target.tags or {}).get(TAG_ARCHIVED) == "true":
        raise Conflict(f"{name} v{version} is archived and can no longer be given an alias")
    check_source(registry.store, target)
    if str((model.aliases or {}).get(alias)) == version:
        raise Conflict(f"{name} v{version} already is {alias}")
    with registry.database.session() as session:
        duplicate = session.scalars(
            select(PromotionRequestRecord).where(
                PromotionRequestRecord.model == name,
                PromotionRequestRecord.alias == alias,
                PromotionRequestRecord.version == version,
                PromotionRequestRecord.state == PENDING,
            )
        ).first()
        if duplicate is not None:
            raise Conflict(
                f"request #{duplicate.id} by {duplicate.requested_by} already asks for "
                f"{name} v{version} as {alias}"
            )
        row = PromotionRequestRecord(
            model=name,
            version=version,
            alias=alias,
            weight=weight,
            reason=reason,
            requested_by=actor,
            state=PENDING,
        )
        session.add(row)
    return _public(registry, row, with_gate=True)


def _row(registry: Registry, request_id: int) -> PromotionRequestRecord:
    with registry.database.session() as session:
        row = session.get(PromotionRequestRecord, request_id)
    if row is None:
        raise NotFound(f"there is no promotion request #{request_id}")
    return row


def get_request(*, registry: Registry, request_id: int) -> PromotionRequestPublic:
    return _public(registry, _row(registry, request_id), with_gate=True)


def list_requests(
    *, registry: Registry, model: str | None, state: str | None, limit: int
) -> list[PromotionRequestPublic]:
    statement = select(PromotionRequestRecord).order_by(PromotionRequestRecord.id.desc()).limit(limit)
    if model is not None:
        statement = statement.where(PromotionRequestRecord.model == model)
    if state is not None:
        statement = statement.where(PromotionRequestRecord.state == state)
    with registry.database.session() as session:
        rows = list(session.scalars(statement))
    return [_public(registry, row, with_gate=row.state == PENDING) for row in rows]


def count_pending(*, registry: Registry) -> int:
    """How many requests wait for a decision (the UI's inbox badge)."""
    statement = select(func.count()).select_from(PromotionRequestRecord).where(
        PromotionRequestRecord.state == PENDING
    )
    with registry.database.session() as session:
        return int(session.scalar(statement) or 0)


def _still_pending(row: PromotionRequestRecord | None, request_id: int) -> PromotionRequestRecord:
    if row is None:
        raise NotFound(f"there is no promotion request #{request_id}")
    if row.state != PENDING:
        by = f" by {row.decided_by}" if row.decided_by else ""
        raise Conflict(f"request #{request_id} is no longer pending: it was {row.state}{by}")
    return row


def approve(*, registry: Registry, request_id: int, actor: str, reason: str) -> PromotePublic:
    """Approve request ``request_id`` and move its alias, if its gate passes. Not your own request."""
    model = _row(registry, request_id).model
    with registry.locked(model) as session:
        row = _still_pending(
            session.get(PromotionRequestRecord, request_id, populate_existing=True), request_id
        )
        if row.requested_by == actor:
            raise Forbidden(f"request #{request_id} is your own: another approver must decide it")
        verdict = promotion.gate_verdict(
            registry=registry, name=row.model, version=row.version, alias=row.alias
        )
        if verdict is not None and not verdict.passed:
            raise Conflict(
                f"{row.model}'s gate blocks request #{request_id}: {verdict.summary}",
                details=verdict.model_dump(),
            )
        move = promotion.Move(
            model=row.model,
            alias=row.alias,
            version=row.version,
            actor=actor,
            reason=reason,
            weight=row.weight,
            request_id=row.id,
        )
        record, event = promotion.apply(registry, session, move)
        row.state, row.decided_by, row.decided_at, row.decision_reason = "approved", actor, utcnow(), reason
    return promotion.moved(registry, record, event)


def reject(*, registry: Registry, request_id: int, actor: str, reason: str) -> PromotionRequestPublic:
    return _close(registry, request_id, actor=actor, reason=reason, state="rejected")


def cancel(*, registry: Registry, request_id: int, actor: str, is_admin: bool) -> PromotionRequestPublic:
    """Withdraw a pending request: its requester (or an admin) only."""
    return _close(registry, request_id, actor=actor, reason="withdrawn", state="cancelled", is_admin=is_admin)


def _close(
    registry: Registry, request_id: int, *, actor: str, reason: str, state: str, is_admin: bool = False
) -> PromotionRequestPublic:
    model = _row(registry, request_id).model
    with registry.locked(model) as session:
        row = _still_pending(
            session.get(PromotionRequestRecord, request_id, populate_existing=True), request_id
        )
        if state == "rejected" and row.requested_by == actor:
            raise Forbidden(
                f"request #{request_id} is your own: withdraw it instead, or let another approver decide"
            )
        if state == "cancelled" and row.requested_by != actor and not is_admin:
            raise Forbidden(f"only {row.requested_by}, who made request #{request_id}, may withdraw it")
        row.state, row.decided_by, row.decided_at, row.decision_reason = state, actor, utcnow(), reason
    return _public(registry, row, with_gate=False)
