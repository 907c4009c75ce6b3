"""Start, follow and schedule Shipyard's deployed flows on the platform's Prefect server.

Each flow of ``pipelines.catalog.FLOWS`` is served as the deployment ``<flow>/shipyard`` by the
deployments process (``python -m pipelines.serve``, started by ``shipyard up``). Starting a run
only creates it on the server (one API call) and returns its id: the deployments process picks it
up and runs it, so a caller such as an HTTP handler never waits for the flow.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

from pipelines import DEPLOYMENT
from pipelines.catalog import FLOWS
from pipelines.flows import RESULT_KEY, prefect_api
from shipyard_common.settings import PlatformSettings


class PipelineError(RuntimeError):
    """An unknown pipeline, or a Prefect server that does not answer."""


def deployment_name(flow: str) -> str:
    if flow not in FLOWS:
        raise PipelineError(f"no pipeline {flow!r}; the pipelines are {', '.join(FLOWS)}")
    return f"{flow}/{DEPLOYMENT}"


def ui_url(platform: PlatformSettings, run_id: str | None = None) -> str:
    base = platform.prefect_api_url.rstrip("/").removesuffix("/api")
    return f"{base}/runs/flow-run/{run_id}" if run_id else base


def start_pipeline(flow: str, parameters: dict[str, Any], platform: PlatformSettings | None = None) -> str:
    """Create a run of ``flow``'s deployment with ``parameters``; return its id at once."""
    with prefect_api(platform), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name(flow))
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return str(run.id)


async def astart_pipeline(
    flow: str, parameters: dict[str, Any], platform: PlatformSettings | None = None
) -> str:
    """:func:`start_pipeline` for async code (an HTTP handler): awaits only the API calls."""
    with prefect_api(platform):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(deployment_name(flow))
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return str(run.id)


def read_run(run_id: str, platform: PlatformSettings | None = None) -> FlowRun:
    with prefect_api(platform), get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(run_id))


def wait_for_run(run_id: str, platform: PlatformSettings | None = None, *, timeout_s: float = 1800.0,
                 poll_interval_s: float = 1.0) -> FlowRun:
    """Poll the run until its state is final; return it (``run.state``: Completed, Failed, …)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_run(run_id, platform)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run_id} is still {run.state_name} after {timeout_s:g}s")
        time.sleep(poll_interval_s)


def failure_message(run_id: str, platform: PlatformSettings | None = None) -> str:
    """Which task of a failed run failed, and why (the failed task runs' state messages)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with prefect_api(platform), get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                      sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    failed = [t for t in tasks if t.state is not None and t.state.is_failed()]
    lines = [f"task {t.name} failed: {t.state.message}" for t in failed if t.state is not None]
    state = run.state.message if run.state is not None else ""
    return "\n".join([*lines, state or ""]).strip()


def list_pipelines(platform: PlatformSettings | None = None, *, runs: int = 5) -> list[dict[str, Any]]:
    """Each deployment with its schedules and its latest runs (those that started: a schedule keeps
    many future runs waiting, which would hide them)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    not_waiting = FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])
    started = FlowRunFilter(state=FlowRunFilterState(type=not_waiting))
    rows: list[dict[str, Any]] = []
    with prefect_api(platform), get_client(sync_client=True) as client:
        for flow in FLOWS:
            try:
                deployment = client.read_deployment_by_name(deployment_name(flow))
            except Exception:  # not served yet
                rows.append({"name": flow, "deployment": None, "schedules": [], "runs": []})
                continue
            latest = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=runs,
            )
            rows.append({
                "name": flow,
                "deployment": str(deployment.id),
                "schedules": [_describe(s.schedule) + ("" if s.active else " (paused)")
                              for s in deployment.schedules],
                "runs": [{"id": str(r.id), "name": r.name, "state": r.state_name,
                          "start": r.start_time.isoformat() if r.start_time else None} for r in latest],
            })
    return rows


def schedule_pipeline(
    flow: str, *, cron: str | None = None, interval_s: float | None = None,
    parameters: dict[str, Any] | None = None, platform: PlatformSettings | None = None,
) -> str:
    """Add a schedule (a cron line, or an interval in seconds) with its parameters to ``flow``'s
    deployment; return its description. Schedules live in Prefect's database and survive restarts."""
    if (cron is None) == (interval_s is None):
        raise PipelineError("give exactly one of --cron or --interval")
    schedule: Any
    if cron is not None:
        schedule = CronSchedule(cron=cron)
    else:
        schedule = IntervalSchedule(interval=dt.timedelta(seconds=float(interval_s or 0)))
    with prefect_api(platform), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name(flow))
        client.create_deployment_schedules(deployment.id, [(schedule, True)], parameters=parameters or {})
    return _describe(schedule)


def unschedule_pipeline(flow: str, platform: PlatformSettings | None = None) -> int:
    """Remove every schedule of ``flow``'s deployment (and the runs they scheduled); return how many."""
    with prefect_api(platform), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name(flow))
        schedules = client.read_deployment_schedules(deployment.id)
        for schedule in schedules:
            client.delete_deployment_schedule(deployment.id, schedule.id)
    return len(schedules)


def _describe(schedule: Any) -> str:
    if isinstance(schedule, CronSchedule):
        return f"cron {schedule.cron}"
    if isinstance(schedule, IntervalSchedule):
        return f"every {schedule.interval.total_seconds():g}s"
    return str(schedule)


def read_result(run_id: str, platform: PlatformSettings | None = None) -> dict[str, Any] | None:
    """What a run's flow returned (``ingest``: dataset, rev, rows; ``train_and_deploy`` and ``retrain``:
    job_id, model_version, request …), kept as its ``RESULT_KEY`` artifact; None until it finished."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    only = ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_KEY]),
                          flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
    with prefect_api(platform), get_client(sync_client=True) as client:
        # Every filter given: the server refuses the nulls the client sends for those left out. An
        # empty task run filter still needs a task run: the result is kept by a task (keep_result).
        found = client.read_artifacts(artifact_filter=only, flow_run_filter=FlowRunFilter(),
                                      task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
                                      limit=1, offset=0)
    if not found:
        return None
    data = found[0].data
    value = json.loads(data) if isinstance(data, str) else data
    return value if isinstance(value, dict) else None
