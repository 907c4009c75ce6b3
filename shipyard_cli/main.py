"""``shipyard``: start the local stack, submit and follow jobs, request, approve and roll back model
promotions, predict, see drift."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient, ui_url
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


def _fail(message: str) -> NoReturn:
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
    console.print(f"registry UI: {ui_url(stack.platform)}")


@app.command()
def down() -> None:
    """Stop every process of the local stack, children included."""
    stopped = Stack(_platform()).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Show which processes of the local stack run and answer."""
    platform = _platform()
    rows = Stack(platform).status()
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
    console.print(f"registry UI: {ui_url(platform)}")
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


def _num(value: Any) -> str:
    """A figure for a table cell: 4 significant digits, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}"


def _delta(value: float | None) -> str:
    if value is None:
        return "-"
    colour = "green" if value > 0 else "red" if value < 0 else "dim"
    return f"[{colour}]{value:+.4g}[/{colour}]"


def _when(value: str | None) -> str:
    """An ISO time from a service as 'YYYY-MM-DD HH:MM:SS' in UTC (naive times are UTC already)."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _aliases(mapping: dict[str, str] | None) -> str:
    return ", ".join(f"{a}→v{v}" for a, v in sorted((mapping or {}).items()))


def _metric_keys(versions: list[dict[str, Any]], limit: int = 4) -> list[str]:
    """The metric columns worth a table's width: validation figures first."""
    keys = sorted({key for v in versions for key in (v.get("metrics") or {})})
    return sorted(keys, key=lambda k: (not k.startswith("val_"), k))[:limit]


def gate_table(verdict: dict[str, Any]) -> Table:
    """A gate verdict, rule by rule."""
    table = Table("rule", "verdict", "detail", title="gate verdict", title_justify="left")
    for rule in verdict.get("rules") or []:
        if not rule.get("applicable", True):
            mark = "[dim]n/a[/dim]"
        else:
            mark = "[green]pass[/green]" if rule["passed"] else "[red]fail[/red]"
        table.add_row(escape(rule["rule"]), mark, escape(rule.get("detail") or ""))
    return table


def _fail_client(exc: ClientError) -> NoReturn:
    """Print the service's message (and a gate's verdict, when that is what refused) and exit 1."""
    details = exc.details
    if isinstance(details, dict) and "rules" in details and "passed" in details:
        console.print(gate_table(details))
    _fail(exc.message)


def print_gate(verdict: dict[str, Any] | None, alias: str, out: Console = console) -> None:
    """A request's gate verdict: the rules' table and a line saying whether an approval would pass."""
    if verdict is None:
        out.print(f"gate: none covers {alias}")
        return
    out.print(gate_table(verdict))
    if verdict.get("passed"):
        out.print(f"gate: {escape(verdict.get('summary') or '')}")
    else:
        rules = verdict.get("rules") or []
        failing = sum(not rule["passed"] for rule in rules)
        out.print(f"gate: [red]blocks[/red]: an approval would be refused ({failing} of {len(rules)} "
                  "rules fail)")


