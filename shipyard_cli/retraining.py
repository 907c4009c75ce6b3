"""``shipyard retraining``: the policies that make a model retrain by itself, and the triggers they fired."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from shipyard_cli.common import TokenOption, call, console, fail
from shipyard_cli.pipelines import ParamOption, parse_params
from shipyard_common.settings import DEV_ADMIN_TOKEN

retraining_app = typer.Typer(help="Retraining that starts itself: policies per model, triggers, by hand.",
                             no_args_is_help=True)
policy_app = typer.Typer(help="A model's retraining policy (set and delete: approver).", no_args_is_help=True)
retraining_app.add_typer(policy_app, name="policy")


def _policy_table(policies: list[dict[str, Any]]) -> Table:
    table = Table("model", "enabled", "when", "cooldown", "parameters", "updated")
    for p in policies:
        when = []
        if p["drift_share_above"] is not None:
            when.append(f"drift share > {p['drift_share_above']:g} in {p['consecutive_windows']} windows")
        if p["accuracy_below"] is not None:
            when.append(f"accuracy < {p['accuracy_below']:g} ({p['min_labelled']}+ labels)")
        if p["schedule_interval_s"] is not None:
            when.append(f"every {p['schedule_interval_s']:g}s")
        table.add_row(p["model"], "yes" if p["enabled"] else "[red]no[/red]", "\n".join(when),
                      f"{p['cooldown_s']:g}s", str(p["parameters"] or "-"),
                      f"{p['updated_at'][:19]} by {p['updated_by']}")
    return table


def _describe(trigger: dict[str, Any]) -> str:
    outcome = trigger.get("outcome") or {}
    if trigger["state"] == "completed" and outcome.get("version"):
        request = f", promotion request #{outcome['request_id']}" if outcome.get("request_id") else ""
        return f"v{outcome['version']}{request}"
    return str(trigger.get("message") or trigger.get("flow_run_url") or "")


STATE_STYLE = {"failed": "[red]failed[/red]", "completed": "[green]completed[/green]"}


def trigger_table(triggers: list[dict[str, Any]]) -> Table:
    table = Table("id", "model", "from", "cause", "state", "created", "outcome", "reason")
    for t in triggers:
        state = STATE_STYLE.get(t["state"], t["state"])
        table.add_row(str(t["id"]), t["model"], f"v{t['version']}", t["cause"], state, t["created_at"][:19],
                      _describe(t), t["reason"])
    return table


@policy_app.command("set")
def set_policy(
    model: Annotated[str, typer.Argument(help="The registered model (it needs a production version).")],
    drift_share_above: Annotated[float | None, typer.Option(help="Retrain when more than this share of "
                                                            "features drifts …")] = None,
    windows: Annotated[int, typer.Option(help="… in this many windows in a row.")] = 3,
    accuracy_below: Annotated[float | None, typer.Option(help="Retrain when live accuracy is below.")] = None,
    min_labelled: Annotated[int, typer.Option(help="Labels a window needs for its accuracy to count.")] = 50,
    every: Annotated[float | None, typer.Option(help="Retrain every this many seconds.")] = None,
    cooldown: Annotated[float, typer.Option(help="Seconds between two retrainings, at least.")] = 3600.0,
    param: ParamOption = None,
    enabled: Annotated[bool, typer.Option(help="--disabled keeps the policy but fires nothing.")] = True,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Create or replace MODEL's policy: drift, an accuracy floor and/or a schedule, and a cooldown."""
    body = {"enabled": enabled, "drift_share_above": drift_share_above, "consecutive_windows": windows,
            "accuracy_below": accuracy_below, "min_labelled": min_labelled, "schedule_interval_s": every,
            "cooldown_s": cooldown, "parameters": parse_params(param)}
    policy = call(token, lambda client: client.put_policy(model, body))
    console.print(_policy_table([policy]))


@policy_app.command("show")
def show_policy(
    model: Annotated[str | None, typer.Argument(help="One model; every policy if left out.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Show one model's policy, or every policy."""
    policies = call(token, lambda client: [client.policy(model)] if model else client.policies())
    if not policies:
        console.print("no retraining policies ('shipyard retraining policy set MODEL …' makes one)")
        return
    console.print(_policy_table(policies))


@policy_app.command("delete")
def delete_policy(model: Annotated[str, typer.Argument()], token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Remove MODEL's policy (its triggers stay; a retraining under way goes on)."""
    call(token, lambda client: client.delete_policy(model))
    console.print(f"{model}: policy removed")


@retraining_app.command("triggers")
def list_triggers(
    model: Annotated[str | None, typer.Argument(help="One model's; every model's if left out.")] = None,
    state: Annotated[str | None, typer.Option(help="pending, started, running, completed or failed.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Retrainings the monitor (or a person) started: why, their flow run, how they ended."""
    triggers = call(token, lambda client: client.triggers(model, state, limit))
    if not triggers:
        console.print("no retraining triggers")
        return
    console.print(trigger_table(triggers))


@retraining_app.command("trigger")
def trigger(
    model: Annotated[str, typer.Argument(help="Retrain this model's production version now.")],
    reason: Annotated[str, typer.Option(help="Why: recorded, and named in the promotion request.")],
    param: ParamOption = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Retrain MODEL now (role trainer): the retrain flow, then a promotion request for the new version."""
    parameters = parse_params(param) if param else None
    started = call(token, lambda client: client.trigger(model, reason, parameters))
    console.print(trigger_table([started]))
    if started["state"] == "failed":
        fail(f"trigger {started['id']} could not start: {started['message']}")
    page = started["flow_run_url"] or ""
    console.print(f"trigger {started['id']}: flow run {started['flow_run_id']} {page}")
