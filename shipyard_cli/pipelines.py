"""``shipyard pipelines``: run, list, schedule and unschedule Shipyard's Prefect deployments."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from shipyard_cli.common import console, fail, platform_settings

pipelines_app = typer.Typer(
    help="Run and schedule the Prefect flows (ingest, train_and_deploy, retrain, batch_predict).",
    no_args_is_help=True)
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="A flow parameter, KEY=VALUE (VALUE read as JSON when it parses)."),
]


def parse_params(items: list[str] | None) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"parameter {item!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


@pipelines_app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="ingest, train_and_deploy, retrain or batch_predict.")],
    param: ParamOption = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run to end and print its state.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 1800.0,
) -> None:
    """Start a run of a pipeline's deployment; print its id and its page in Prefect's UI (with --wait,
    how it ended and what its flow returned)."""
    from pipelines.runs import (
        PipelineError,
        failure_message,
        read_result,
        start_pipeline,
        ui_url,
        wait_for_run,
    )
    from shipyard_common.errors import InvalidInput
    from shipyard_common.paths import check_flow_names

    platform = platform_settings()
    try:
        run_id = start_pipeline(name, check_flow_names(parse_params(param)), platform)
    except (PipelineError, InvalidInput) as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"cannot start {name} on Prefect at {platform.prefect_api_url}: {exc} "
             "(is 'shipyard up' running?)")
    console.print(f"run {run_id} of {name} started: {ui_url(platform, run_id)}")
    if wait:
        finished = wait_for_run(run_id, platform, timeout_s=timeout)
        console.print(f"run {run_id}: {finished.state_name}")
        if finished.state is None or not finished.state.is_completed():
            fail(failure_message(run_id, platform) or f"run {run_id} ended {finished.state_name}")
        result = read_result(run_id, platform)
        if result is not None:
            console.print_json(json.dumps(result, default=str))


@pipelines_app.command("list")
def list_() -> None:
    """The pipelines' deployments, schedules and latest runs."""
    from pipelines.runs import list_pipelines, ui_url

    platform = platform_settings()
    try:
        rows = list_pipelines(platform)
    except Exception as exc:
        fail(f"Prefect at {platform.prefect_api_url} does not answer: {exc} (is 'shipyard up' running?)")
    table = Table("pipeline", "deployment", "schedules", "latest runs")
    for row in rows:
        runs = "\n".join(f"{r['name']} {r['state']} {r['start'] or ''}" for r in row["runs"])
        table.add_row(row["name"], "served" if row["deployment"] else "[red]not served[/red]",
                      "\n".join(row["schedules"]) or "-", runs or "-")
    console.print(table)
    console.print(f"Prefect UI: {ui_url(platform)}")


@pipelines_app.command("schedule")
def schedule(
    name: Annotated[str, typer.Argument(help="ingest, train_and_deploy or retrain.")],
    cron: Annotated[str | None, typer.Option(help="A cron line, e.g. '0 3 * * *'.")] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
    param: ParamOption = None,
) -> None:
    """Run a pipeline on a schedule, with the given parameters."""
    from pipelines.runs import PipelineError, schedule_pipeline

    try:
        described = schedule_pipeline(name, cron=cron, interval_s=interval, parameters=parse_params(param),
                                      platform=platform_settings())
    except PipelineError as exc:
        fail(str(exc))
    console.print(f"{name} scheduled: {described}")


@pipelines_app.command("unschedule")
def unschedule(name: Annotated[str, typer.Argument(help="ingest, train_and_deploy or retrain.")]) -> None:
    """Remove every schedule of a pipeline."""
    from pipelines.runs import PipelineError, unschedule_pipeline

    try:
        removed = unschedule_pipeline(name, platform_settings())
    except PipelineError as exc:
        fail(str(exc))
    console.print(f"{name}: {removed} schedule(s) removed")