@models_app.command("list")
def models_list(token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """List registered models, their aliases and latest version."""
    try:
        models = _client(token).list_models()
    except ClientError as exc:
        _fail_client(exc)
    table = Table("model", "aliases")
    table.add_column("latest", justify="right")
    table.add_column("updated")
    for model in models:
        latest = model.get("latest_version")
        table.add_row(escape(model["name"]), _aliases(model.get("aliases")), f"v{latest}" if latest else "-",
                      _when(model.get("updated_at")))
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
        table.add_row(label, ", ".join(version.get("aliases") or []), *(_num(metrics.get(k)) for k in keys),
                      escape(data), _when(version.get("created_at")))
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
        ("created", _when(detail.get("created_at"))),
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
                state += f", canary v{serving['canary_version']} at {_num(serving.get('canary_weight'))}"
        rows.append(("serving", state))
    drift = detail.get("drift")
    if drift:
        if drift.get("error"):
            rows.append(("drift", f"unknown ({drift['error']})"))
        else:
            rows.append(("drift", f"dataset drift = {drift.get('dataset_drift')} (share "
                                  f"{_num(drift.get('drift_share'))}, v{drift.get('version')}, "
                                  f"{drift.get('rows')} rows, {_when(drift.get('computed_at'))})"))
    for key, value in rows:
        about.add_row(key, escape(str(value)))
    console.print(f"[bold]{escape(name)} v{detail['version']}[/bold]")
    console.print(about)
    metrics = Table("metric", title="metrics", title_justify="left")
    metrics.add_column("value", justify="right")
    for key, value in sorted((detail.get("metrics") or {}).items()):
        metrics.add_row(escape(key), _num(value))
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
    client = _client(token)
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
    try:
        result = _client(token).compare(name, a, b)
    except ClientError as exc:
        _fail_client(exc)
    va, vb = f"v{result['a']['version']}", f"v{result['b']['version']}"
    metrics = Table("metric", title=f"{escape(name)}: {vb} against {va}", title_justify="left")
    for column in (va, vb, "delta"):
        metrics.add_column(column, justify="right")
    for key, entry in sorted(result["metrics"].items()):
        metrics.add_row(escape(key), _num(entry.get("a")), _num(entry.get("b")), _delta(entry.get("delta")))
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
    try:
        request = _client(token).request_promotion(name, version, alias=alias, reason=reason, weight=weight)
    except ClientError as exc:
        _fail_client(exc)
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
    try:
        requests = _client(token).list_requests(model=model, state=state)
    except ClientError as exc:
        _fail_client(exc)
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
            _num(request.get("weight")), request["state"], escape(request["requested_by"]),
            _when(request.get("requested_at")), escape(request["reason"]), verdict,
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
    try:
        result = _client(token).approve(request_id, reason)
    except ClientError as exc:
        _fail_client(exc)
    _moved(result, f"request #{request_id} approved: ")


@models_app.command("reject")
def models_reject(
    request_id: int,
    reason: Annotated[str, typer.Option(help="Why, for the requester and the audit log.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Reject someone else's pending request."""
    try:
        request = _client(token).reject(request_id, reason)
    except ClientError as exc:
        _fail_client(exc)
    by = escape(request.get("decided_by") or "?")
    console.print(f"request #{request['id']} {request['state']} by {by}")


@models_app.command("withdraw")
def models_withdraw(request_id: int, token: TokenOption = DEV_ADMIN_TOKEN) -> None:
    """Withdraw your own pending request."""
    try:
        request = _client(token).cancel_request(request_id)
    except ClientError as exc:
        _fail_client(exc)
    console.print(f"request #{request['id']} {request['state']}")


@models_app.command("rollback")
def models_rollback(
    name: str,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Point production back at the version it named before the current one (approver)."""
    try:
        result = _client(token).rollback(name, reason)
    except ClientError as exc:
        _fail_client(exc)
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
    try:
        history = _client(token).history(name, at=at)
    except ClientError as exc:
        _fail_client(exc)
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
            _when(move["at"]), move["action"], move["alias"], f"v{move['version']}",
            f"v{move['previous_version']}" if move.get("previous_version") else "-", by,
            f"#{move['request_id']}" if move.get("request_id") else "-", escape(move.get("reason") or ""),
        )
    console.print(table)
    if at is not None:
        then = history.get("production_at")
        console.print(f"production at {_when(history.get('at'))} UTC: {'v' + then if then else 'none'}")


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
        _fail("--clear and --set exclude each other")
    client = _client(token)
    try:
        if rules or clear:
            gate = client.set_gate(name, rules or [], aliases)
        else:
            if aliases:
                _fail("--alias only goes with --set")
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
        console.print(f"set by {escape(gate['updated_by'])} at {_when(gate.get('updated_at'))}")


@models_app.command("archive")
def models_archive(
    name: str, version: str,
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Archive a version: it can no longer be given an alias (approver)."""
    try:
        result = _client(token).archive(name, version, reason)
    except ClientError as exc:
        _fail_client(exc)
    console.print(f"{escape(result['model'])} v{result['version']} archived")


@models_app.command("restore")
def models_restore(
    name: str, version: str,
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Restore an archived version (approver)."""
    try:
        result = _client(token).restore(name, version, reason)
    except ClientError as exc:
        _fail_client(exc)
    console.print(f"{escape(result['model'])} v{result['version']} restored")


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
    try:
        result = _client(token).promote(name, version, alias=alias, reason=reason, weight=weight)
    except ClientError as exc:
        _fail_client(exc)
    _moved(result, "")


@models_app.command("unalias")
def models_unalias(
    name: str,
    alias: Annotated[str, typer.Argument(help="canary, shadow or staging: stop serving it.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Remove an alias (end a canary or a shadow; approver); serving unloads its version."""
    try:
        result = _client(token).remove_alias(name, alias, reason=reason)
    except ClientError as exc:
        _fail_client(exc)
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
