"""The model registry: MLflow holds models, versions and aliases; Shipyard adds audit and events.

An alias is the only notion of "stage" (MLflow's stages are deprecated). Promoting moves an
alias; rolling back is promoting the older version again, so both leave the same audit trail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from services.registry.models import AuditRecord
from services.registry.schemas import (
    AliasRemovedPublic,
    AuditPublic,
    ModelPublic,
    PromotePublic,
    VersionPublic,
)
from services.registry.settings import RegistrySettings
from shipyard_common.db import Database
from shipyard_common.errors import InvalidInput, NotFound, ShipyardError, Unavailable, UpstreamError
from shipyard_common.events import Event, EventBus, ModelAliasMoved, ModelAliasRemoved
from shipyard_common.lineage import CANARY, DEFAULT_CANARY_WEIGHT, TAG_CANARY_WEIGHT

log = logging.getLogger("shipyard.registry")

_PAGE_SIZE = 1000


@dataclass
class Registry:
    settings: RegistrySettings
    mlflow: MlflowClient
    database: Database
    events: EventBus
    # Serialises promotions in this process, so that each audit row's previous_version is the
    # version the alias really pointed at just before its own move.
    promote_lock: threading.Lock = field(default_factory=threading.Lock)


def create_registry(*, settings: RegistrySettings, database: Database) -> Registry:
    platform = settings.platform
    return Registry(
        settings=settings,
        mlflow=MlflowClient(
            tracking_uri=platform.mlflow_tracking_uri, registry_uri=platform.mlflow_tracking_uri
        ),
        database=database,
        events=EventBus(redis_url=platform.redis_url, channel=platform.events_channel, database=database),
    )


@contextmanager
def _mlflow_errors(missing: str) -> Iterator[None]:
    """Translate MLflow's failures into the platform's errors; ``missing`` explains a 404."""
    try:
        yield
    except ShipyardError:
        raise
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(missing) from exc
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise InvalidInput(f"the MLflow registry refused the request: {exc.message}") from exc
        if "API request to" in exc.message:  # the client gave up reaching the server
            raise Unavailable(f"the MLflow registry cannot be reached: {exc.message}") from exc
        raise UpstreamError(f"the MLflow registry answered with an error: {exc.message}") from exc
    except Exception as exc:  # requests' connection errors surface unwrapped from the client
        raise Unavailable(f"the MLflow registry cannot be reached: {exc}") from exc


def _checked_version(name: str, version: str) -> str:
    # MLflow answers a non-numeric version with a 400 about parameters; the caller asked for a
    # version that cannot exist, which is a plain 404.
    if not version.isdigit():
        raise NotFound(f"model {name!r} has no version {version!r}: versions are whole numbers")
    return str(int(version))


def _timestamp(milliseconds: int | None) -> datetime | None:
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def _model_public(model: RegisteredModel) -> ModelPublic:
    latest = [v.version for v in (model.latest_versions or [])]
    return ModelPublic(
        name=model.name,
        description=model.description or None,
        aliases={alias: str(version) for alias, version in (model.aliases or {}).items()},
        latest_version=str(max(latest, key=int)) if latest else None,
        tags=dict(model.tags or {}),
        created_at=_timestamp(model.creation_timestamp),
        updated_at=_timestamp(model.last_updated_timestamp),
    )


def _version_public(
    version: ModelVersion, aliases: dict[str, str], metrics: dict[str, float] | None
) -> VersionPublic:
    return VersionPublic(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or None,
        status=version.status,
        source=version.source,
        description=version.description or None,
        tags=dict(version.tags or {}),
        # search_model_versions leaves aliases empty; the registered model's map is authoritative.
        aliases=sorted(alias for alias, target in aliases.items() if str(target) == str(version.version)),
        metrics=metrics,
        created_at=_timestamp(version.creation_timestamp),
    )


def _run_metrics(registry: Registry, run_id: str | None) -> dict[str, float] | None:
    if not run_id:
        return None
    try:
        return dict(registry.mlflow.get_run(run_id).data.metrics)
    except Exception as exc:  # a deleted run must not hide the version itself
        log.info("metrics of run %s are unreadable: %s", run_id, exc)
        return None


def _registered_model(registry: Registry, name: str) -> RegisteredModel:
    with _mlflow_errors(f"model {name!r} is not in the registry"):
        return registry.mlflow.get_registered_model(name)


def list_models(*, registry: Registry) -> list[ModelPublic]:
    models: list[ModelPublic] = []
    page_token: str | None = None
    with _mlflow_errors("no registered models"):
        while True:
            page = registry.mlflow.search_registered_models(max_results=_PAGE_SIZE, page_token=page_token)
            models.extend(_model_public(model) for model in page)
            page_token = page.token
            if not page_token:
                break
    return sorted(models, key=lambda model: model.name)


def get_model(*, registry: Registry, name: str) -> ModelPublic:
    return _model_public(_registered_model(registry, name))


def _name_filter(name: str) -> str:
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise InvalidInput(f"model name {name!r} contains both quote characters and cannot be searched")


def list_versions(*, registry: Registry, name: str) -> list[VersionPublic]:
    model = _registered_model(registry, name)
    versions: list[ModelVersion] = []
    page_token: str | None = None
    with _mlflow_errors(f"model {name!r} is not in the registry"):
        while True:
            page = registry.mlflow.search_model_versions(
                _name_filter(name), max_results=_PAGE_SIZE, page_token=page_token
            )
            versions.extend(page)
            page_token = page.token
            if not page_token:
                break
    versions.sort(key=lambda v: int(v.version), reverse=True)
    run_ids = sorted({v.run_id for v in versions if v.run_id})
    with ThreadPoolExecutor(max_workers=registry.settings.metrics_fetch_concurrency) as pool:
        metrics = pool.map(lambda run_id: _run_metrics(registry, run_id), run_ids)
        metrics_by_run = dict(zip(run_ids, metrics, strict=True))
    return [
        _version_public(v, model.aliases or {}, metrics_by_run.get(v.run_id) if v.run_id else None)
        for v in versions
    ]


def _model_version(registry: Registry, name: str, version: str) -> tuple[RegisteredModel, ModelVersion]:
    version = _checked_version(name, version)
    model = _registered_model(registry, name)  # a 404 that names the model rather than the version
    with _mlflow_errors(f"model {name!r} has no version {version}"):
        return model, registry.mlflow.get_model_version(name, version)


def get_version(*, registry: Registry, name: str, version: str) -> VersionPublic:
    model, found = _model_version(registry, name, version)
    return _version_public(found, model.aliases or {}, _run_metrics(registry, found.run_id))


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


def promote_version(
    *, registry: Registry, name: str, version: str, alias: str, reason: str | None, actor: str,
    weight: float | None = None,
) -> PromotePublic:
    """Point ``alias`` of ``name`` at ``version``, audit it, and announce it to the platform.

    For the canary alias, ``weight`` (else the model's current one, else the default) is stored
    as the model's ``shipyard.canary_weight`` tag in the same request, before the alias moves.
    """
    if weight is not None and alias != CANARY:
        raise InvalidInput(f"a weight applies to the '{CANARY}' alias only, not to {alias!r}")
    with registry.promote_lock:
        model, target = _model_version(registry, name, version)
        previous = (model.aliases or {}).get(alias)
        previous_version = str(previous) if previous is not None else None
        if alias == CANARY and weight is None:
            weight = canary_weight(model.tags) or DEFAULT_CANARY_WEIGHT
        # The audit row is flushed before MLflow is touched and committed after: a database that
        # cannot write fails the promotion instead of leaving an alias move nobody recorded.
        with registry.database.session() as session:
            session.add(
                AuditRecord(
                    model=name, version=str(target.version), alias=alias,
                    previous_version=previous_version, action="promote", weight=weight, actor=actor,
                    reason=reason,
                )
            )
            session.flush()
            with _mlflow_errors(f"model {name!r} has no version {target.version}"):
                if weight is not None:
                    # First, so that whoever sees the new canary also sees its weight.
                    registry.mlflow.set_registered_model_tag(name, TAG_CANARY_WEIGHT, repr(weight))
                registry.mlflow.set_registered_model_alias(name, alias, str(target.version))
    log.info(
        "alias moved", extra={"model": name, "alias": alias, "version": target.version,
                              "previous_version": previous_version, "actor": actor, "weight": weight},
    )
    _announce(registry, ModelAliasMoved(
        model=name, alias=alias, version=str(target.version), previous_version=previous_version,
        weight=weight, actor=actor,
    ))
    return PromotePublic(
        model=name, version=str(target.version), alias=alias, previous_version=previous_version,
        weight=weight,
    )


def delete_alias(
    *, registry: Registry, name: str, alias: str, reason: str | None, actor: str
) -> AliasRemovedPublic:
    """Delete ``alias`` of ``name`` (a canary or shadow taken down), audit it, announce it."""
    with registry.promote_lock:
        model = _registered_model(registry, name)
        previous = (model.aliases or {}).get(alias)
        if previous is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        previous_version = str(previous)
        with registry.database.session() as session:
            session.add(
                AuditRecord(
                    model=name, version=previous_version, alias=alias, previous_version=previous_version,
                    action="remove", actor=actor, reason=reason,
                )
            )
            session.flush()
            with _mlflow_errors(f"model {name!r} has no alias {alias!r}"):
                registry.mlflow.delete_registered_model_alias(name, alias)
    log.info("alias removed", extra={"model": name, "alias": alias, "previous_version": previous_version,
                                     "actor": actor})
    _announce(registry, ModelAliasRemoved(
        model=name, alias=alias, previous_version=previous_version, actor=actor
    ))
    return AliasRemovedPublic(model=name, alias=alias, previous_version=previous_version)


def list_audit(*, registry: Registry, model: str | None, limit: int) -> list[AuditPublic]:
    statement = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.id.desc()).limit(limit)
    if model is not None:
        statement = statement.where(AuditRecord.model == model)
    with registry.database.session() as session:
        rows = session.scalars(statement).all()
    return [AuditPublic.model_validate(row, from_attributes=True) for row in rows]
