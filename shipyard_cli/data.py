"""``shipyard data``: dataset versions, validated by the trainer's dataset API and kept with DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from shipyard_cli.client import ClientError
from shipyard_cli.common import TokenOption, client_for, console, fail
from shipyard_cli.views import num, when

data_app = typer.Typer(help="Datasets versioned with DVC.", no_args_is_help=True)


def _refusal(exc: ClientError) -> None:
    """A refused version: the message, then each failing rule with its figures."""
    details = exc.details if isinstance(exc.details, dict) else {}
    failures = details.get("failures") or []
    if failures:
        table = Table("rule", "column", "what failed", title="refused", title_justify="left")
        for failure in failures:
            table.add_row(escape(failure["rule"]), escape(str(failure.get("column") or "-")),
                          escape(failure["message"]))
        console.print(table)
    fail(exc.message)


@data_app.command("add")
def data_add(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A CSV (header row) or Parquet file.")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="The dataset's name.")],
    tag: Annotated[str | None, typer.Option(help="A name for this version, e.g. v3.")] = None,
    allow_schema_change: Annotated[
        bool, typer.Option(help="Accept columns or dtypes that differ from the previous version.")
    ] = False,
    token: TokenOption = "dev-admin-token",
) -> None:
    """Validate PATH and version it as dataset NAME; prints the revision to put in a job spec."""
    fmt = "parquet" if path.suffix.lower() in {".parquet", ".pq"} else "csv"
    with client_for(token) as client:
        try:
            version = client.add_dataset(name, path.read_bytes(), fmt=fmt, tag=tag,
                                         allow_schema_change=allow_schema_change)
        except ClientError as exc:
            _refusal(exc)
    state = "added" if version["created"] else "unchanged, the latest version is"
    tags = f" (tags: {', '.join(version['tags'])})" if version["tags"] else ""
    console.print(f"dataset {escape(name)}: {state} {version['rows']} rows, revision "
                  f"[bold]{version['rev']}[/bold]{escape(tags)}")


@data_app.command("rules")
def data_rules(
    name: str,
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The rules YAML (docs/data.md).")],
    token: TokenOption = "dev-admin-token",
) -> None:
    """Check in the validation rules of dataset NAME; the next version must pass them."""
    with client_for(token) as client:
        try:
            answer = client.set_dataset_rules(name, path.read_text())
        except ClientError as exc:
            fail(exc.message)
    console.print(f"rules of {escape(name)} checked in at {answer['rev'][:12]}")


@data_app.command("list")
def data_list(token: TokenOption = "dev-admin-token") -> None:
    """Every dataset with its latest version."""
    with client_for(token) as client:
        try:
            datasets = client.list_datasets()
        except ClientError as exc:
            fail(exc.message)
    table = Table("dataset", "versions", "latest", "rows", "tags", "committed")
    for item in datasets:
        table.add_row(escape(item["name"]), str(item["versions"]), item["latest"][:12], num(item["rows"]),
                      escape(", ".join(item["tags"])), when(item["committed_at"]))
    console.print(table)


def _split(ref: str) -> tuple[str, str]:
    name, _, rev = ref.partition("@")
    return name, rev or "latest"


@data_app.command("show")
def data_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@REV (a commit id, a tag or latest).")],
    token: TokenOption = "dev-admin-token",
) -> None:
    """One version: schema, rows, content hash, summary statistics and the models trained on it."""
    name, rev = _split(ref)
    with client_for(token) as client:
        try:
            info = client.show_dataset(name, rev)
        except ClientError as exc:
            fail(exc.message)
    tags = ", ".join(info["tags"]) or "-"
    console.print(f"[bold]{escape(name)}[/bold] @ {info['rev']} (tags: {escape(tags)}"
                  f"{', latest' if info['latest'] else ''})")
    console.print(f"{info['rows']} rows, {len(info['columns'])} columns, md5 {info['md5']}")
    table = Table("column", "dtype", "nulls", "distinct", "min", "mean", "max", "top values")
    for column, entry in info["stats"].items():
        top = ", ".join(f"{k} ({v})" for k, v in list((entry.get("top") or {}).items())[:3])
        table.add_row(escape(column), entry["dtype"], str(entry["nulls"]), str(entry["distinct"]),
                      num(entry.get("min")), num(entry.get("mean")), num(entry.get("max")), escape(top))
    console.print(table)
    models: list[dict[str, Any]] = info.get("models") or []
    if models:
        trained = [f"{escape(m['model_name'])} v{m['model_version'] or '?'} (job {m['job_id'][:8]})"
                   for m in models]
        console.print("trained on it: " + ", ".join(trained))
    else:
        console.print("trained on it: no model yet")


@data_app.command("diff")
def data_diff(name: str, rev1: str, rev2: str, token: TokenOption = "dev-admin-token") -> None:
    """REV2 against REV1: schema changes, row counts and the distribution shift of every column."""
    with client_for(token) as client:
        try:
            report = client.diff_datasets(name, rev1, rev2)
        except ClientError as exc:
            fail(exc.message)
    schema, rows = report["schema"], report["rows"]
    console.print(f"{escape(name)}: {report['a'][:12]} → {report['b'][:12]}; rows {rows['a']} → {rows['b']} "
                  f"({rows['delta']:+d})")
    for label, key in (("added", "added"), ("removed", "removed")):
        if schema[key]:
            console.print(f"columns {label}: {escape(', '.join(schema[key]))}")
    for column, change in schema["changed"].items():
        console.print(f"dtype of {escape(column)}: {change['was']} → {change['now']}")
    table = Table("column", "method", "shift", "p-value", "mean a", "mean b", "nulls a → b")
    for column, entry in report["columns"].items():
        mean = entry.get("mean") or {}
        table.add_row(escape(column), entry["method"], num(entry["shift"]), num(entry.get("p_value")),
                      num(mean.get("a")), num(mean.get("b")),
                      f"{entry['nulls']['a']} → {entry['nulls']['b']}")
    console.print(table)
