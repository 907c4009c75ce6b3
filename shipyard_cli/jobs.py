"""``shipyard jobs``: submit, follow, cancel and list training jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_cli.common import ENDED, TokenOption, client_for, console, fail, follow_until_ended, read_spec
from shipyard_common.settings import DEV_ADMIN_TOKEN

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)


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

        def show(job: dict[str, Any]) -> None:
            prog = job.get("progress") or {}
            metrics = job.get("metrics") or {}
            metric = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))[:60]
            progress.update(
                task,
                total=prog.get("epochs") or None,
                completed=prog.get("epoch") or 0,
                description=f"job {job_id[:8]} {job['state']}",
                metric=metric,
                epochs=f"epoch {prog.get('epoch') or 0}/{prog.get('epochs') or '?'}",
            )

        return follow_until_ended(lambda: client.get_job(job_id), show, poll_s=poll_s)


@jobs_app.command("submit")
def jobs_submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec (YAML or JSON).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show a live progress bar.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Submit a training job from a spec file."""
    body = read_spec(spec)
    client = client_for(token)
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
        fail(exc.message)


@jobs_app.command("get")
def jobs_get(job_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Show one job."""
    try:
        console.print_json(json.dumps(client_for(token).get_job(job_id)))
    except ClientError as exc:
        fail(exc.message)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Cancel a queued or running job."""
    try:
        job = client_for(token).cancel_job(job_id)
    except ClientError as exc:
        fail(exc.message)
    console.print(f"job {job['id']} {job['state']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Print a job's log; with --follow, keep printing new lines until the job ends."""
    client = client_for(token)
    after = 0
    try:
        while True:
            page = client.job_logs(job_id, after=after)
            for line in page["lines"]:
                console.print(line.get("message", line), markup=False, highlight=False)
            after = page.get("next_after", after)
            if not follow or (page["state"] in ENDED and not page["lines"]):
                return
            time.sleep(0.5)
    except ClientError as exc:
        fail(exc.message)


@jobs_app.command("list")
def jobs_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List jobs."""
    try:
        jobs = client_for(token).list_jobs()
    except ClientError as exc:
        fail(exc.message)
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
