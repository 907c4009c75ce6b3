"""The UI's pages about alias moves: the requests inbox, a model's history, the rollback confirmation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from services.registry.core import approvals, history
from services.registry.core.registry import Registry
from services.registry.core.schemas import PromotionRequestPublic
from services.registry.ui.web import Signed, UiRoute, registry_of, render
from shipyard_common.auth import Role, require
from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import PRODUCTION

router = APIRouter(route_class=UiRoute)

DECIDED_SHOWN = 30
ModelFilter = Annotated[str | None, Query(max_length=256)]


def decided_requests(registry: Registry, model: str | None) -> list[PromotionRequestPublic]:
    """The latest decided requests (approved, rejected, withdrawn), newest decision first."""
    found = [r for state in ("approved", "rejected", "cancelled") for r in
             approvals.list_requests(registry=registry, model=model, state=state, limit=DECIDED_SHOWN)]
    found.sort(key=lambda r: (r.decided_at or r.requested_at, r.id), reverse=True)
    return found[:DECIDED_SHOWN]


@router.get("/requests", response_class=HTMLResponse)
def requests_page(request: Request, _: Signed, model: ModelFilter = None) -> HTMLResponse:
    """Pending requests first, each with its gate's verdict; then the latest decisions."""
    registry = registry_of(request)
    pending = approvals.list_requests(registry=registry, model=model or None, state="pending", limit=200)
    pending.sort(key=lambda r: r.id)  # oldest first: it has waited longest
    return render(request, "requests.html", title="Promotion requests", pending=pending, model=model,
                  decided=decided_requests(registry, model or None))


def parse_moment(text: str | None) -> datetime | None:
    """A ``datetime-local`` field's value, read as UTC; empty is none."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not a date and time; write it as 2026-01-31T14:00") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@router.get("/models/{name}/history", response_class=HTMLResponse)
def history_page(request: Request, name: str, _: Signed,
                 alias: Annotated[str, Query(max_length=32)] = PRODUCTION,
                 at: Annotated[str | None, Query(max_length=40)] = None) -> HTMLResponse:
    """The model's alias moves as a timeline, newest first; ``at``: which version was production then."""
    registry = registry_of(request)
    found = history.history(registry=registry, name=name, at=parse_moment(at), limit=1000)
    moves = [m for m in found.moves if alias == "all" or m.alias == alias]
    approved = approvals.list_requests(registry=registry, model=name, state="approved", limit=1000)
    return render(request, "history.html", title=f"{name} history", name=name, found=found, moves=moves,
                  alias=alias, at=at or "", requesters={r.id: r.requested_by for r in approved})


@router.get("/models/{name}/rollback", response_class=HTMLResponse)
def rollback_page(request: Request, name: str, session: Signed) -> HTMLResponse:
    """The confirmation step: from which version to which, and why, before anything moves."""
    require(session.principal, Role.APPROVER)
    plan = history.rollback_plan(registry=registry_of(request), name=name)
    return render(request, "rollback.html", title=f"Roll back {name}", name=name, current=plan.current,
                  target=plan.target, problem=plan.problem)
