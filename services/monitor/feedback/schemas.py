from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shipyard_common.times import UtcDatetime

# Labels one POST /feedback may carry; more are sent in several calls.
MAX_LABELS = 10_000
# A batched request never has more rows than serving takes (its max_batch_rows is far below this).
MAX_ROW = 1_000_000
MAX_LABEL_CHARS = 256

Label = int | float | str


class FeedbackItem(BaseModel):
    """The true label (a class) or value (a regression) of one row of one answered request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64, description="The X-Request-ID serving answered.")
    row: int = Field(default=0, ge=0, le=MAX_ROW, description="The row's index within the request's batch.")
    label: Label = Field(description="A class (as trained: name or number) or a true value.")

    @field_validator("label", mode="before")
    @classmethod
    def _plain_label(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"a label is a number or a string, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a label must be a finite number")
        if isinstance(value, str) and not 0 < len(value) <= MAX_LABEL_CHARS:
            raise ValueError(f"a text label has 1 to {MAX_LABEL_CHARS} characters")
        return value


class FeedbackAccepted(BaseModel):
    """What one POST stored. Labels are joined and scored by the monitor's loop, not by this call."""

    received: int
    created: int = Field(description="Rows (request_id, row) labelled for the first time.")
    replaced: int = Field(description="Rows whose earlier, different label this call replaced.")
    unchanged: int = Field(description="Rows that already had exactly this label.")
    matched: int = Field(description="Labels whose request is in the prediction log now.")
    pending: int = Field(
        description="Labels whose request is not logged yet (serving ships its log asynchronously); "
        "joined when it is."
    )


class LiveMetricsPublic(BaseModel):
    labelled: int = Field(description="Labelled rows the metrics are computed on.")
    accuracy: float | None = None
    f1: float | None = Field(default=None, description="Macro F1 over the classes seen (sklearn's).")
    mae: float | None = None
    rmse: float | None = None


class WindowLivePublic(LiveMetricsPublic):
    window_id: int
    started_at: UtcDatetime
    ended_at: UtcDatetime
    rows: int
    performance_at: UtcDatetime | None = Field(description="When these metrics were computed (UTC).")


class VersionLivePublic(BaseModel):
    version: str
    task: str = Field(description="classification or regression")
    overall: LiveMetricsPublic = Field(description="Over every labelled row of the version's closed windows.")
    latest: WindowLivePublic = Field(description="The newest window with labels (what the gauges show).")
    windows: list[WindowLivePublic] = Field(description="Its windows with labels, newest first.")


class RejectedLabelPublic(BaseModel):
    request_id: str
    row: int
    label: Label
    version: str | None
    error: str
    created_at: UtcDatetime


class FeedbackSummary(BaseModel):
    model: str
    joined: int = Field(description="Labels joined to this model's predictions (rejected ones included).")
    rejected: int = Field(description="Joined labels that cannot be scored; ``recent_rejected`` says why.")
    versions: list[VersionLivePublic]
    recent_rejected: list[RejectedLabelPublic]
