"""Reads: models, versions, one version in full, and two versions compared.

A version's metrics are its ``shipyard.metric.*`` tags, written by the trainer for the model it
registered (with early stopping's restore_best, the best epoch's figures), not the run's summary,
which holds the last epoch's. Only versions registered without those tags fall back to the run.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion, RegisteredModel

from services.registry.core.registry import Registry
from services.registry.core.schemas import (
    ComparePublic,
    Lineage,
    MetricDelta,
    ModelPage,
    ModelPublic,
    ParamChange,
    VersionDetail,
    VersionPage,
    VersionPublic,
)
from services.registry.core.store import Store
from shipyard_common.lineage import (
    METRIC_TAG_PREFIX,
    MODEL_ARTIFACT_PATH,
    MODEL_CARD_FILE,
    REPORTS_ARTIFACT_PATH,
    TAG_ARCHIVED,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_FRAMEWORK,
    TAG_GIT_COMMIT,
    TAG_JOB_ID,
    TAG_PARENT,
    TAG_SIGNATURE,
    TAG_TASK,
)

# Runs read in parallel for versions registered without metric tags.
_RUN_FETCH_CONCURRENCY = 8


def timestamp(milliseconds: int | None) -> datetime | None:
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def model_public(model: RegisteredModel) -> ModelPublic:
    latest = [v.version for v in (model.latest_versions or [])]
    return ModelPublic(
        name=model.name,
        description=model.description or None,
        aliases={alias: str(version) for alias, version in (model.aliases or {}).items()},
        latest_version=str(max(latest, key=int)) if latest else None,
        tags=dict(model.tags or {}),
        created_at=timestamp(model.creation_timestamp),
        updated_at=timestamp(model.last_updated_timestamp),
    )


def _json_tag(tags: dict[str, str], key: str) -> Any:
    try:
        return json.loads(tags[key]) if key in tags else None
    except ValueError:
        return None


def tagged_metrics(tags: dict[str, str]) -> dict[str, float] | None:
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return metrics or None


def version_public(version: ModelVersion, aliases: dict[str, str]) -> VersionPublic:
    tags = dict(version.tags or {})
    metrics = tagged_metrics(tags)
    formats = _json_tag(tags, TAG_FORMATS)
    signature = _json_tag(tags, TAG_SIGNATURE)
    return VersionPublic(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or None,
        status=version.status,
        source=version.source,
        description=version.description or None,
        tags=tags,
        # search_model_versions leaves aliases empty; the registered model's map is authoritative.
        aliases=sorted(alias for alias, target in aliases.items() if str(target) == str(version.version)),
        metrics=metrics,
        metrics_source="version" if metrics is not None else None,
        lineage=Lineage(
            dataset=tags.get(TAG_DATASET),
            dataset_rev=tags.get(TAG_DATASET_REV),
            job_id=tags.get(TAG_JOB_ID),
            git_commit=tags.get(TAG_GIT_COMMIT),
            parent=tags.get(TAG_PARENT),
            framework=tags.get(TAG_FRAMEWORK),
            task=tags.get(TAG_TASK),
            run_id=version.run_id or None,
        ),
        signature=signature if isinstance(signature, dict) else None,
        exports=[str(f) for f in formats]
        if isinstance(formats, list)
        else ([tags[TAG_FORMAT]] if TAG_FORMAT in tags else []),
        archived=tags.get(TAG_ARCHIVED) == "true",
        created_at=timestamp(version.creation_timestamp),
    )


def fill_run_metrics(store: Store, versions: list[VersionPublic]) -> None:
    """Give versions registered without metric tags their run's latest metrics (one read per run)."""
    missing = sorted({v.run_id for v in versions if v.metrics is None and v.run_id})
    if not missing:
        return
    with ThreadPoolExecutor(max_workers=min(_RUN_FETCH_CONCURRENCY, len(missing))) as pool:
        runs = dict(zip(missing, pool.map(store.run, missing), strict=True))
    for version in versions:
        run = runs.get(version.run_id or "")
        if version.metrics is None and run is not None:
            version.metrics = dict(run.data.metrics)
            version.metrics_source = "run"


