"""``shipyard sweeps``: submit a hyperparameter sweep, follow it, show its trials and the best, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_cli.common import TokenOption, client_for, console, fail, follow_until_ended, read_spec
from shipyard_common.settings import DEV_ADMIN_TOKEN

sweeps_app = typer.Typer(help="Hyperparameter sweeps: many training jobs, the best one registered.",
                         no_args_is_help=True)


def trials_table(sweep: dict[str, Any]) -> Table:
    """One row per trial: its number, state, objective, values and job; the best one marked."""
    best = (sweep.get("best") or {}).get("number")
    table = Table("trial", "state", sweep["objective"]["metric"], "params", "job",
                  title=f"sweep {sweep['id']} {sweep['state']} ({sweep['strategy']}, "
                        f"{len(sweep['trials'])}/{sweep['trials_budget']} trials)")
    for trial in sweep["trials"]:
        value = trial.get("value")
        table.add_row(f"{trial['number']}{' *' if trial['number'] == best else ''}", trial["state"],
                      "" if value is None else f"{value:.6g}", json.dumps(trial["params"]),
                      str(trial.get("job_id") or ""))
    return table


def best_line(sweep: dict[str, Any]) -> str:
    best = sweep.get("best")
    if best is None:
        return "best: none yet" + (f" ({sweep['error']})" if sweep.get("error") else "")
    version = sweep.get("model_version")
    registered = f", registered as {sweep['model_name']} v{version}" if version else ""
    return (f"best: trial {best['number']} {sweep['objective']['metric']}={best['value']:.6g} "
            f"{json.dumps(best['params'])}{registered}")


def follow_sweep(client: ShipyardClient, sweep_id: str, *, poll_s: float = 1.0,
                 out: Console = console) -> dict[str, Any]:
    """Print each trial as it changes state until the sweep ends; return the final sweep."""
    seen: dict[int, str] = {}

    def show(sweep: dict[str, Any]) -> None:
        for trial in sweep["trials"]:
            if seen.get(trial["number"]) != trial["state"]:
                seen[trial["number"]] = trial["state"]
                value = "" if trial.get("value") is None else f" {trial['value']:.6g}"
                out.print(f"trial {trial['number']} {trial['state']}{value} {json.dumps(trial['params'])}",
                          markup=False, highlight=False)

    return follow_until_ended(lambda: client.get_sweep(sweep_id), show, poll_s=poll_s)


@sweeps_app.command("submit")
def sweeps_submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Sweep spec (YAML or JSON).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print trials as they end.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Submit a sweep: a base job spec, a space over its fields, a strategy, an objective, a budget."""
    body = read_spec(spec)
    client = client_for(token)
    try:
        sweep = client.submit_sweep(body)
        console.print(f"sweep [bold]{sweep['id']}[/bold] {sweep['state']}")
        if follow:
            sweep = follow_sweep(client, sweep["id"])
            console.print(trials_table(sweep))
            console.print(best_line(sweep), markup=False, highlight=False)
            if sweep["state"] != "succeeded":
                raise typer.Exit(code=1)
    except ClientError as exc:
        fail(exc.message)


@sweeps_app.command("show")
def sweeps_show(sweep_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """A table of the sweep's trials, and its best so far."""
    try:
        sweep = client_for(token).get_sweep(sweep_id)
    except ClientError as exc:
        fail(exc.message)
    console.print(trials_table(sweep))
    console.print(best_line(sweep), markup=False, highlight=False)


@sweeps_app.command("list")
def sweeps_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List sweeps, newest first."""
    try:
        sweeps = client_for(token).list_sweeps()
    except ClientError as exc:
        fail(exc.message)
    table = Table("id", "state", "model", "strategy", "trials", "objective", "best", "version")
    for sweep in sweeps:
        best = sweep.get("best")
        table.add_row(sweep["id"], sweep["state"], sweep["model_name"], sweep["strategy"],
                      f"{len(sweep['trials'])}/{sweep['trials_budget']}", sweep["objective"]["metric"],
                      "" if best is None else f"{best['value']:.6g} (trial {best['number']})",
                      str(sweep.get("model_version") or ""))
    console.print(table)


@sweeps_app.command("cancel")
def sweeps_cancel(sweep_id: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Cancel a running sweep and its queued or running trials."""
    try:
        sweep = client_for(token).cancel_sweep(sweep_id)
    except ClientError as exc:
        fail(exc.message)
    console.print(f"sweep {sweep['id']} {sweep['state']}")
