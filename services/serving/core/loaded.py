"""The loaded models: what each model serves now (production, canary, shadow) and why not.

A model's state is a frozen snapshot, replaced as a whole under a lock, so the request path reads
it without one. The follower (follower.py) changes it; routing (routing.py) reads it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, cast

from services.serving.batching.adaptive import Batcher, batchable, concurrency_for
from services.serving.batching.callcost import REMOTE_FORMATS, CallCost
from services.serving.core.leases import Lease, retire_runtime
from services.serving.core.metrics import ServingMetrics
from services.serving.runtimes.base import Runtime, Signature
from services.serving.runtimes.text import TextEncoder
from services.serving.settings import BatchingPolicy
from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.lineage import (
    CANARY,
    DEFAULT_CANARY_WEIGHT,
    PRODUCTION,
    SHADOW,
)

#: The aliases served beside production, in the order they are followed.
SIDE_ALIASES: tuple[str, ...] = (CANARY, SHADOW)
Alias = Literal["production", "canary", "shadow"]


# -- canary and shadow slots ------------------------------------------------------------------


@dataclass(frozen=True)
class AliasSlot:
    """What one extra alias (canary or shadow) of a model names, serves, and why it does not."""

    target_version: str | None = None
    served: ServedModel | None = None
    error: str | None = None
    failed_version: str | None = None
    failed_at: float | None = None

    @property
    def status(self) -> str | None:
        if self.target_version is None and self.served is None:
            return None
        if self.served is None:
            return "failed" if self.error else "loading"
        if self.served.version == self.target_version:
            return "serving"
        return "degraded" if self.error else "updating"

    def to_json(self, alias: str, weight: float | None = None) -> dict[str, Any] | None:
        if self.status is None:
            return None
        found: dict[str, Any] = {
            "role": alias,
            "version": self.served.version if self.served else None,
            "status": self.status,
            "target_version": self.target_version,
            "error": self.error,
            "failed_version": self.failed_version,
            "loaded_at": self.served.loaded_at.isoformat() if self.served else None,
        }
        if alias == CANARY:
            found["weight"] = weight
        return found


def slot(state: ModelState, alias: str) -> AliasSlot:
    return cast(AliasSlot, getattr(state, alias))

log = logging.getLogger("shipyard.serving.models")


def retire_served(served: ServedModel) -> None:
    """Close ``served``'s runtime once the requests holding its lease are done (routing.py)."""
    retire_runtime(served.runtime, served.lease)


Status = Literal["loading", "serving", "updating", "degraded", "failed"]


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    runtime: Runtime
    #: What requests are checked against: the version's stored signature, or the runtime's own.
    signature: Signature
    loaded_at: datetime
    #: production, canary or shadow: the alias it is loaded for (the prediction log's ``role`` column).
    alias: str = PRODUCTION
    #: Held by each request running on it; a replaced version is closed once they are done.
    lease: Lease = field(default_factory=Lease, compare=False, repr=False)
    #: How its concurrent requests are merged; None: never (each runs alone).
    batching: BatchingPolicy | None = field(default=None, compare=False, repr=False)
    #: CPU per runtime call: cheap versions run on the event loop (batching/callcost.py).
    cost: CallCost = field(default_factory=CallCost, compare=False, repr=False)
    #: A text model's tokenizer: raw text is taken in place of its token ids (runtimes/text.py).
    text: TextEncoder | None = field(default=None, compare=False, repr=False)
    #: A table's columns as fitted (type, categories, filling), for clients to read (runtimes/loader.py).
    columns: list[dict[str, Any]] | None = field(default=None, compare=False, repr=False)

    #: Gathers the version's concurrent requests into groups (batching/adaptive.py). Set at creation.
    batcher: Batcher = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        remote = self.runtime.format in REMOTE_FORMATS
        self.cost.remote = remote
        policy = self.batching
        merges = (policy is not None and policy.enabled and policy.max_batch_size > 1
                  and batchable(self.signature, self.runtime.signature))
        # A frozen dataclass: the derived field is set once, here.
        object.__setattr__(self, "batcher", Batcher(
            cost=self.cost, max_batch_size=policy.max_batch_size if policy and merges else 1,
            max_wait_s=policy.max_wait_s if policy else 0.0, merges=merges,
            concurrency=concurrency_for(remote),
        ))