def list_models(*, store: Store, max_results: int, page_token: str | None) -> ModelPage:
    page = store.models(max_results=max_results, page_token=page_token)
    return ModelPage(models=[model_public(m) for m in page.items], next_page_token=page.token)


def get_model(*, store: Store, name: str) -> ModelPublic:
    return model_public(store.model(name))


def list_versions(*, store: Store, name: str, max_results: int, page_token: str | None) -> VersionPage:
    model = store.model(name)  # a 404 that names the model; its aliases, which the search lacks
    page = store.versions(name, max_results=max_results, page_token=page_token)
    versions = [version_public(v, model.aliases or {}) for v in page.items]
    fill_run_metrics(store, versions)
    return VersionPage(versions=versions, next_page_token=page.token)


def get_version(*, store: Store, name: str, version: str) -> VersionPublic:
    model = store.model(name)
    found = version_public(store.version(name, version), model.aliases or {})
    fill_run_metrics(store, [found])
    return found


def version_detail(*, registry: Registry, name: str, version: str, authorization: str) -> VersionDetail:
    """A version with its run's params, model card, report files, serving status and drift verdict.

    ``authorization``: the caller's credentials, for the reads from serving and the monitor.
    """
    store = registry.store
    with ThreadPoolExecutor(max_workers=2) as pool:
        serving = pool.submit(registry.peers.serving, authorization)
        drift = pool.submit(registry.peers.drift, authorization)
        base = get_version(store=store, name=name, version=version)
        detail = VersionDetail(
            **base.model_dump(), serving=serving.result().get(name), drift=drift.result().get(name)
        )
    if base.run_id:
        run = store.run(base.run_id)
        if run is not None:
            detail.params = dict(run.data.params)
            detail.experiment_id = str(run.info.experiment_id)
        card = store.artifact(base.run_id, f"{MODEL_ARTIFACT_PATH}/{MODEL_CARD_FILE}")
        detail.model_card = card.decode("utf-8", "replace") if card is not None else None
        detail.reports = sorted(store.list_artifacts(base.run_id, REPORTS_ARTIFACT_PATH))
    return detail


def _signature_changes(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    if a == b:
        return []
    if a is None or b is None:
        return ["only one of the versions records a signature"]
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {json.dumps(a.get(key))} → {json.dumps(b.get(key))}")
    return changes


def compare(*, store: Store, name: str, a: str, b: str) -> ComparePublic:
    """Version ``b`` against version ``a``: metric deltas (b − a), differing params, data, signature."""
    model = store.model(name)
    aliases = model.aliases or {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        found_a, found_b = pool.map(lambda v: version_public(store.version(name, v), aliases), [a, b])
        fill_run_metrics(store, [found_a, found_b])
        runs = list(pool.map(lambda v: store.run(v.run_id) if v.run_id else None, [found_a, found_b]))
    params_a, params_b = ({} if r is None else dict(r.data.params) for r in runs)
    metrics_a, metrics_b = found_a.metrics or {}, found_b.metrics or {}
    metrics = {
        key: MetricDelta(
            a=metrics_a.get(key),
            b=metrics_b.get(key),
            delta=(metrics_b[key] - metrics_a[key]) if key in metrics_a and key in metrics_b else None,
        )
        for key in sorted(set(metrics_a) | set(metrics_b))
    }
    params = {
        key: ParamChange(a=params_a.get(key), b=params_b.get(key))
        for key in sorted(set(params_a) | set(params_b))
        if params_a.get(key) != params_b.get(key)
    }
    changes = _signature_changes(found_a.signature, found_b.signature)
    same_data = (found_a.lineage.dataset, found_a.lineage.dataset_rev) == (
        found_b.lineage.dataset,
        found_b.lineage.dataset_rev,
    ) and found_a.lineage.dataset_rev is not None
    return ComparePublic(
        model=name,
        a=found_a,
        b=found_b,
        metrics=metrics,
        params=params,
        same_dataset_revision=same_data,
        signature_changed=bool(changes),
        signature_changes=changes,
    )
