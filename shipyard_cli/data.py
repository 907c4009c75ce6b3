"""``shipyard data``: datasets versioned with DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shipyard_cli.common import console, fail, platform_settings

data_app = typer.Typer(help="Datasets versioned with DVC.", no_args_is_help=True)


@data_app.command("add")
def data_add(
    name: str,
    csv: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A CSV file with a header row.")],
) -> None:
    """Version a CSV file as dataset NAME with DVC; prints the revision to put in a job spec."""
    import pandas as pd

    from shipyard_common.datasets import DataRepo
    from shipyard_common.errors import ShipyardError

    platform = platform_settings()
    try:
        frame = pd.read_csv(csv)
    except (ValueError, OSError) as exc:
        fail(f"cannot read {csv} as CSV: {exc}")
    try:
        version = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(name, frame)
    except ShipyardError as exc:
        fail(exc.message)
    console.print(f"dataset {name}: {version.rows} rows, revision [bold]{version.rev}[/bold]")
