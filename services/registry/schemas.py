from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from shipyard_common.lineage import ALIASES, PRODUCTION

# Built from lineage.ALIASES so that the trainer, registry and serving agree on one list.
AliasName = Literal[ALIASES]  # type: ignore[valid-type]


class ModelPublic(BaseModel):
    name: str
    description: str | None = None
    aliases: dict[str, str] = Field(description="Alias → version it points at.")
    latest_version: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


class VersionPublic(BaseModel):
    name: str
    version: str
    run_id: str | None = None
    status: str | None = None
    source: str | None = None
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    metrics: dict[str, float] | None = Field(
        default=None, description="Latest metrics of the run that produced the version; null if unreadable."
    )
    created_at: datetime | None = None


class PromoteRequest(BaseModel):
    alias: AliasName = PRODUCTION
    reason: str | None = Field(default=None, max_length=2000)


class PromotePublic(BaseModel):
    model: str
    version: str
    alias: str
    previous_version: str | None


class AuditPublic(BaseModel):
    id: int
    model: str
    version: str
    alias: str
    previous_version: str | None
    actor: str
    reason: str | None
    at: datetime

    @field_validator("at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # The database stores naive UTC; say so, or clients read it as their local time.
        return value if value.tzinfo else value.replace(tzinfo=UTC)
