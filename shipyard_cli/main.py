"""``shipyard``: start the local stack, submit and follow jobs, promote models, predict, see drift."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_cli.stack import Stack, StackError
from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings, disable_telemetry

app = typer.Typer(help="Shipyard: train, register, promote, serve and watch models.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets versioned with DVC.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

console = Console()
TokenOption = Annotated[str, typer.Option(envvar="SHIPYARD_API_TOKEN", help="API token.")]


def _platform() -> PlatformSettings:
    disable_telemetry()
    return PlatformSettings()


def _client(token: str) -> ShipyardClient:
    return ShipyardClient(_platform(), token=token)


def _fail(message: str) -> None:
    # Services echo what they were sent ("model name '[/x]' is not allowed"): print it as text,
    # never as rich markup, which would restyle it or raise on an unmatched closing tag.
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code=1)


@app.command()
def up() -> None:
    """Start Redis (if none answers), MLflow, a worker and the four services on loopback."""
    stack = Stack(_platform())
    try:
        stack.up(on_started=lambda r: console.print(f"  [green]✓[/green] {r.name:<9} pid {r.pid}"))
    except StackError as exc:
        _fail(str(exc))
    console.print(f"stack is up; logs in {stack.log_dir}")


@app.command()
def down() -> None:
    """Stop every process of the local stack, children included."""
    stopped = Stack(_platform()).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Show which processes of the local stack run and answer."""
    rows = Stack(_platform()).status()
    if not rows:
        console.print("no stack is running from this state directory ('shipyard up' starts one)")
        raise typer.Exit(code=1)
    table = Table("component", "pid", "alive", "healthy", "log")
    for row in rows:
        healthy = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[row["healthy"]]  # type: ignore[index]
        table.add_row(
            str(row["name"]),
            str(row["pid"]),
            "yes" if row["alive"] else "[red]no[/red]",
            healthy,
            str(row["log"]),
        )
    console.print(table)
    if not all(row["alive"] for row in rows):
        raise typer.Exit(code=1)


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
) -> None:
    """Run the whole loop on breast_cancer: data → training → registry → serving → drift."""
    from shipyard_cli.demo import run_demo

    try:
        run_demo(_platform(), console=console, keep_running=keep_running)
    except (StackError, ClientError) as exc:
        _fail(str(exc))


def follow_job(
    client: ShipyardClient, job_id: str, *, poll_s: float = 0.5, out: Console = console
) -> dict[str, Any]:
    """Show a live progress bar until the job ends; return the final job."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[epochs]}"),
        TextColumn("{task.fields[metric]}"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
    ) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=None, metric="", epochs="")
        while True:
            job = client.get_job(job_id)
            state = job["state"]
            prog = job.get("progress") or {}
            metrics = job.get("metrics") or {}
            metric = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))[:60]
            progress.update(
                task,
                total=prog.get("epochs") or None,
                completed=prog.get("epoch") or 0,
                description=f"job {job_id[:8]} {state}",
                metric=metric,
                epochs=f"epoch {prog.get('epoch') or 0}/{prog.get('epochs') or '?'}",
            )
            if state in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(poll_s)


@jobs_app.command("submit")
def jobs_submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec (YAML or JSON).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show a live progress bar.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Submit a training job from a spec file."""
    import yaml

    try:
        body = yaml.safe_load(spec.read_text())
    except yaml.YAMLError as exc:
        _fail(f"{spec} is not valid YAML: {exc}")
    client = _client(token)
    try:
        job = client.submit_job(body)
        console.print(f"job [bold]{job['id']}[/bold] {job['state']}")
        if follow:
            job = follow_job(client, job["id"])
            console.print_json(
                json.dumps(
                    {k: job.get(k) for k in ("state", "metrics", "model_name", "model_version", "error")}
                )
            )
            if job["state"] != "succeeded":
                raise typer.Exit(code=1)
    except ClientError as exc:
        _fail(exc.message)