@dataclass(frozen=True)
class ModelState:
    """A snapshot: replaced as a whole under the lock, so readers never see half an update."""

    name: str
    target_version: str | None = None
    served: ServedModel | None = None
    error: str | None = None
    failed_version: str | None = None
    failed_at: float | None = None
    #: The canary and shadow aliases, loaded beside production (routing.py).
    canary: AliasSlot = AliasSlot()
    shadow: AliasSlot = AliasSlot()
    #: Share of requests naming no version that the canary answers.
    canary_weight: float = DEFAULT_CANARY_WEIGHT

    @property
    def status(self) -> Status:
        if self.served is None:
            return "failed" if self.error else "loading"
        if self.served.version == self.target_version:
            return "serving"
        # Still answering with the previous version: either the new one failed, or it is on its way.
        return "degraded" if self.error else "updating"


class LoadedModels:
    """The in-memory table of models: what each should serve, what it serves, what went wrong."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._states: dict[str, ModelState] = {}
        self._lock = threading.Lock()
        self._metrics = metrics
        self.reconciled = threading.Event()

    def state(self, name: str) -> ModelState | None:
        return self._states.get(name)

    def states(self) -> list[ModelState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: s.name)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._states)

    def served(self, name: str) -> ServedModel:
        """The version that answers for ``name`` now, or an error a caller can act on."""
        state = self._states.get(name)
        if state is None:
            if not self.reconciled.is_set():
                raise Unavailable(
                    f"model {name!r} is not loaded yet: serving is still reading the registry; retry shortly"
                )
            raise NotFound(
                f"model {name!r} is not served: no registered model of that name has a "
                f"'{PRODUCTION}' alias (GET /v1/models lists what is served)"
            )
        if state.served is None:
            if state.error:
                raise Unavailable(
                    f"model {name!r} has no working version: version {state.failed_version} failed to "
                    f"load: {state.error}"
                )
            raise Unavailable(
                f"model {name!r} version {state.target_version} is still loading; retry shortly"
            )
        return state.served

    def _update(self, name: str, **changes: object) -> ModelState:
        with self._lock:
            current = self._states.get(name) or ModelState(name=name)
            updated = replace(current, **changes)  # type: ignore[arg-type]
            self._states[name] = updated
            return updated

    def set_target(self, name: str, version: str) -> ModelState:
        with self._lock:
            current = self._states.get(name) or ModelState(name=name)
            updated = replace(current, target_version=version)
            if current.failed_version not in (None, version):
                # The failure belongs to a version production no longer names.
                updated = replace(updated, error=None, failed_version=None, failed_at=None)
            self._states[name] = updated
            return updated

    def install(self, served: ServedModel) -> None:
        """Swap ``served`` in; the previous version stays alive for requests that hold it."""
        self._update(served.name, served=served, error=None, failed_version=None, failed_at=None)
        self._metrics.loaded_version.labels(served.name).set(float(served.version))

    def record_failure(self, name: str, version: str, error: str) -> None:
        self._update(name, error=error, failed_version=version, failed_at=time.monotonic())
        self._metrics.load_failures.labels(name).inc()

    def close_all(self) -> None:
        """At shutdown: release every runtime (TF Serving channels, sessions)."""
        for state in self.states():
            for served in (state.served, *(getattr(state, alias).served for alias in SIDE_ALIASES)):
                if served is not None:
                    with contextlib.suppress(Exception):
                        served.runtime.close()

    def remove(self, name: str) -> None:
        with self._lock:
            removed = self._states.pop(name, None)
        if removed is not None:
            for served in (removed.served, *(getattr(removed, alias).served for alias in SIDE_ALIASES)):
                if served is not None:
                    retire_served(served)
        with contextlib.suppress(KeyError):  # never loaded, so never labelled
            self._metrics.loaded_version.remove(name)
