"""The UI's read pages: models, a model, a version, two versions compared, its report images.

Plain ``def`` routes: MLflow's client and the database block, so FastAPI runs them in its thread
pool. Each page reads through the same core functions as the REST API; serving's status and the
monitor's verdicts are asked for with the signed-in user's own token.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from services.registry.core import approvals, catalog, promotion
from services.registry.core.registry import Registry
from services.registry.core.schemas import LiveVersion, Monitoring, ServingStatus, VersionPublic
from services.registry.params import ModelSearch, PageToken
from services.registry.ui.charts import Point, metric_chart
from services.registry.ui.web import Signed, UiRoute, registry_of, render
from shipyard_common.errors import NotFound
from shipyard_common.lineage import ALIASES, PRODUCTION, REPORTS_ARTIFACT_PATH

router = APIRouter(route_class=UiRoute)

MetricName = Annotated[str | None, Query(max_length=200)]
# The metric a model page charts first, when its versions have it.
PREFERRED_METRICS = ("val_accuracy", "accuracy", "val_f1_macro", "val_roc_auc", "val_r2", "val_mae",
                     "val_loss")
KEY_METRICS = 4


def peers(registry: Registry, authorization: str, model: str) -> tuple[
    Future[dict[str, ServingStatus]], Future[Monitoring]
]:
    """Serving's status and the monitor's view of ``model``, asked for at once while the page reads MLflow."""
    pool = registry.store.pool
    return (pool.submit(registry.peers.serving, authorization),
            pool.submit(registry.peers.monitoring, authorization, model))


def headline_live(monitoring: Monitoring, production: str | None) -> LiveVersion | None:
    """The live metrics a model page leads with: production's, else the newest labelled version's."""
    live = monitoring.live or []
    return next((v for v in live if v.version == str(production)), live[0] if live else None)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: Signed, page_token: PageToken = None,
                search: ModelSearch = None) -> HTMLResponse:
    """Every model (or those whose name contains ``search``) with who holds production, canary (and its
    share) and staging, and drift."""
    registry = registry_of(request)
    drift = registry.store.pool.submit(registry.peers.drift, session.authorization)
    page = catalog.list_models(store=registry.store, max_results=registry.settings.page_size,
                               page_token=page_token, search=search)
    verdicts = drift.result()
    return render(request, "models.html", title="Models", page=page, drift=verdicts, search=search or "",
                  first_page=page_token is None, canary_weight=promotion.canary_weight)


def metric_names(versions: list[VersionPublic]) -> list[str]:
    """The metrics the versions have, the usual headline metrics first."""
    found = sorted({key for v in versions for key in (v.metrics or {})})
    return sorted(found, key=lambda m: (PREFERRED_METRICS.index(m) if m in PREFERRED_METRICS else 99, m))


def chart_points(versions: list[VersionPublic], metric: str, production: str | None) -> list[Point]:
    ordered = sorted(versions, key=lambda v: int(v.version))
    return [Point(v.version, v.metrics[metric], v.version == production) for v in ordered
            if v.metrics and math.isfinite(v.metrics.get(metric, math.nan))]


@router.get("/models/{name}", response_class=HTMLResponse)
def model_page(request: Request, name: str, session: Signed, metric: MetricName = None,
               page_token: PageToken = None) -> HTMLResponse:
    """A model: versions and key metrics, a chart, serving, drift, live metrics and retraining triggers,
    pending requests, compare, the gate."""
    registry = registry_of(request)
    serving, watched = peers(registry, session.authorization, name)
    # The database's reads run while MLflow answers.
    pool = registry.store.pool
    pending = pool.submit(approvals.list_requests, registry=registry, model=name, state="pending", limit=50)
    gate = pool.submit(promotion.get_gate, registry=registry, name=name)
    unaudited = pool.submit(request.app.state.alias_reconciler.unaudited, name)
    model, page = catalog.model_and_versions(store=registry.store, name=name, page_token=page_token,
                                             max_results=registry.settings.page_size)
    status, monitoring = serving.result().get(name), watched.result()
    metrics = metric_names(page.versions)
    chosen = metric if metric in metrics else (metrics[0] if metrics else None)
    columns = ([chosen] if chosen else []) + [m for m in metrics if m != chosen][:KEY_METRICS - 1]
    points = chart_points(page.versions, chosen, model.aliases.get(PRODUCTION)) if chosen else []
    chart = metric_chart(points, chosen) if chosen else None
    return render(request, "model.html", title=name, model=model, page=page, first_page=page_token is None,
                  metrics=metrics, chosen=chosen, columns=columns, chart=chart, serving=status,
                  drift=monitoring.drift, monitoring=monitoring,
                  live=headline_live(monitoring, model.aliases.get(PRODUCTION)),
                  pending=pending.result(), gate=gate.result(), aliases=ALIASES,
                  unaudited=unaudited.result().unaudited,
                  canary_weight=promotion.canary_weight(model.tags))


def mlflow_run_url(registry: Registry, experiment_id: str | None, run_id: str | None) -> str | None:
    if not experiment_id or not run_id:
        return None
    base = registry.settings.platform.mlflow_tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base.startswith("http") else None


def parent_link(parent: str | None) -> str | None:
    """``model/3`` → the version's page; ``pretrained:…`` has none."""
    if not parent or "/" not in parent or parent.startswith("pretrained:"):
        return None
    model, _, version = parent.rpartition("/")
    return f"/ui/models/{model}/versions/{version}" if version.isdigit() else None


