"""``shipyard models``: the registry's models and versions, promotion requests and their approval, gates,
rollback, history and archiving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_cli.common import TokenOption, call, client_for, console, fail
from shipyard_cli.views import delta, gate_table, num, print_gate, when
from shipyard_common.settings import DEV_ADMIN_TOKEN

T = TypeVar("T")
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)


def _aliases(mapping: dict[str, str] | None) -> str:
    return ", ".join(f"{a}→v{v}" for a, v in sorted((mapping or {}).items()))


def _metric_keys(versions: list[dict[str, Any]], limit: int = 4) -> list[str]:
    """The metric columns worth a table's width: validation figures first."""
    keys = sorted({key for v in versions for key in (v.get("metrics") or {})})
    return sorted(keys, key=lambda k: (not k.startswith("val_"), k))[:limit]


def _fail_client(exc: ClientError) -> NoReturn:
    """Print the service's message (and a gate's verdict, when that is what refused) and exit 1."""
    details = exc.details
    if isinstance(details, dict) and "rules" in details and "passed" in details:
        console.print(gate_table(details))
    fail(exc.message)


def _call(token: str, action: Callable[[ShipyardClient], T]) -> T:
    """:func:`~shipyard_cli.common.call`, a gate's verdict printed when that is what refused."""
    return call(token, action, refused=_fail_client)


@models_app.command("list")
def models_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List registered models, their aliases and latest version."""
    models = _call(token, lambda client: client.list_models())
    table = Table("model", "aliases")
    table.add_column("latest", justify="right")
    table.add_column("updated")
    for model in models:
        latest = model.get("latest_version")
        table.add_row(escape(model["name"]), _aliases(model.get("aliases")), f"v{latest}" if latest else "-",
                      when(model.get("updated_at")))
    console.print(table)


def _show_model(client: ShipyardClient, name: str) -> None:
    model = client.get_model(name)
    versions = client.list_versions(name)
    console.print(f"[bold]{escape(name)}[/bold]  aliases: {_aliases(model.get('aliases')) or 'none'}")
    if model.get("description"):
        console.print(escape(model["description"]))
    keys = _metric_keys(versions)
    table = Table()
    table.add_column("version", justify="right")
    table.add_column("aliases")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("dataset @ rev")
    table.add_column("created")
    for version in versions:
        lineage = version.get("lineage") or {}
        data = f"{lineage.get('dataset')} @ {(lineage.get('dataset_rev') or '')[:8]}" if lineage.get(
            "dataset") else "-"
        metrics = version.get("metrics") or {}
        label = f"v{version['version']}" + (" [dim](archived)[/dim]" if version.get("archived") else "")
        table.add_row(label, ", ".join(version.get("aliases") or []), *(num(metrics.get(k)) for k in keys),
                      escape(data), when(version.get("created_at")))
    console.print(table)


def _show_version(client: ShipyardClient, name: str, version: str, card: bool) -> None:
    detail = client.get_version(name, version)
    lineage = detail.get("lineage") or {}
    about = Table.grid(padding=(0, 2))
    about.add_column(style="bold")
    about.add_column()
    rows = [
        ("version", f"v{detail['version']}" + ("  (archived)" if detail.get("archived") else "")),
        ("aliases", ", ".join(detail.get("aliases") or []) or "none"),
        ("created", when(detail.get("created_at"))),
        ("status", detail.get("status") or "-"),
        ("dataset", f"{lineage.get('dataset') or '-'} @ {lineage.get('dataset_rev') or '-'}"),
        ("job", lineage.get("job_id") or "-"),
        ("run", detail.get("run_id") or "-"),
        ("git commit", lineage.get("git_commit") or "-"),
        ("framework", " / ".join(x for x in (lineage.get("framework"), lineage.get("task")) if x) or "-"),
        ("exports", ", ".join(detail.get("exports") or []) or "-"),
        ("metrics from", {"version": "the registered model (its tags)", "run": "the run's latest values"}.get(
            detail.get("metrics_source") or "", "-")),
    ]
    serving = detail.get("serving")
    if serving:
        if serving.get("error"):
            state = f"unknown ({serving['error']})"
        else:
            state = f"v{serving.get('version')} {serving.get('status') or ''}".strip()
            if serving.get("canary_version"):
                state += f", canary v{serving['canary_version']} at {num(serving.get('canary_weight'))}"
        rows.append(("serving", state))
    drift = detail.get("drift")
    if drift:
        if drift.get("error"):
            rows.append(("drift", f"unknown ({drift['error']})"))
        else:
            rows.append(("drift", f"dataset drift = {drift.get('dataset_drift')} (share "
                                  f"{num(drift.get('drift_share'))}, v{drift.get('version')}, "
                                  f"{drift.get('rows')} rows, {when(drift.get('computed_at'))})"))
    for key, value in rows:
        about.add_row(key, escape(str(value)))
    console.print(f"[bold]{escape(name)} v{detail['version']}[/bold]")
    console.print(about)
    metrics = Table("metric", title="metrics", title_justify="left")
    metrics.add_column("value", justify="right")
    for key, value in sorted((detail.get("metrics") or {}).items()):
        metrics.add_row(escape(key), num(value))
    console.print(metrics)
    if detail.get("params"):
        params = Table("param", "value", title="params", title_justify="left")
        for key, value in sorted(detail["params"].items()):
            params.add_row(escape(key), escape(str(value)))
        console.print(params)
    if card and detail.get("model_card"):
        from rich.markdown import Markdown

        console.rule("model card")
        console.print(Markdown(detail["model_card"]))
    elif detail.get("model_card"):
        console.print("[dim]model card: --card prints it[/dim]")


@models_app.command("show")
def models_show(
    name: str,
    version: Annotated[str | None, typer.Argument(help="One version in full; left out: the model.")] = None,
    card: Annotated[bool, typer.Option("--card", help="Also print the version's model card.")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Show a model and its versions, or one version: metrics, lineage, params, serving, drift."""
    client = client_for(token)
    try:
        if version is None:
            _show_model(client, name)
        else:
            _show_version(client, name, version, card)
    except ClientError as exc:
        _fail_client(exc)


