from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.registry import service
from services.registry.schemas import (
    AliasName,
    AliasRemovedPublic,
    AuditPublic,
    ModelPublic,
    PromotePublic,
    PromoteRequest,
    VersionPublic,
)
from shipyard_common.auth import Principal, Role, role_checker

router = APIRouter()

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Approver = Annotated[Principal, Depends(role_checker(Role.APPROVER))]


def _registry(request: Request) -> service.Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


# Plain defs throughout: the MLflow client and the database block, so these run in the thread pool.
@router.get("/models", response_model=list[ModelPublic], tags=["models"])
def list_models(request: Request, _: Viewer) -> list[ModelPublic]:
    return service.list_models(registry=_registry(request))


@router.get("/models/{name}", response_model=ModelPublic, tags=["models"])
def get_model(request: Request, name: str, _: Viewer) -> ModelPublic:
    return service.get_model(registry=_registry(request), name=name)


@router.get("/models/{name}/versions", response_model=list[VersionPublic], tags=["models"])
def list_versions(request: Request, name: str, _: Viewer) -> list[VersionPublic]:
    return service.list_versions(registry=_registry(request), name=name)


@router.get("/models/{name}/versions/{version}", response_model=VersionPublic, tags=["models"])
def get_version(request: Request, name: str, version: str, _: Viewer) -> VersionPublic:
    return service.get_version(registry=_registry(request), name=name, version=version)


@router.post("/models/{name}/versions/{version}/promote", response_model=PromotePublic, tags=["models"])
def promote_version(
    request: Request, name: str, version: str, body: PromoteRequest, principal: Approver
) -> PromotePublic:
    return service.promote_version(
        registry=_registry(request), name=name, version=version, alias=body.alias,
        reason=body.reason, actor=principal.name, weight=body.weight,
    )


@router.delete("/models/{name}/aliases/{alias}", response_model=AliasRemovedPublic, tags=["models"])
def delete_alias(
    request: Request,
    name: str,
    alias: AliasName,
    principal: Approver,
    reason: Annotated[str | None, Query(max_length=2000, description="Why, for the audit row.")] = None,
) -> AliasRemovedPublic:
    return service.delete_alias(
        registry=_registry(request), name=name, alias=alias, reason=reason, actor=principal.name
    )


@router.get("/audit", response_model=list[AuditPublic], tags=["audit"])
def list_audit(
    request: Request,
    _: Viewer,
    model: Annotated[str | None, Query(description="Only the rows of this model.")] = None,
    limit: Annotated[int, Query(ge=1, description="At most this many rows, newest first.")] = 100,
) -> list[AuditPublic]:
    registry = _registry(request)
    return service.list_audit(
        registry=registry, model=model, limit=min(limit, registry.settings.audit_page_max)
    )