def report_images(reports: list[str]) -> list[str]:
    return [PurePosixPath(path).name for path in reports if path.lower().endswith(".png")]


@router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
def version_page(request: Request, name: str, version: str, session: Signed) -> HTMLResponse:
    """One version: what a reviewer reads before a promotion, and the forms the role may use."""
    registry = registry_of(request)
    detail = catalog.version_detail(registry=registry, name=name, version=version,
                                    authorization=session.authorization)
    model = catalog.get_model(store=registry.store, name=name)
    pending = [r for r in approvals.list_requests(registry=registry, model=name, state="pending", limit=100)
               if r.version == detail.version]
    return render(request, "version.html", title=f"{name} v{detail.version}", v=detail, model=model,
                  pending=pending, images=report_images(detail.reports), aliases=ALIASES,
                  mlflow_url=mlflow_run_url(registry, detail.experiment_id, detail.run_id),
                  parent_url=parent_link(detail.lineage.parent),
                  canary_weight=promotion.canary_weight(model.tags))


@router.get("/models/{name}/versions/{version}/reports/{file:path}")
def report_file(request: Request, name: str, version: str, file: str, _: Signed) -> Response:
    """A report image of the version's run; only a name the run's ``reports/`` lists is served."""
    registry = registry_of(request)
    found = catalog.get_version(store=registry.store, name=name, version=version)
    listed = set(report_images(registry.store.list_artifacts(found.run_id, REPORTS_ARTIFACT_PATH))
                 if found.run_id else [])
    if file not in listed:
        raise NotFound(f"{name} v{found.version} has no report image named {file!r}")
    data = registry.store.artifact(found.run_id or "", f"{REPORTS_ARTIFACT_PATH}/{file}")
    if data is None:
        raise NotFound(f"the report {file!r} of {name} v{found.version} cannot be read")
    return Response(data, media_type="image/png", headers={
        "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'"})


@router.get("/models/{name}/compare", response_class=HTMLResponse)
def compare_page(request: Request, name: str, _: Signed, a: Annotated[str, Query(max_length=12)] = "",
                 b: Annotated[str, Query(max_length=12)] = "") -> HTMLResponse:
    """Version ``b`` against ``a``: metric deltas, the params that differ, data and signature."""
    registry = registry_of(request)
    versions = catalog.list_versions(store=registry.store, name=name, page_token=None,
                                     max_results=registry.settings.page_size).versions
    result: Any = None
    if a and b:
        result = catalog.compare(store=registry.store, name=name, a=a, b=b, known=versions)
    return render(request, "compare.html", title=f"Compare {name}", name=name, versions=versions, a=a, b=b,
                  result=result)