@jobs_app.command("get")
def jobs_get(job_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Show one job."""
    try:
        console.print_json(json.dumps(_client(token).get_job(job_id)))
    except ClientError as exc:
        _fail(exc.message)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Cancel a queued or running job."""
    try:
        job = _client(token).cancel_job(job_id)
    except ClientError as exc:
        _fail(exc.message)
    console.print(f"job {job['id']} {job['state']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Print a job's log; with --follow, keep printing new lines until the job ends."""
    client = _client(token)
    after = 0
    try:
        while True:
            page = client.job_logs(job_id, after=after)
            for line in page["lines"]:
                console.print(line.get("message", line), markup=False, highlight=False)
            after = page.get("next_after", after)
            if not follow or (page["state"] in ("succeeded", "failed", "cancelled") and not page["lines"]):
                return
            time.sleep(0.5)
    except ClientError as exc:
        _fail(exc.message)


@jobs_app.command("list")
def jobs_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List jobs."""
    try:
        jobs = _client(token).list_jobs()
    except ClientError as exc:
        _fail(exc.message)
    table = Table("id", "state", "model", "version", "created")
    for job in jobs:
        table.add_row(
            job["id"],
            job["state"],
            str(job.get("model_name")),
            str(job.get("model_version")),
            str(job.get("created_at")),
        )
    console.print(table)


@models_app.command("list")
def models_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List registered models and their aliases."""
    try:
        models = _client(token).list_models()
    except ClientError as exc:
        _fail(exc.message)
    table = Table("model", "aliases")
    for model in models:
        aliases = ", ".join(f"{a}→v{v}" for a, v in (model.get("aliases") or {}).items())
        table.add_row(model["name"], aliases)
    console.print(table)


@models_app.command("promote")
def models_promote(
    name: str,
    version: str,
    alias: Annotated[str, typer.Option(help="production, staging, canary or shadow.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    weight: Annotated[
        float | None, typer.Option(help="canary only: the share of requests it answers, in (0, 1].")
    ] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Point an alias at a version (promotion; rolling back is promoting the old version)."""
    try:
        result = _client(token).promote(name, version, alias=alias, reason=reason, weight=weight)
    except ClientError as exc:
        _fail(exc.message)
    share = f" for {result['weight']:.0%} of requests" if result.get("weight") is not None else ""
    console.print(f"{name}: {alias} → v{result['version']}{share} (was v{result.get('previous_version')})")


@models_app.command("unalias")
def models_unalias(
    name: str,
    alias: Annotated[str, typer.Argument(help="canary, shadow or staging: stop serving it.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Remove an alias (end a canary or a shadow); serving unloads its version."""
    try:
        result = _client(token).remove_alias(name, alias, reason=reason)
    except ClientError as exc:
        _fail(exc.message)
    console.print(f"{name}: {alias} removed (was v{result.get('previous_version', '?')})")


@data_app.command("add")
def data_add(
    name: str,
    csv: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A CSV file with a header row.")],
) -> None:
    """Version a CSV file as dataset NAME with DVC; prints the revision to put in a job spec."""
    import pandas as pd

    from shipyard_common.datasets import DataRepo
    from shipyard_common.errors import ShipyardError

    platform = _platform()
    try:
        frame = pd.read_csv(csv)
    except (ValueError, OSError) as exc:
        _fail(f"cannot read {csv} as CSV: {exc}")
    try:
        version = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(name, frame)
    except ShipyardError as exc:
        _fail(exc.message)
    console.print(f"dataset {name}: {version.rows} rows, revision [bold]{version.rev}[/bold]")


@app.command()
def predict(
    model: str,
    inputs: Annotated[str, typer.Option(help='Rows as JSON, e.g. "[[1.0, 2.0]]"; "-" reads stdin.')],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Ask the serving service for a prediction."""
    raw = sys.stdin.read() if inputs == "-" else inputs
    try:
        rows = json.loads(raw)
    except ValueError as exc:
        _fail(f"--inputs is not JSON: {exc}")
    try:
        console.print_json(json.dumps(_client(token).predict(model, rows)))
    except ClientError as exc:
        _fail(exc.message)


def drift_table(report: dict[str, Any]) -> Table:
    table = Table(
        "feature",
        "score",
        "method",
        "drifted",
        title=f"{report['model']} v{report['version']}: dataset drift = {report['dataset_drift']} "
        f"(share {report['drift_share']:.2f}, {report['current_rows']} rows)",
    )
    for feature in report["features"]:
        table.add_row(
            feature["name"],
            f"{feature['score']:.4g}",
            str(feature.get("method", "")),
            "[red]yes[/red]" if feature["drifted"] else "no",
        )
    return table


@app.command()
def drift(
    model: str, window: Annotated[int | None, typer.Option()] = None, token: TokenOption = DEV_ADMIN_TOKEN
) -> None:
    """Show per-feature drift of recent predictions against the training data."""
    try:
        console.print(drift_table(_client(token).drift(model, window)))
    except ClientError as exc:
        _fail(exc.message)


if __name__ == "__main__":
    app()
