"""The deployments process: serves every flow of ``pipelines.catalog.FLOWS`` as ``<flow>/shipyard``
(``batch_predict`` among them, which ``shipyard predict-batch`` also runs in its own process).

``python -m pipelines.serve`` (``shipyard up`` starts it, with ``PREFECT_API_URL`` pointing at the
platform's Prefect server). One ``prefect.serve`` process: it registers the deployments, polls the
server for their scheduled and manually created runs, and runs each in a subprocess of its own, so a
crashing flow never takes it down. No work pool, worker type or code storage to configure: the
flows run from this checkout with this environment (its ``SHIPYARD_*`` settings and
``SHIPYARD_API_TOKEN``).

Registering a deployment again replaces its schedules, so the schedules the server holds (set with
``shipyard pipelines schedule``) are read first and registered again with it: they survive restarts.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound

from pipelines.catalog import FLOWS
from pipelines.flows import prefect_api
from pipelines.runs import DEPLOYMENT
from shipyard_common.settings import PlatformSettings, disable_telemetry

# How many flow runs one deployments process runs at once.
RUN_LIMIT = 4


def kept_schedules(flow: str) -> list[DeploymentScheduleCreate]:
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{flow}/{DEPLOYMENT}")
        except ObjectNotFound:
            return []
    return [
        DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters, slug=s.slug)
        for s in deployment.schedules
    ]


def deployments() -> list[RunnerDeployment]:
    made = []
    for name, flow in FLOWS.items():
        schedules: Any = kept_schedules(name)
        made.append(flow.to_deployment(name=DEPLOYMENT, schedules=schedules, tags=["shipyard"]))
    return made


def main() -> None:
    disable_telemetry()
    logging.basicConfig(level=logging.INFO)
    platform = PlatformSettings()
    with prefect_api(platform):
        serve(*deployments(), pause_on_shutdown=False, limit=RUN_LIMIT, print_starting_message=True)


if __name__ == "__main__":
    main()
