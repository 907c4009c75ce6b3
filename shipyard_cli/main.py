"""``shipyard``: start the local stack, submit and follow jobs, request, approve and roll back model
promotions, predict, see drift.

This module is the root app and the stack's commands; each group of commands lives in its own module
(``jobs``, ``models``, ``data``, ``serving``), and the renderings they share in ``views``.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shipyard_cli import observability
from shipyard_cli.batch import predict_batch
from shipyard_cli.client import ClientError, ui_url
from shipyard_cli.common import console, fail, platform_settings
from shipyard_cli.data import data_app
from shipyard_cli.drift import drift
from shipyard_cli.feedback import feedback
from shipyard_cli.jobs import jobs_app
from shipyard_cli.models import models_app
from shipyard_cli.pipelines import pipelines_app
from shipyard_cli.retraining import retraining_app
from shipyard_cli.serving import predict
from shipyard_cli.stack import Stack, StackError, prefect_ui_url
from shipyard_cli.sweeps import sweeps_app
from shipyard_cli.tokens import tokens_app
from shipyard_common.settings import PlatformSettings, generated_mlflow_password_path

app = typer.Typer(help="Shipyard: train, register, promote, serve and watch models.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(retraining_app, name="retraining")
app.add_typer(tokens_app, name="tokens")
app.add_typer(sweeps_app, name="sweeps")


@app.command()
def up(
    with_prometheus: Annotated[bool, typer.Option(
        "--with-prometheus", help="Also start Prometheus (from PATH) scraping the stack, with the alerts.",
    )] = False,
    with_grafana: Annotated[bool, typer.Option(
        "--with-grafana", help="Also start grafana-server (from PATH) with Shipyard's dashboards "
        "(and Prometheus, which it reads).",
    )] = False,
    supervise: Annotated[bool, typer.Option(
        "--supervise/--no-supervise", help="Leave a supervisor running that starts again a component "
        "whose process dies (with a backoff; 'shipyard status' shows the restarts).",
    )] = True,
) -> None:
    """Start Redis (if none answers), MLflow, Prefect, a worker, the four services and the flows, and a
    supervisor; what already runs is left running, what died is started again."""
    stack = _stack_for_up(with_prometheus=with_prometheus or with_grafana, with_grafana=with_grafana)
    try:
        stack.up(
            on_started=lambda r: console.print(f"  [green]✓[/green] {r.name:<10} pid {r.pid}"),
            on_running=lambda r: console.print(f"  [dim]·[/dim] {r.name:<10} pid {r.pid} (already running)"),
            supervise=supervise,
        )
    except StackError as exc:
        fail(str(exc))
    console.print(f"stack is up; logs in {stack.log_dir}")
    console.print(f"registry UI: {ui_url(stack.platform)}")
    _print_mlflow_sign_in(stack.platform)
    console.print(f"Prefect UI (flows, runs, schedules): {prefect_ui_url(stack.platform)}")
    started = {record.name for record in stack.records()}
    if "prometheus" in started:
        console.print(f"Prometheus (targets, alerts): http://127.0.0.1:{stack.prometheus_port}")
    if "grafana" in started:
        console.print(f"Grafana (folder Shipyard: Serving, Training, Models): http://127.0.0.1:{stack.grafana_port}")


def _stack_for_up(*, with_prometheus: bool, with_grafana: bool) -> Stack:
    """The stack ``shipyard up`` starts: the worker's metrics on a fixed port (the one the shipped
    Prometheus configuration scrapes), Prometheus and Grafana where asked for and installed."""
    def port(name: str, default: int) -> int:
        return int(os.environ.get(name) or default)

    prometheus_port = grafana_port = None
    if with_prometheus:
        if observability.prometheus_binary():
            prometheus_port = port("SHIPYARD_PROMETHEUS_PORT", observability.DEFAULT_PROMETHEUS_PORT)
        else:
            console.print("[yellow]no prometheus on PATH: started without it[/yellow] (apt-get install "
                          "prometheus)")
    if with_grafana and prometheus_port is not None:
        if observability.grafana_binary():
            grafana_port = port("SHIPYARD_GRAFANA_PORT", observability.DEFAULT_GRAFANA_PORT)
        else:
            console.print("[yellow]no grafana-server on PATH: started without it[/yellow]")
    return Stack(
        platform_settings(),
        worker_metrics_port=port("SHIPYARD_WORKER_METRICS_PORT", observability.DEFAULT_WORKER_METRICS_PORT),
        prometheus_port=prometheus_port,
        grafana_port=grafana_port,
    )


def _print_mlflow_sign_in(platform: PlatformSettings) -> None:
    """Where MLflow's UI is and how to sign in to it, when it runs with its basic-auth app."""
    if not platform.mlflow_auth_enabled:
        return
    if platform.mlflow_password is not None:
        where = "SHIPYARD_MLFLOW_PASSWORD"
    else:
        path = platform.mlflow_password_file or generated_mlflow_password_path(platform.state_dir)
        where = f"the password in {path}"
    console.print(f"MLflow UI: {platform.mlflow_tracking_uri} (sign in as {platform.mlflow_username!r} "
                  f"with {where})")


@app.command()
def down() -> None:
    """Stop every process of the local stack, children included."""
    stopped = Stack(platform_settings()).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def restart(
    component: Annotated[str, typer.Argument(help="A component that 'shipyard status' lists: worker …")],
) -> None:
    """Stop one component of the local stack (its children too) and start it again; the rest runs on."""
    try:
        record = Stack(platform_settings()).restart(component)
    except StackError as exc:
        fail(str(exc))
    console.print(f"  [green]✓[/green] {record.name} restarted: pid {record.pid} (restart {record.restarts})")


@app.command()
def status() -> None:
    """Show which processes of the local stack run and answer, and how often each was restarted."""
    platform = platform_settings()
    rows = Stack(platform).status()
    if not rows:
        console.print("no stack is running from this state directory ('shipyard up' starts one)")
        raise typer.Exit(code=1)
    table = Table("component", "pid", "alive", "healthy", "restarts", "last exit", "log")
    for row in rows:
        healthy = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[row["healthy"]]  # type: ignore[index]
        last_exit = " ".join(str(row[key]) for key in ("last_exit", "note") if row[key]) or "-"
        table.add_row(
            str(row["name"]),
            str(row["pid"]),
            "yes" if row["alive"] else "[red]no[/red]",
            healthy,
            str(row["restarts"]),
            escape(last_exit),
            str(row["log"]),
        )
    console.print(table)
    console.print(f"registry UI: {ui_url(platform)}")
    _print_mlflow_sign_in(platform)
    console.print(f"Prefect UI (flows, runs, schedules): {prefect_ui_url(platform)}")
    if not all(row["alive"] for row in rows):
        raise typer.Exit(code=1)


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
) -> None:
    """Run the whole loop on breast_cancer: data → training → registry → serving → drift."""
    # Imported here, not at the top: the demo loads numpy, which no other command needs.
    from shipyard_cli.demo import run_demo

    try:
        run_demo(platform_settings(), console=console, keep_running=keep_running)
    except (StackError, ClientError) as exc:
        fail(str(exc))


# Top-level commands defined with the serving group's code; registered here, after the stack's, to keep
# the order of 'shipyard --help'.
app.command()(predict)
app.command()(drift)
app.command()(feedback)
app.command("predict-batch")(predict_batch)


if __name__ == "__main__":
    app()
