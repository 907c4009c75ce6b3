from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import services.registry.core.tables  # noqa: F401  (the registry's tables, on Base before create_all)
from services.registry.api.router import router
from services.registry.core.reconcile import AliasReconciler, ReconcileMetrics, reconcile_until
from services.registry.core.registry import create_registry
from services.registry.core.tables import upgrade_audit_table
from services.registry.settings import RegistrySettings
from services.registry.ui.router import STATIC_DIR, ui_router
from shipyard_common.db import Database
from shipyard_common.edge import install_edge
from shipyard_common.mlflow_client import apply_mlflow_client_limits
from shipyard_common.web import install_common, mlflow_health_check


def create_app(settings: RegistrySettings) -> FastAPI:
    platform = settings.platform
    # A call to MLflow fails within seconds when it is down, not after minutes of retries.
    apply_mlflow_client_limits(platform)
    database = Database(platform.database_url)
    registry = create_registry(settings=settings, database=database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database.create_tables()
        upgrade_audit_table(database.engine)
        reconciler: AliasReconciler = app.state.alias_reconciler
        reconciler.refresh()
        stop = threading.Event()
        interval = settings.alias_reconcile_interval_s
        loop = threading.Thread(target=reconcile_until, args=(stop, reconciler, interval),
                                name="alias-reconcile", daemon=True)
        if interval > 0:
            loop.start()
        try:
            yield
        finally:
            app.state.ready = False
            stop.set()
            if loop.is_alive():
                loop.join(timeout=10)
            registry.peers.close()
            registry.store.close()
            database.dispose()

    app = FastAPI(title="Shipyard registry", version="0.1.0", lifespan=lifespan)
    readiness = {"database": database.ping}
    if platform.mlflow_tracking_uri.startswith(("http://", "https://")):
        readiness["mlflow"] = mlflow_health_check(platform.mlflow_tracking_uri)
    metrics = install_common(app, service="registry", platform=platform, readiness_checks=readiness)
    install_edge(app, settings, service="registry")
    app.state.registry = registry
    # MLflow's aliases against the audit: what moved without the registry is recorded and alerted.
    app.state.alias_reconciler = AliasReconciler(registry, ReconcileMetrics(metrics))
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.include_router(ui_router)
    return app
