from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from services.trainer import service
from services.trainer.schemas import JobCreate, JobPublic, JobState
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.db import Database

router = APIRouter(tags=["jobs"])


def get_database(request: Request) -> Database:
    return request.app.state.database


def get_enqueue(request: Request) -> service.Enqueue:
    return request.app.state.enqueue


DatabaseDep = Annotated[Database, Depends(get_database)]
Viewer = Annotated[Principal, Depends(role_checker(Role.VIEWER))]
Trainer = Annotated[Principal, Depends(role_checker(Role.TRAINER))]


# Plain defs: the database and the broker block, so FastAPI runs these in its thread pool.
@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def create_job(
    spec: JobCreate,
    database: DatabaseDep,
    enqueue: Annotated[service.Enqueue, Depends(get_enqueue)],
    _: Trainer,
) -> JobPublic:
    return service.create_job(database=database, spec=spec, enqueue=enqueue)


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, database: DatabaseDep, _: Viewer) -> JobPublic:
    return service.get_job(database=database, job_id=job_id)


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(
    database: DatabaseDep,
    _: Viewer,
    state: JobState | None = None,
    model_name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> list[JobPublic]:
    return service.list_jobs(database=database, state=state, model_name=model_name, limit=limit)
