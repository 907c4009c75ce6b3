"""Dataset routes: versions of datasets in the DVC data repository, validated before they are accepted.

The trainer answers them because it is the service that checks a job's dataset at submit and
knows which jobs, and so which models, trained on each version. The logic lives in
``shipyard_common.datasets``, shared with the worker, the monitor and the flows.
"""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal, cast

import pandas as pd
from fastapi import APIRouter, Depends, Query, Request, status
from starlette.concurrency import run_in_threadpool

from services.trainer.api import service
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.datasets import LATEST, DataRepo, validate_dataset_name, validate_ref
from shipyard_common.db import Database
from shipyard_common.errors import InvalidInput, PayloadTooLarge
from shipyard_common.paths import PlainName, plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A dataset named in a path is one plain name, refused (400) before any lookup.
router = APIRouter(tags=["datasets"], dependencies=[Depends(plain_names(name="dataset"))],
                   responses=error_responses(*AUTHED_ERRORS))
# The routes below read their bodies as bytes (files, not JSON); what they take, for the OpenAPI.
DATASET_BODY = {"requestBody": {
    "required": True, "description": "The dataset file: CSV with a header row, or Parquet.",
    "content": {"text/csv": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}}}}}
RULES_BODY = {"requestBody": {"required": True, "description": "The rules file (YAML, docs/data.md).",
                              "content": {"application/yaml": {"schema": {"type": "string"}},
                                          "text/plain": {"schema": {"type": "string"}}}}}

Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Trainer = Annotated[Principal, Depends(role_checker(Role.TRAINER))]

PARQUET_TYPES = {"application/vnd.apache.parquet", "application/x-parquet", "application/parquet"}


def _repo(request: Request) -> DataRepo:
    return cast(DataRepo, request.app.state.data_repo)


def _database(request: Request) -> Database:
    return cast(Database, request.app.state.database)


RepoDep = Annotated[DataRepo, Depends(_repo)]


def parse_frame(raw: bytes, fmt: str) -> pd.DataFrame:
    """A CSV (header row) or Parquet file as a frame; 400 naming the format when it does not parse."""
    if not raw:
        raise InvalidInput("the request body is empty: send the dataset file's bytes")
    try:
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(raw))
        return pd.read_csv(io.BytesIO(raw))
    except Exception as exc:  # pandas and pyarrow raise many kinds for a malformed file
        raise InvalidInput(f"the body cannot be read as {fmt}: {exc}") from None


@router.post("/datasets/{name}", status_code=status.HTTP_201_CREATED, openapi_extra=DATASET_BODY,
             responses=error_responses(404, 409, 413))
async def add_dataset(
    name: PlainName,
    request: Request,
    repo: RepoDep,
    _: Trainer,
    tag: str | None = None,
    format: Annotated[Literal["csv", "parquet"] | None, Query(description="else from Content-Type")] = None,
    allow_schema_change: bool = False,
) -> dict[str, Any]:
    """Version the body (CSV or Parquet) as dataset ``name``; 422 with every failing rule when refused."""
    validate_dataset_name(name)
    limit = request.app.state.settings.dataset_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the dataset is {int(declared)} bytes, over the limit of {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLarge(f"the dataset is {len(raw)} bytes, over the limit of {limit}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fmt = format or ("parquet" if content_type in PARQUET_TYPES else "csv")
    frame = await run_in_threadpool(parse_frame, raw, fmt)
    version = await run_in_threadpool(
        repo.add, name, frame, tag=tag, allow_schema_change=allow_schema_change, source=fmt
    )
    return {"name": version.name, "rev": version.rev, "rows": version.rows, "columns": version.columns,
            "md5": version.md5, "tags": version.tags, "created": version.created}


@router.put("/datasets/{name}/rules", openapi_extra=RULES_BODY, responses=error_responses(404, 413))
async def set_rules(name: PlainName, request: Request, repo: RepoDep, _: Trainer) -> dict[str, Any]:
    """Check in the dataset's rules (YAML, docs/data.md); 400 naming what does not parse."""
    text = (await request.body()).decode("utf-8", errors="replace")
    rev = await run_in_threadpool(repo.set_rules, name, text)
    return {"name": name, "rev": rev, "rules": text}


# Plain defs below: git and DVC block, so FastAPI runs these in its thread pool.
@router.get("/datasets")
def list_datasets(repo: RepoDep, _: Viewer) -> list[dict[str, Any]]:
    out = []
    for name in repo.names():
        versions = repo.versions(name)
        newest = versions[0]
        out.append({"name": name, "versions": len(versions), "latest": newest["rev"], "rows": newest["rows"],
                    "md5": newest["md5"], "committed_at": newest["committed_at"], "tags": newest["tags"]})
    return out


@router.get("/datasets/{name}", responses=error_responses(404))
def list_versions(name: PlainName, repo: RepoDep, _: Viewer) -> dict[str, Any]:
    return {"name": name, "versions": repo.versions(name), "rules": repo.rules_text(name)}


@router.get("/datasets/{name}/versions/{rev}", responses=error_responses(404))
def show_version(
    name: PlainName, rev: str, repo: RepoDep, database: Annotated[Database, Depends(_database)], _: Viewer
) -> dict[str, Any]:
    """One version (``rev``: a commit id, short or full, a tag or ``latest``) and the models trained on it."""
    info = repo.info(name, rev or LATEST)
    info["models"] = service.models_trained_on(database=database, dataset=name, rev=info["rev"])
    return info


@router.get("/datasets/{name}/diff", responses=error_responses(404))
def diff_versions(name: PlainName, a: str, b: str, repo: RepoDep, _: Viewer) -> dict[str, Any]:
    # Both revisions checked before either is looked up: a bad ``b`` is named even when ``a`` is missing.
    validate_ref(a)
    validate_ref(b)
    return repo.diff(name, a, b)
