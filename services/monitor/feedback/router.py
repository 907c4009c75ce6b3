"""Ground truth over HTTP: labels in, live metrics out; both read or write rows, nothing is computed here."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request

from services.monitor.feedback import service
from services.monitor.feedback.schemas import MAX_LABELS, FeedbackAccepted, FeedbackItem, FeedbackSummary
from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.paths import PlainName, plain_names
from shipyard_common.web import AUTHED_ERRORS, error_responses

# A model named in a path or a filter is one plain name, refused (400) before any lookup.
router = APIRouter(tags=["feedback"], dependencies=[Depends(plain_names(model="model"))],
                   responses=error_responses(*AUTHED_ERRORS))

# The least role that may change anything: a client application labels what it was answered, it
# neither promotes nor administers. Admin may too; a viewer token may not write.
SENDER = Role.TRAINER


@router.post("/feedback", response_model=FeedbackAccepted, responses=error_responses(413))
def send_feedback(
    request: Request,
    principal: Annotated[Principal, Depends(role_checker(SENDER))],
    items: Annotated[list[FeedbackItem], Body(
        max_length=MAX_LABELS,
        description=f"At most {MAX_LABELS} labels: [{{request_id, row (default 0), label}}, …].")],
) -> FeedbackAccepted:
    """Store true labels of answered requests; the monitor's loop joins and scores them."""
    return service.store_labels(database=request.app.state.monitor.database, items=items,
                                created_by=principal.name)


@router.get("/feedback/{model}", response_model=FeedbackSummary, responses=error_responses(404))
def get_feedback(
    request: Request,
    model: PlainName,
    _: Annotated[Principal, Depends(role_checker(Role.VIEWER))],
    windows: Annotated[int, Query(ge=1, le=500, description="Windows per version, newest first.")] = 20,
) -> FeedbackSummary:
    """Live metrics of each version of ``model`` with labels, as the loop last computed them."""
    return service.summarize(database=request.app.state.monitor.database, model=model, windows=windows)
