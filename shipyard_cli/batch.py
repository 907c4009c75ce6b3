"""``shipyard predict-batch``: score a dataset version with a model version (the flow ``batch_predict``).

A top-level command; ``shipyard_cli.main`` registers it on the root app. The flow runs in this
process, recorded by the platform's Prefect server; the predictions become a new version of the
output dataset in the data repository, and the monitor sees them as the model's (role ``batch``).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from shipyard_cli.common import console, fail, platform_settings
from shipyard_common.errors import ShipyardError

CHUNK_ROWS = 50_000  # pipelines.batch.CHUNK_ROWS, repeated: importing pipelines here would load Prefect


def predict_batch(
    dataset: Annotated[str, typer.Argument(help="The dataset to score.")],
    model: Annotated[str, typer.Argument(help="The registered model that scores it.")],
    rev: Annotated[str, typer.Option(help="The dataset's revision: commit id, tag or 'latest'.")] = "latest",
    alias: Annotated[str, typer.Option(help="The model's alias to score with.")] = "production",
    version: Annotated[str | None, typer.Option(help="A model version instead of --alias.")] = None,
    output: Annotated[str | None, typer.Option(
        help="The output dataset's name (default <dataset>.<model>.predictions).")] = None,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk (a rerun resumes by chunk).",
                                            min=1)] = CHUNK_ROWS,
    id_column: Annotated[str | None, typer.Option(help="A dataset column copied into the output.")] = None,
) -> None:
    """Score a dataset version in chunks; write the predictions as a new dataset version (Parquet,
    DVC) with its lineage, and feed them to the monitor. A rerun skips the chunks already written."""
    from pipelines.batch import batch_predict

    platform = platform_settings()
    try:
        result = batch_predict(dataset=dataset, model_name=model, rev=rev, alias=alias, version=version,
                               output=output, chunk_rows=chunk_rows, id_column=id_column, platform=platform)
    except ShipyardError as exc:  # an unknown dataset, revision, model or alias; columns that do not fit
        fail(str(exc))
    except Exception as exc:  # MLflow, Prefect or the database not answering, a chunk that kept failing
        fail(f"batch_predict failed: {exc} (is 'shipyard up' running? a rerun resumes from the chunks "
             "already written)")
    console.print(f"{result['rows']} rows of {dataset}@{result['dataset_rev'][:12]} scored by {model} "
                  f"v{result['model_version']}: {result['output']} at {result['output_rev'][:12]} "
                  f"({result['skipped_chunks']} of {result['chunks']} chunks already written)")
    console.print_json(json.dumps(result))
