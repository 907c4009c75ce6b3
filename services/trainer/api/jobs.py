from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.trainer.api import service
from services.trainer.jobs import store
from services.trainer.jobs.schemas import TERMINAL_STATES, JobCreate, JobPublic, JobState
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.datasets import DataRepo, DatasetNotFound
from shipyard_common.db import Database
from shipyard_common.errors import ValidationFailed
from shipyard_common.orm import MAX_BIGINT
from shipyard_common.paths import plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model named in a filter is one plain name, refused (400) before any lookup.
router = APIRouter(tags=["jobs"], dependencies=[Depends(plain_names(model_name="model"))],
                   responses=error_responses(*AUTHED_ERRORS))


def get_database(request: Request) -> Database:
    return cast(Database, request.app.state.database)


def get_data_repo(request: Request) -> DataRepo:
    return cast(DataRepo, request.app.state.data_repo)


def get_enqueue(request: Request) -> store.Enqueue:
    return cast(store.Enqueue, request.app.state.enqueue)


DatabaseDep = Annotated[Database, Depends(get_database)]
Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Trainer = Annotated[Principal, Depends(role_checker(Role.TRAINER))]


# Plain defs: the database and the broker block, so FastAPI runs these in its thread pool.
@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses=error_responses(413))
def create_job(
    spec: JobCreate,
    database: DatabaseDep,
    enqueue: Annotated[store.Enqueue, Depends(get_enqueue)],
    data_repo: Annotated[DataRepo, Depends(get_data_repo)],
    _: Trainer,
) -> JobPublic:
    return service.create_job(database=database, spec=pin_dataset(data_repo, spec), enqueue=enqueue)


def pin_dataset(data_repo: DataRepo, spec: JobCreate) -> JobCreate:
    """The spec with its dataset revisions (``data.rev``, ``data.split.test_rev``) resolved to full commit
    ids; a dataset or revision that does not exist is refused now (422 naming it), not when a worker
    gets to the job."""
    rev = _pinned(data_repo, spec.data.dataset, spec.data.rev, "data.rev")
    data = spec.data.model_copy(update={"rev": rev})
    split = spec.data.split
    if split is not None and split.test_rev is not None:
        test_rev = _pinned(data_repo, spec.data.dataset, split.test_rev, "data.split.test_rev")
        data = data.model_copy(update={"split": split.model_copy(update={"test_rev": test_rev})})
    return spec.model_copy(update={"data": data})


def _pinned(data_repo: DataRepo, dataset: str, rev: str, rev_field: str) -> str:
    try:
        return data_repo.resolve(dataset, rev)
    except DatasetNotFound as exc:
        field = "data.dataset" if exc.field == "dataset" else rev_field
        raise ValidationFailed(
            f"invalid request: {field}: {exc.message}",
            details=[{"field": field, "message": exc.message, "type": "not_found"}],
        ) from None


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=error_responses(404))
def get_job(job_id: str, database: DatabaseDep, _: Viewer) -> JobPublic:
    return store.get_job(database=database, job_id=job_id)


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(
    database: DatabaseDep,
    _: Viewer,
    state: JobState | None = None,
    model_name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> list[JobPublic]:
    return service.list_jobs(database=database, state=state, model_name=model_name, limit=limit)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=error_responses(404, 409))
def cancel_job(job_id: str, database: DatabaseDep, _: Trainer) -> JobPublic:
    """Cancel a queued or running job: 404 for an unknown id, 409 for one that has ended."""
    return service.cancel_job(database=database, job_id=job_id)


class LogLine(BaseModel):
    line: int = Field(description="Numbered from 1.")
    time: str
    level: str
    message: str


class JobLogs(BaseModel):
    job_id: str
    state: JobState
    lines: list[LogLine]
    next_after: int = Field(description="Pass it back as ``after`` to read on.")


# stream=true: Server-Sent Events, each a `line` (its id the line number, its data the line as JSON) or
# the one `end` (its data the final state and next_after). itemSchema: one event (OpenAPI 3.2).
LOG_EVENT = {"itemSchema": {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"enum": ["line", "end"]}, "id": {"type": "string", "pattern": "^[0-9]+$"},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
}}


@router.get("/jobs/{job_id}/logs", response_model=JobLogs, responses={
    200: {"content": {"text/event-stream": LOG_EVENT},
          "description": "JSON; with stream=true, Server-Sent Events: `line` events, then one `end`."},
    **error_responses(404)})
def job_logs(
    job_id: str,
    request: Request,
    database: DatabaseDep,
    _: Viewer,
    after: Annotated[
        int, Query(ge=0, le=MAX_BIGINT, description="return the lines numbered above this")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LOG_LIMIT)] = 1000,
    stream: bool = False,
) -> JobLogs | StreamingResponse:
    """The worker's log lines for a job, numbered from 1.

    Plain: ``{"state", "lines", "next_after"}``; pass ``next_after`` back as ``after`` to follow.
    ``stream=true``: ``text/event-stream``, one ``line`` event per line (its ``id`` is the line
    number), then one ``end`` event with the final state once the job has ended.
    """
    state, lines = service.read_logs(database=database, job_id=job_id, after=after, limit=limit)
    if not stream:
        return JobLogs(job_id=job_id, state=state, lines=[LogLine(**line) for line in lines],
                       next_after=lines[-1]["line"] if lines else after)
    after = max(after, _last_event_id(request.headers.get("last-event-id", "")))
    interval = request.app.state.settings.log_poll_interval_s
    return StreamingResponse(
        _follow(request, database, job_id, after, interval),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _last_event_id(header: str) -> int:
    """The line a reconnecting EventSource saw last: ASCII digits within a BIGINT, else 0 (none)."""
    if 0 < len(header) <= 19 and header.isascii() and header.isdigit() and int(header) <= MAX_BIGINT:
        return int(header)
    return 0


async def _follow(
    request: Request, database: Database, job_id: str, after: int, interval: float
) -> AsyncIterator[str]:
    # A worker may write its last lines just after the row ends (a cancelled job stopping):
    # once the state is final, keep reading until a round brings nothing new.
    ended_quiet = 0
    while True:
        state, lines = await run_in_threadpool(
            service.read_logs, database=database, job_id=job_id, after=after, limit=service.MAX_LOG_LIMIT
        )
        for line in lines:
            after = line["line"]
            yield f"event: line\nid: {after}\ndata: {json.dumps(line)}\n\n"
        if state in TERMINAL_STATES:
            ended_quiet = 0 if lines else ended_quiet + 1
            if ended_quiet >= 3:
                yield f"event: end\ndata: {json.dumps({'state': state.value, 'next_after': after})}\n\n"
                return
        if await request.is_disconnected():
            return
        if not lines:
            await asyncio.sleep(interval)
