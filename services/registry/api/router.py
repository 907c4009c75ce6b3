"""The registry's REST API: thin routes over :mod:`services.registry.core`.

Plain ``def`` routes throughout: MLflow's client and the database block, so they run in the
thread pool. Reads take any role; requests need ``trainer`` or ``approver``; decisions, rollback
and archive need ``approver``; direct promotion and gates need ``admin``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request

from services.registry.core import approvals, catalog, history, promotion
from services.registry.core.reconcile import AliasReconciler
from services.registry.core.registry import Registry
from services.registry.core.schemas import (
    AliasName,
    AliasRemovedPublic,
    ArchivePublic,
    AuditPublic,
    ComparePublic,
    DecisionCreate,
    GatePublic,
    GateSet,
    HistoryPublic,
    ModelPage,
    ModelPublic,
    PromoteCreate,
    PromotePublic,
    PromotionRequestCreate,
    PromotionRequestPublic,
    ReconcilePublic,
    RequestState,
    RollbackCreate,
    UnauditedPublic,
    VersionDetail,
    VersionPage,
)
from services.registry.params import ModelSearch, PageToken
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.orm import MAX_BIGINT
from shipyard_common.paths import PlainName, plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model named in a path or a filter is one plain name, refused (400) before any lookup.
# Every route reads MLflow (404 for what it does not hold; 502 and 503 when it answers badly or not at all).
router = APIRouter(dependencies=[Depends(plain_names(name="model", model="model"))],
                   responses=error_responses(*AUTHED_ERRORS, 404, 502, 503))
# What a change answers besides: a clash with the current state (409), a body over the limit (413).
CHANGE_ERRORS = error_responses(409, 413)

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Requester = Annotated[Principal, Depends(role_checker(Role.TRAINER, Role.APPROVER))]
Approver = Annotated[Principal, Depends(role_checker(Role.APPROVER))]
Admin = Annotated[Principal, Depends(role_checker(Role.ADMIN))]
MaxResults = Annotated[
    int | None, Query(ge=1, le=1000, description="Page size; default the setting page_size.")
]
Why = Annotated[str | None, Query(max_length=2000, description="Why, for the audit row.")]
# A promotion request's id: a BIGINT row id, so a larger number is a 422, not the driver's overflow.
RequestId = Annotated[int, Path(ge=1, le=MAX_BIGINT)]


def get_registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


RegistryDep = Annotated[Registry, Depends(get_registry)]


def get_reconciler(request: Request) -> AliasReconciler:
    return request.app.state.alias_reconciler  # type: ignore[no-any-return]


ReconcilerDep = Annotated[AliasReconciler, Depends(get_reconciler)]


def caller_authorization(request: Request) -> str:
    """The caller's credentials as an Authorization header, forwarded on reads from peers."""
    header = request.headers.get("authorization")
    return header or f"Bearer {request.headers.get('x-api-token', '')}"


@router.get("/models", response_model=ModelPage, tags=["models"])
def list_models(
    registry: RegistryDep, _: Viewer, page_token: PageToken = None, max_results: MaxResults = None,
    search: ModelSearch = None,
) -> ModelPage:
    return catalog.list_models(
        store=registry.store, page_token=page_token, max_results=max_results or registry.settings.page_size,
        search=search,
    )


@router.get("/models/{name}", response_model=ModelPublic, tags=["models"])
def get_model(registry: RegistryDep, name: PlainName, _: Viewer) -> ModelPublic:
    return catalog.get_model(store=registry.store, name=name)


@router.get("/models/{name}/versions", response_model=VersionPage, tags=["models"])
def list_versions(
    registry: RegistryDep, name: PlainName, _: Viewer, page_token: PageToken = None,
    max_results: MaxResults = None,
) -> VersionPage:
    return catalog.list_versions(
        store=registry.store,
        name=name,
        page_token=page_token,
        max_results=max_results or registry.settings.page_size,
    )


@router.get("/models/{name}/versions/{version}", response_model=VersionDetail, tags=["models"])
def get_version(
    request: Request, registry: RegistryDep, name: PlainName, version: str, _: Viewer
) -> VersionDetail:
    return catalog.version_detail(
        registry=registry, name=name, version=version, authorization=caller_authorization(request)
    )


@router.get("/models/{name}/compare", response_model=ComparePublic, tags=["models"])
def compare_versions(
    registry: RegistryDep,
    name: PlainName,
    _: Viewer,
    a: Annotated[str, Query(description="The base version.")],
    b: Annotated[str, Query(description="The version compared with it (deltas are b − a).")],
) -> ComparePublic:
    return catalog.compare(store=registry.store, name=name, a=a, b=b)