@models_app.command("compare")
def models_compare(name: str, a: str, b: str, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Compare version B with version A: metric deltas (B − A), changed params, data, signature."""
    result = _call(token, lambda client: client.compare(name, a, b))
    va, vb = f"v{result['a']['version']}", f"v{result['b']['version']}"
    metrics = Table("metric", title=f"{escape(name)}: {vb} against {va}", title_justify="left")
    for column in (va, vb, "delta"):
        metrics.add_column(column, justify="right")
    for key, entry in sorted(result["metrics"].items()):
        metrics.add_row(escape(key), num(entry.get("a")), num(entry.get("b")), delta(entry.get("delta")))
    console.print(metrics)
    if result["params"]:
        params = Table("param", va, vb, title="params that differ", title_justify="left")
        for key, change in sorted(result["params"].items()):
            params.add_row(escape(key), escape(str(change.get("a"))), escape(str(change.get("b"))))
        console.print(params)
    else:
        console.print("params: the same")
    console.print(f"same dataset revision: {'yes' if result['same_dataset_revision'] else 'no'}")
    if result["signature_changed"]:
        console.print("signature changed:")
        for change in result.get("signature_changes") or []:
            console.print(f"  {escape(change)}")
    else:
        console.print("signature: the same")


@models_app.command("request")
def models_request(
    name: str,
    version: str,
    reason: Annotated[str, typer.Option(help="Why, for the approver and the audit log.")],
    alias: Annotated[str, typer.Option(help="production, staging, canary or shadow.")] = "production",
    weight: Annotated[
        float | None, typer.Option(help="canary only: the share of requests it answers, in (0, 1].")
    ] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Ask for VERSION to become ALIAS (trainer or approver); an approver who is not you decides."""
    request = _call(token, lambda client: client.request_promotion(
        name, version, alias=alias, reason=reason, weight=weight))
    share = f" for {request['weight']:.0%} of requests" if request.get("weight") is not None else ""
    asker = escape(request["requested_by"])
    console.print(f"request #{request['id']}: {escape(name)} {request['alias']} → "
                  f"v{request['version']}{share}, {request['state']} (asked by {asker})")
    print_gate(request.get("gate"), request["alias"])


@models_app.command("requests")
def models_requests(
    model: Annotated[str | None, typer.Option(help="Only this model's requests.")] = None,
    state: Annotated[str | None, typer.Option(help="pending, approved, rejected or cancelled.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """List promotion requests, newest first, with the gate's verdict on pending ones."""
    requests = _call(token, lambda client: client.list_requests(model=model, state=state))
    table = Table()
    table.add_column("id", justify="right")
    table.add_column("model")
    table.add_column("version", justify="right")
    table.add_column("alias")
    table.add_column("weight", justify="right")
    for column in ("state", "asked by", "asked at", "reason", "gate", "decided by"):
        table.add_column(column)
    for request in requests:
        gate = request.get("gate")
        verdict = "-" if gate is None else "[green]passes[/green]" if gate["passed"] else "[red]blocks[/red]"
        table.add_row(
            str(request["id"]), escape(request["model"]), f"v{request['version']}", request["alias"],
            num(request.get("weight")), request["state"], escape(request["requested_by"]),
            when(request.get("requested_at")), escape(request["reason"]), verdict,
            escape(request.get("decided_by") or "-"),
        )
    console.print(table)


def _moved(result: dict[str, Any], prefix: str) -> None:
    share = f" for {result['weight']:.0%} of requests" if result.get("weight") is not None else ""
    was = f"v{result['previous_version']}" if result.get("previous_version") else "none"
    console.print(f"{prefix}{escape(result['model'])}: {result['alias']} → v{result['version']}{share} "
                  f"(was {was})")


@models_app.command("approve")
def models_approve(
    request_id: Annotated[int, typer.Argument(help="The request's id ('shipyard models requests').")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Approve someone else's request: the alias moves at once, if the model's gate passes."""
    result = _call(token, lambda client: client.approve(request_id, reason))
    _moved(result, f"request #{request_id} approved: ")


@models_app.command("reject")
def models_reject(
    request_id: int,
    reason: Annotated[str, typer.Option(help="Why, for the requester and the audit log.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Reject someone else's pending request."""
    request = _call(token, lambda client: client.reject(request_id, reason))
    by = escape(request.get("decided_by") or "?")
    console.print(f"request #{request['id']} {request['state']} by {by}")


@models_app.command("withdraw")
def models_withdraw(request_id: int, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Withdraw your own pending request."""
    request = _call(token, lambda client: client.cancel_request(request_id))
    console.print(f"request #{request['id']} {request['state']}")


@models_app.command("rollback")
def models_rollback(
    name: str,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Point production back at the version it named before the current one (approver)."""
    result = _call(token, lambda client: client.rollback(name, reason))
    _moved(result, "rolled back ")


@models_app.command("history")
def models_history(
    name: str,
    at: Annotated[
        str | None, typer.Option(help="An ISO 8601 moment (UTC unless it says otherwise): production then.")
    ] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Every alias move of a model, newest first; with --at, which version was production then."""
    history = _call(token, lambda client: client.history(name, at=at))
    table = Table(title=f"{escape(name)}: alias moves, newest first", title_justify="left")
    table.add_column("at (UTC)")
    table.add_column("action")
    table.add_column("alias")
    table.add_column("version", justify="right")
    table.add_column("was", justify="right")
    table.add_column("by")
    table.add_column("request", justify="right")
    table.add_column("reason")
    for move in history["moves"]:
        by = escape(move["actor"]) + (" [yellow](direct)[/yellow]" if move.get("direct") else "")
        table.add_row(
            when(move["at"]), move["action"], move["alias"], f"v{move['version']}",
            f"v{move['previous_version']}" if move.get("previous_version") else "-", by,
            f"#{move['request_id']}" if move.get("request_id") else "-", escape(move.get("reason") or ""),
        )
    console.print(table)
    if at is not None:
        then = history.get("production_at")
        console.print(f"production at {when(history.get('at'))} UTC: {'v' + then if then else 'none'}")


@models_app.command("gate")
def models_gate(
    name: str,
    rules: Annotated[
        list[str] | None,
        typer.Option("--set", help="A rule, e.g. 'val_accuracy >= 0.9' or "
                                   "'val_accuracy >= production - 0.01'; repeat for more. Replaces the gate "
                                   "(admin)."),
    ] = None,
    aliases: Annotated[
        list[str] | None,
        typer.Option("--alias", help="An alias the gate covers (default production); repeat."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every rule (admin).")] = False,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Show a model's promotion gate, or set it with --set (and --alias)."""
    if clear and rules:
        fail("--clear and --set exclude each other")
    client = client_for(token)
    try:
        if rules or clear:
            gate = client.set_gate(name, rules or [], aliases)
        else:
            if aliases:
                fail("--alias only goes with --set")
            gate = client.get_gate(name)
    except ClientError as exc:
        _fail_client(exc)
    covers = ", ".join(gate.get("aliases") or [])
    if not gate["rules"]:
        console.print(f"{escape(name)}: no gate rules (approvals for {covers} are not checked)")
        return
    console.print(f"{escape(name)}'s gate on {covers}:")
    for rule in gate["rules"]:
        console.print(f"  {escape(rule)}")
    if gate.get("updated_by"):
        console.print(f"set by {escape(gate['updated_by'])} at {when(gate.get('updated_at'))}")


def _set_archived(name: str, version: str, reason: str | None, token: str, *, archived: bool) -> None:
    client = client_for(token)
    try:
        result = (client.archive if archived else client.restore)(name, version, reason)
    except ClientError as exc:
        _fail_client(exc)
    console.print(f"{escape(result['model'])} v{result['version']} {'archived' if archived else 'restored'}")


Why = Annotated[str | None, typer.Option("--reason", help="Why, for the audit log.")]


@models_app.command("archive")
def models_archive(name: str, version: str, reason: Why = None, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Archive a version: it can no longer be given an alias (approver)."""
    _set_archived(name, version, reason, token, archived=True)


@models_app.command("restore")
def models_restore(name: str, version: str, reason: Why = None, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Restore an archived version (approver)."""
    _set_archived(name, version, reason, token, archived=False)


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
    """Point an alias at a version at once, without a request (admin; marked direct in the audit)."""
    result = _call(token, lambda c: c.promote(name, version, alias=alias, reason=reason, weight=weight))
    _moved(result, "")


@models_app.command("unalias")
def models_unalias(
    name: str,
    alias: Annotated[str, typer.Argument(help="canary, shadow or staging: stop serving it.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Remove an alias (end a canary or a shadow; approver); serving unloads its version."""
    result = _call(token, lambda client: client.remove_alias(name, alias, reason=reason))
    console.print(f"{name}: {alias} removed (was v{result.get('previous_version', '?')})")
