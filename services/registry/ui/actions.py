"""The UI's forms: each POST checks the session, its CSRF token and the role the REST route needs,
validates with the REST API's own schema and calls the same core function, as the signed-in user.

After a change the browser is sent (303) to the page that shows it, with a one-line message.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse

from services.registry.core import approvals, history, promotion
from services.registry.core.schemas import (
    DecisionCreate,
    GateSet,
    PromoteCreate,
    PromotionRequestCreate,
    RollbackCreate,
)
from services.registry.ui.web import (
    AdminForm,
    ApproverForm,
    RequesterForm,
    UiRoute,
    parsed,
    redirect,
    registry_of,
)
from shipyard_common.auth import Role
from shipyard_common.lineage import CANARY
from shipyard_common.orm import MAX_BIGINT

router = APIRouter(route_class=UiRoute)

Text = Annotated[str, Form(max_length=4000)]
Alias = Annotated[str, Form(max_length=32)]
Weight = Annotated[float | None, Form()]
RequestId = Annotated[int, Path(ge=1, le=MAX_BIGINT)]


def version_url(name: str, version: str) -> str:
    return f"/ui/models/{name}/versions/{version}"


@router.post("/models/{name}/versions/{version}/request")
def request_promotion(request: Request, name: str, version: str, session: RequesterForm, alias: Alias,
                      reason: Text = "", weight: Weight = None) -> RedirectResponse:
    """Ask for ``alias`` → this version (trainer or approver); another approver decides."""
    body = parsed(PromotionRequestCreate, version=version, alias=alias, reason=reason.strip(),
                  weight=weight if alias == CANARY else None)
    made = approvals.create_request(registry=registry_of(request), name=name, version=body.version,
                                    alias=body.alias, reason=body.reason, weight=body.weight,
                                    actor=session.principal.name)
    return redirect(version_url(name, made.version), f"Request #{made.id} asks for v{made.version} as "
                                                     f"{made.alias}. An approver will decide it.")


@router.post("/models/{name}/versions/{version}/promote")
def promote_directly(request: Request, name: str, version: str, session: AdminForm, alias: Alias,
                     reason: Text = "", weight: Weight = None) -> RedirectResponse:
    """An admin's move without a request: made at once, marked ``direct`` in the audit."""
    body = parsed(PromoteCreate, alias=alias, reason=reason.strip() or None,
                  weight=weight if alias == CANARY else None)
    moved = promotion.promote_directly(registry=registry_of(request), name=name, version=version,
                                       alias=body.alias, reason=body.reason, actor=session.principal.name,
                                       weight=body.weight)
    return redirect(version_url(name, moved.version),
                    f"v{moved.version} is now {moved.alias} (a direct move).")


@router.post("/models/{name}/versions/{version}/archive")
def archive_version(request: Request, name: str, version: str, session: ApproverForm,
                    reason: Text = "") -> RedirectResponse:
    done = history.set_archived(registry=registry_of(request), name=name, version=version, archived=True,
                                actor=session.principal.name, reason=reason.strip() or None)
    return redirect(version_url(name, done.version),
                    f"v{done.version} is archived: it can no longer be promoted.")


@router.post("/models/{name}/versions/{version}/restore")
def restore_version(request: Request, name: str, version: str, session: ApproverForm,
                    reason: Text = "") -> RedirectResponse:
    done = history.set_archived(registry=registry_of(request), name=name, version=version, archived=False,
                                actor=session.principal.name, reason=reason.strip() or None)
    return redirect(version_url(name, done.version), f"v{done.version} is restored.")


@router.post("/models/{name}/aliases/{alias}/remove")
def remove_alias(request: Request, name: str, alias: str, session: ApproverForm,
                 reason: Text = "") -> RedirectResponse:
    """Take an alias down (end a canary or a shadow), audited."""
    checked = parsed(PromoteCreate, alias=alias).alias
    removed = promotion.remove_alias(registry=registry_of(request), name=name, alias=checked,
                                     reason=reason.strip() or None, actor=session.principal.name)
    return redirect(f"/ui/models/{name}", f"{removed.alias} no longer points at v{removed.previous_version}.")


@router.post("/requests/{request_id}/approve")
def approve(request: Request, request_id: RequestId, session: ApproverForm,
            reason: Text = "") -> RedirectResponse:
    body = parsed(DecisionCreate, reason=reason.strip())
    moved = approvals.approve(registry=registry_of(request), request_id=request_id,
                              actor=session.principal.name, reason=body.reason)
    return redirect("/ui/requests", f"Request #{request_id} approved: {moved.model} v{moved.version} is now "
                                    f"{moved.alias}.")


@router.post("/requests/{request_id}/reject")
def reject(request: Request, request_id: RequestId, session: ApproverForm,
           reason: Text = "") -> RedirectResponse:
    body = parsed(DecisionCreate, reason=reason.strip())
    approvals.reject(registry=registry_of(request), request_id=request_id, actor=session.principal.name,
                     reason=body.reason)
    return redirect("/ui/requests", f"Request #{request_id} rejected.")


@router.post("/requests/{request_id}/cancel")
def withdraw(request: Request, request_id: RequestId, session: RequesterForm) -> RedirectResponse:
    """Withdraw a pending request: its requester, or an admin."""
    approvals.cancel(registry=registry_of(request), request_id=request_id, actor=session.principal.name,
                     is_admin=session.principal.role == Role.ADMIN)
    return redirect("/ui/requests", f"Request #{request_id} withdrawn.")


@router.post("/models/{name}/rollback")
def rollback(request: Request, name: str, session: ApproverForm, reason: Text = "",
             expect_from: Annotated[str, Form(max_length=12)] = "",
             expect_to: Annotated[str, Form(max_length=12)] = "") -> RedirectResponse:
    """Roll production back, if it would still go where the confirmation page said."""
    registry = registry_of(request)
    body = parsed(RollbackCreate, reason=reason.strip())
    confirmed = history.RollbackPlan(current=expect_from or None, target=expect_to or None, problem=None)
    moved = history.rollback(registry=registry, name=name, actor=session.principal.name, reason=body.reason,
                             expect=confirmed)
    return redirect(f"/ui/models/{name}/history",
                    f"Rolled back: production is v{moved.version} again (was v{moved.previous_version}).")


@router.post("/models/{name}/gate")
def set_gate(request: Request, name: str, session: AdminForm, rules: Text = "",
             aliases: Annotated[list[str] | None, Form()] = None) -> RedirectResponse:
    """Replace the model's gate: one rule a line, checked for the aliases ticked."""
    body = parsed(GateSet, rules=[line.strip() for line in rules.splitlines() if line.strip()],
                  aliases=aliases or [])
    gate = promotion.set_gate(registry=registry_of(request), name=name, rules=body.rules,
                              aliases=list(body.aliases), actor=session.principal.name)
    said = f"{len(gate.rules)} rule{'s' if len(gate.rules) != 1 else ''}" if gate.rules else "no rules"
    return redirect(f"/ui/models/{name}#gate", f"The gate of {name} now has {said}.")
