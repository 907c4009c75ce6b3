"""Reads: models, versions, one version in full, and two versions compared.

A version's metrics are its ``shipyard.metric.*`` tags, written by the trainer for the model it
registered (with early stopping's restore_best, the best epoch's figures), not the run's summary,
which holds the last epoch's. Only versions registered without those tags fall back to the run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import partial
from typing import Any

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
from services.registry.core.store import ModelRecord, Store, VersionRecord, checked_version
from shipyard_common.lineage import (
    METRIC_TAG_PREFIX,
    MODEL_ARTIFACT_PATH,
    MODEL_CARD_FILE,
    REPORTS_ARTIFACT_PATH,
    TAG_ARCHIVED,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_SIGNATURE,
    read_lineage,
)

# Runs read in parallel for versions registered without metric tags.
_RUN_FETCH_CONCURRENCY = 8


def timestamp(milliseconds: int | None) -> datetime | None:
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def model_public(model: ModelRecord) -> ModelPublic:
    return ModelPublic(
        name=model.name,
        description=model.description,
        aliases=dict(model.aliases),
        latest_version=model.latest_version,
        tags=dict(model.tags),
        created_at=timestamp(model.created_ms),
        updated_at=timestamp(model.updated_ms),
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


def version_public(version: VersionRecord, aliases: dict[str, str]) -> VersionPublic:
    tags = dict(version.tags)
    metrics = tagged_metrics(tags)
    formats = _json_tag(tags, TAG_FORMATS)
    signature = _json_tag(tags, TAG_SIGNATURE)
    # Built without validation: every field is typed here already, and a page builds fifty of them.
    return VersionPublic.model_construct(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        status=version.status,
        source=version.source,
        description=version.description,
        tags=tags,
        # A version search leaves aliases out; the registered model's map is authoritative.
        aliases=sorted(alias for alias, target in aliases.items() if str(target) == version.version),
        metrics=metrics,
        metrics_source="version" if metrics is not None else None,
        lineage=Lineage(**read_lineage(tags), run_id=version.run_id),
        signature=signature if isinstance(signature, dict) else None,
        exports=[str(f) for f in formats]
        if isinstance(formats, list)
        else ([tags[TAG_FORMAT]] if TAG_FORMAT in tags else []),
        archived=tags.get(TAG_ARCHIVED) == "true",
        created_at=timestamp(version.created_ms),
    )


def fill_run_metrics(store: Store, versions: list[VersionPublic]) -> None:
    """Give versions registered without metric tags their run's latest metrics (one read per run)."""
    missing = sorted({v.run_id for v in versions if v.metrics is None and v.run_id})
    if not missing:
        return
    runs = dict(zip(missing, store.at_once(*(partial(store.run, run_id) for run_id in missing)), strict=True))
    for version in versions:
        run = runs.get(version.run_id or "")
        if version.metrics is None and run is not None:
            version.metrics = dict(run.metrics)
            version.metrics_source = "run"


# What a model search may hold: the characters of a model's name (so it never needs quoting in
# MLflow's filter), up to SEARCH_MAX of them.
SEARCH_PATTERN = r"^[A-Za-z0-9_.-]+$"
SEARCH_MAX = 100


def list_models(
    *, store: Store, max_results: int, page_token: str | None, search: str | None = None
) -> ModelPage:
    """One page of the models by name; with ``search``, only those whose name contains it (any case)."""
    page = store.models(max_results=max_results, page_token=page_token, search=search)
    found = [m for m in page.items if not search or search.lower() in m.name.lower()]
    return ModelPage(models=[model_public(m) for m in found], next_page_token=page.token)


def get_model(*, store: Store, name: str) -> ModelPublic:
    return model_public(store.model(name))


def model_and_versions(
    *, store: Store, name: str, max_results: int, page_token: str | None
) -> tuple[ModelPublic, VersionPage]:
    """The model (a 404 that names it; the aliases, which the search lacks) and one page of its
    versions, newest first: two MLflow reads, made at once."""
    model, found = store.at_once(
        partial(store.model, name),
        partial(store.versions, name, max_results=max_results, page_token=page_token),
    )
    aliases = model.aliases
    versions = [version_public(v, aliases) for v in found.items]
    fill_run_metrics(store, versions)
    return model_public(model), VersionPage(versions=versions, next_page_token=found.token)


def list_versions(*, store: Store, name: str, max_results: int, page_token: str | None) -> VersionPage:
    return model_and_versions(store=store, name=name, max_results=max_results, page_token=page_token)[1]


def get_version(*, store: Store, name: str, version: str) -> VersionPublic:
    model, found = store.at_once(partial(store.model, name), partial(store.version, name, version))
    public = version_public(found, model.aliases)
    fill_run_metrics(store, [public])
    return public


def version_detail(*, registry: Registry, name: str, version: str, authorization: str) -> VersionDetail:
    """A version with its run's params, model card, report files, serving status and drift verdict.

    ``authorization``: the caller's credentials, for the reads from serving and the monitor.
    """
    store = registry.store
    model, found, serving, drift = store.at_once(
        partial(store.model, name),
        partial(store.version, name, version),
        partial(registry.peers.serving, authorization),
        partial(registry.peers.drift, authorization),
    )
    base = version_public(found, model.aliases)
    detail = VersionDetail(**base.model_dump(), serving=serving.get(name), drift=drift.get(name))
    if base.run_id:
        run_id = base.run_id
        run, card, reports = store.at_once(
            partial(store.run, run_id),
            partial(store.artifact, run_id, f"{MODEL_ARTIFACT_PATH}/{MODEL_CARD_FILE}"),
            partial(store.list_artifacts, run_id, REPORTS_ARTIFACT_PATH),
        )
        if run is not None:
            detail.params, detail.experiment_id = dict(run.params), run.experiment_id
            if detail.metrics is None:
                detail.metrics, detail.metrics_source = dict(run.metrics), "run"
        detail.model_card = card.decode("utf-8", "replace") if card is not None else None
        detail.reports = sorted(reports)
    return detail


def _none() -> None:
    return None


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


def compare(
    *, store: Store, name: str, a: str, b: str, known: list[VersionPublic] | None = None
) -> ComparePublic:
    """Version ``b`` against version ``a``: metric deltas (b − a), differing params, data, signature.

    ``known``: versions already read (a page), so that only the missing ones and the two runs are.
    """
    wanted = [checked_version(name, a), checked_version(name, b)]
    on_page = {v.version: v for v in known or []}
    if not all(v in on_page for v in wanted):
        model, *records = store.at_once(
            partial(store.model, name), *(partial(store.version, name, v) for v in wanted)
        )
        on_page.update({r.version: version_public(r, model.aliases) for r in records})
    found_a, found_b = on_page[wanted[0]], on_page[wanted[1]]
    runs = store.at_once(*(partial(store.run, v.run_id) if v.run_id else _none for v in (found_a, found_b)))
    for side, run in zip((found_a, found_b), runs, strict=True):
        if side.metrics is None and run is not None:
            side.metrics, side.metrics_source = dict(run.metrics), "run"
    params_a, params_b = ({} if r is None else dict(r.params) for r in runs)
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
