from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, Self

from pydantic import BaseModel, Field, field_validator, model_validator

from shipyard_common.lineage import ALIASES, CANARY, PRODUCTION

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
    weight: float | None = Field(
        default=None, gt=0, le=1,
        description="Canary only: the share of requests the canary answers, in (0, 1]. Left out: the "
        "model's current canary weight, else 0.1.",
    )

    @model_validator(mode="after")
    def _weight_only_for_canary(self) -> Self:
        if self.weight is not None and self.alias != CANARY:
            raise ValueError(f"weight applies to the '{CANARY}' alias only, not to {self.alias!r}")
        return self


class PromotePublic(BaseModel):
    model: str
    version: str
    alias: str
    previous_version: str | None
    weight: float | None = Field(default=None, description="The canary weight now in force (canary only).")


class AliasRemovedPublic(BaseModel):
    model: str
    alias: str
    previous_version: str


class AuditPublic(BaseModel):
    id: int
    model: str
    version: str
    alias: str
    previous_version: str | None
    action: str = Field(default="promote", description="promote (the alias moved) or remove (deleted).")
    weight: float | None = Field(default=None, description="The canary weight set by this move.")
    actor: str
    reason: str | None
    at: datetime

    @field_validator("at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # The database stores naive UTC; say so, or clients read it as their local time.
        return value if value.tzinfo else value.replace(tzinfo=UTC)