@router.post("/models/{name}/versions/{version}/promote", response_model=PromotePublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def promote_version(
    registry: RegistryDep, name: PlainName, version: str, body: PromoteCreate, principal: Admin
) -> PromotePublic:
    """Move an alias at once, without a request (admin only; marked ``direct`` in the audit)."""
    return promotion.promote_directly(
        registry=registry,
        name=name,
        version=version,
        alias=body.alias,
        reason=body.reason,
        actor=principal.name,
        weight=body.weight,
    )


@router.delete("/models/{name}/aliases/{alias}", response_model=AliasRemovedPublic, tags=["promotion"],
               responses=CHANGE_ERRORS)
def delete_alias(
    registry: RegistryDep, name: PlainName, alias: AliasName, principal: Approver, reason: Why = None
) -> AliasRemovedPublic:
    return promotion.remove_alias(
        registry=registry, name=name, alias=alias, reason=reason, actor=principal.name
    )


@router.post(
    "/models/{name}/requests", response_model=PromotionRequestPublic, status_code=201, tags=["promotion"],
    responses=CHANGE_ERRORS,
)
def create_request(
    registry: RegistryDep, name: PlainName, body: PromotionRequestCreate, principal: Requester
) -> PromotionRequestPublic:
    """Ask for an alias move; an approver who is not you decides it."""
    return approvals.create_request(
        registry=registry,
        name=name,
        version=body.version,
        alias=body.alias,
        reason=body.reason,
        weight=body.weight,
        actor=principal.name,
    )


@router.get("/requests", response_model=list[PromotionRequestPublic], tags=["promotion"])
def list_requests(
    registry: RegistryDep,
    _: Viewer,
    model: str | None = None,
    state: RequestState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[PromotionRequestPublic]:
    return approvals.list_requests(registry=registry, model=model, state=state, limit=limit)


@router.get("/requests/{request_id}", response_model=PromotionRequestPublic, tags=["promotion"])
def get_request(registry: RegistryDep, request_id: RequestId, _: Viewer) -> PromotionRequestPublic:
    return approvals.get_request(registry=registry, request_id=request_id)


@router.post("/requests/{request_id}/approve", response_model=PromotePublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def approve_request(
    registry: RegistryDep, request_id: RequestId, body: DecisionCreate, principal: Approver
) -> PromotePublic:
    return approvals.approve(
        registry=registry, request_id=request_id, actor=principal.name, reason=body.reason
    )


@router.post("/requests/{request_id}/reject", response_model=PromotionRequestPublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def reject_request(
    registry: RegistryDep, request_id: RequestId, body: DecisionCreate, principal: Approver
) -> PromotionRequestPublic:
    return approvals.reject(
        registry=registry, request_id=request_id, actor=principal.name, reason=body.reason
    )


@router.post("/requests/{request_id}/cancel", response_model=PromotionRequestPublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def cancel_request(
    registry: RegistryDep, request_id: RequestId, principal: Requester
) -> PromotionRequestPublic:
    return approvals.cancel(
        registry=registry, request_id=request_id, actor=principal.name, is_admin=principal.role == Role.ADMIN
    )


@router.post("/models/{name}/rollback", response_model=PromotePublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def rollback(
    registry: RegistryDep, name: PlainName, body: RollbackCreate, principal: Approver
) -> PromotePublic:
    """Production back to the version it named before the current one."""
    return history.rollback(registry=registry, name=name, actor=principal.name, reason=body.reason)


@router.post("/models/{name}/versions/{version}/archive", response_model=ArchivePublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def archive_version(
    registry: RegistryDep,
    name: PlainName,
    version: str,
    principal: Approver,
    reason: Annotated[str | None, Body(embed=True, max_length=2000)] = None,
) -> ArchivePublic:
    return history.set_archived(
        registry=registry, name=name, version=version, archived=True, actor=principal.name, reason=reason
    )


@router.post("/models/{name}/versions/{version}/restore", response_model=ArchivePublic, tags=["promotion"],
             responses=CHANGE_ERRORS)
def restore_version(
    registry: RegistryDep,
    name: PlainName,
    version: str,
    principal: Approver,
    reason: Annotated[str | None, Body(embed=True, max_length=2000)] = None,
) -> ArchivePublic:
    return history.set_archived(
        registry=registry, name=name, version=version, archived=False, actor=principal.name, reason=reason
    )


@router.get("/models/{name}/history", response_model=HistoryPublic, tags=["promotion"])
def get_history(
    registry: RegistryDep,
    name: PlainName,
    _: Viewer,
    at: Annotated[
        datetime | None, Query(description="ISO 8601 moment: which version was production then.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> HistoryPublic:
    return history.history(registry=registry, name=name, at=at, limit=limit)


@router.get("/models/{name}/gate", response_model=GatePublic, tags=["promotion"])
def get_gate(registry: RegistryDep, name: PlainName, _: Viewer) -> GatePublic:
    return promotion.get_gate(registry=registry, name=name)


@router.put("/models/{name}/gate", response_model=GatePublic, tags=["promotion"],
            responses=CHANGE_ERRORS)
def set_gate(registry: RegistryDep, name: PlainName, body: GateSet, principal: Admin) -> GatePublic:
    return promotion.set_gate(
        registry=registry, name=name, rules=body.rules, aliases=list(body.aliases), actor=principal.name
    )


@router.get("/audit", response_model=list[AuditPublic], tags=["audit"])
def list_audit(
    registry: RegistryDep,
    _: Viewer,
    model: Annotated[str | None, Query(description="Only the rows of this model.")] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_BIGINT, description="At most this many rows, newest first.")
    ] = 100,
) -> list[AuditPublic]:
    return history.list_audit(
        registry=registry, model=model, limit=min(limit, registry.settings.audit_page_max)
    )


@router.get("/aliases/unaudited", response_model=UnauditedPublic, tags=["audit"])
def list_unaudited(
    reconciler: ReconcilerDep,
    _: Viewer,
    model: Annotated[str | None, Query(description="Only the aliases of this model.")] = None,
) -> UnauditedPublic:
    """Aliases that name a version no registry move set (changed in MLflow directly), as the
    reconcile found them; each stays here until the registry moves that alias again."""
    return reconciler.unaudited(model)


@router.post("/aliases/reconcile", response_model=ReconcilePublic, tags=["audit"],
             responses=CHANGE_ERRORS)
def reconcile_aliases(reconciler: ReconcilerDep, _: Admin) -> ReconcilePublic:
    """Compare every model's aliases in MLflow with the audit now (it also runs every
    ``alias_reconcile_interval_s``): each difference gets an audit row, a WARNING and a count."""
    return reconciler.run()
