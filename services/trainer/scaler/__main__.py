"""``python -m services.trainer.scaler``: read the settings, check the Deployment, then tick until
SIGTERM or SIGINT. Exits 2 on bad settings and 1 when the Deployment cannot be read at start."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from pydantic import ValidationError

from services.trainer.scaler.controller import Scaler
from services.trainer.scaler.kube import KubernetesError, WorkerDeployment, api_client
from services.trainer.scaler.metrics import ScalerMetrics, serve_metrics
from services.trainer.scaler.settings import ScalerSettings
from shipyard_common.db import Database, where
from shipyard_common.logging import configure_logging

log = logging.getLogger("shipyard.trainer.scaler")


def main() -> int:
    try:
        settings = ScalerSettings()  # type: ignore[call-arg]  # the deployment comes from the environment
    except ValidationError as exc:
        print(f"shipyard scaler: invalid settings (SHIPYARD_SCALER_*):\n{exc}", file=sys.stderr)
        return 2
    platform = settings.platform
    configure_logging("trainer-scaler", level=platform.log_level, json_lines=platform.log_json)
    deployment = WorkerDeployment(api_client(), namespace=settings.namespace, name=settings.deployment,
                                  timeout_s=settings.request_timeout_s)
    try:
        replicas = deployment.check()
    except KubernetesError as exc:
        log.error("%s", exc.message)
        return 1
    database = Database(platform.database_url)
    metrics = ScalerMetrics(settings.queue)
    serve_metrics(metrics, host=settings.metrics_host, port=settings.metrics_port)
    log.info("scaling deployment %s/%s (%d replicas now) between %d and %d from queue %r in %s, "
             "every %.0f s, cooldown %.0f s", settings.namespace, settings.deployment, replicas,
             settings.min_replicas, settings.max_replicas, settings.queue, where(database.url),
             settings.interval_s, settings.cooldown_s)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        Scaler(settings, database=database, deployment=deployment, metrics=metrics).run(stop)
    finally:
        database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
