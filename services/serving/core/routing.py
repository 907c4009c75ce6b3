"""Canary and shadow versions beside production, and which loaded version answers a request.

Besides ``production``, a registered model may carry two more aliases that serving loads:

* ``canary``: answers a share of the requests that name no version, drawn at random per request
  with the model's ``shipyard.canary_weight`` tag (default 0.1; the registry sets it when it moves
  the alias). The response names the version that answered (body and ``X-Model-Version``).
* ``shadow``: sees a copy of every request production or the canary answered, off the request
  path (a small bounded pool; when it is full the copy is skipped and counted, never waited for).
  Its predictions go to the prediction log with alias ``shadow`` and are never returned.

Both are loaded, warmed up and swapped like production (by the follower, on its one thread),
and a version that fails to load never replaces a working one. Explicit version routes and the
``canary``/``shadow`` labels address them too.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter

from services.serving.core.loaded import SIDE_ALIASES, slot
from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.lineage import (
    CANARY,
    PRODUCTION,
    SHADOW,
)

if TYPE_CHECKING:
    from services.serving.core.loaded import LoadedModels, ModelState, ServedModel
from services.serving.core.loaded import LoadedModels, ModelState, ServedModel

log = logging.getLogger("shipyard.serving.routing")

P = ParamSpec("P")
T = TypeVar("T")


def alias_status(state: ModelState) -> dict[str, Any]:
    """The canary and shadow fields of a model's status (``GET /v1/models/{name}``)."""
    return {
        "canary_weight": state.canary_weight,
        CANARY: state.canary.to_json(CANARY, state.canary_weight),
        SHADOW: state.shadow.to_json(SHADOW),
    }


def alias_version_status(state: ModelState, listed: set[str]) -> list[dict[str, Any]]:
    """TF Serving's ``model_version_status`` entries of the canary and shadow versions."""
    found: list[dict[str, Any]] = []
    for alias in SIDE_ALIASES:
        current = slot(state, alias)
        if current.served is not None and current.served.version not in listed:
            listed.add(current.served.version)
            found.append({"version": current.served.version, "state": "AVAILABLE",
                          "status": {"error_code": "OK", "error_message": ""}})
        target = current.target_version
        if target is not None and target not in listed:
            listed.add(target)
            failed = current.error is not None and current.failed_version == target
            found.append({"version": target, "state": "END" if failed else "LOADING",
                          "status": {"error_code": "UNKNOWN" if failed else "OK",
                                     "error_message": current.error if failed else ""}})
    return found


def alias_versions(state: ModelState) -> dict[str, str]:
    """The versions the canary and shadow serve now: alias → version."""
    return {alias: s.served.version for alias in SIDE_ALIASES if (s := slot(state, alias)).served is not None}


# -- the request path ---------------------------------------------------------------------------


class Router:
    """Picks the loaded version that answers a request: by label, by version, or by a weighted draw."""

    def __init__(self, seed: int | None = None) -> None:
        # random.Random's methods are atomic under the GIL: one generator serves every thread.
        self._rng = random.Random(seed)

    def resolve(
        self, models: LoadedModels, name: str, *, version: str | None = None, label: str | None = None,
        split: bool = False,
    ) -> ServedModel:
        state = models.state(name)
        if (state is not None and state.served is not None and version is None and label is None
                and (not split or state.canary.served is None)):
            return state.served  # the commonest case: production, no canary to draw
        served = models.served(name)  # raises when nothing serves the model
        if label is not None and label != PRODUCTION:
            found = slot(state, label).served if state is not None and label in SIDE_ALIASES else None
            if found is None:
                loaded = ", ".join(f"{alias} (version {v})" for alias, v in
                                   (alias_versions(state) if state else {}).items())
                raise NotFound(
                    f"model {name!r} has no version loaded under the label {label!r}: serving loads the "
                    f"'{PRODUCTION}' alias (version {served.version})"
                    + (f" and {loaded}" if loaded else "")
                )
            return found
        if version is not None and version != served.version:
            for alias in SIDE_ALIASES:
                candidate = slot(state, alias).served if state is not None else None
                if candidate is not None and candidate.version == version:
                    return candidate
            raise NotFound(
                f"model {name!r} version {version} is not loaded; version {served.version} "
                f"(the '{PRODUCTION}' alias) is"
            )
        if split and version is None and label is None and state is not None:
            canary = state.canary.served
            if canary is not None and self._rng.random() < state.canary_weight:
                return canary
        return served

    def current(self, models: LoadedModels, retired: ServedModel) -> ServedModel | None:
        """What now answers in place of ``retired`` (same model and alias), if anything."""
        state = models.state(retired.name)
        if state is None:
            return None
        if retired.alias == PRODUCTION:
            return state.served
        return slot(state, retired.alias).served


def hold(models: LoadedModels, router: Router, served: ServedModel) -> ServedModel:
    """Acquire the lease of ``served``, or of its successor if it was retired meanwhile: the one held.

    A version retired between being chosen and running is replaced by its successor in the
    same alias, which was serving that alias at some moment during the request. The caller
    releases the returned version's lease when its request is done.
    """
    for _ in range(3):
        if served.lease.acquire():
            return served
        successor = router.current(models, served)
        if successor is None or successor is served:
            raise Unavailable(
                f"model {served.name!r} version {served.version} was unloaded while this request "
                "was on its way; retry"
            )
        served = successor
    raise Unavailable(f"model {served.name!r} is being replaced; retry")


def leased(function: Callable[P, T]) -> Callable[P, T]:
    """Run ``function`` holding the lease of ``served`` (keyword-only) or its successor (:func:`hold`)."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        dataplane = kwargs["dataplane"]
        served = hold(dataplane.models, dataplane.router,  # type: ignore[attr-defined]
                      cast("ServedModel", kwargs["served"]))
        kwargs["served"] = served
        try:
            return function(*args, **kwargs)
        finally:
            served.lease.release()

    return run


# -- shadow traffic ---------------------------------------------------------------------------


class ShadowMirror:
    """Runs copies of requests on the shadow version, in a small pool, never making callers wait."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, workers: int = 2, capacity: int = 64
    ) -> None:
        registry = registry or CollectorRegistry()
        self.mirrored = Counter(
            "shipyard_shadow_requests", "Requests copied to the shadow version and run there",
            ["model", "version"], registry=registry,
        )
        self.skipped = Counter(
            "shipyard_shadow_skipped", "Requests not copied to the shadow version because its pool "
            "was full (or serving was stopping)", ["model"], registry=registry,
        )
        self.failed = Counter(
            "shipyard_shadow_failures", "Copies the shadow version refused or failed on",
            ["model", "version"], registry=registry,
        )
        self._workers = workers
        self._slots = threading.BoundedSemaphore(capacity)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="shadow")
            return self._pool

    def submit(self, shadow: ServedModel, run: Callable[[ServedModel], object], *, count: int = 1) -> bool:
        """Run ``run(shadow)`` (``count`` copied requests) in the pool; False (counted) when it is full."""
        if not self._slots.acquire(blocking=False):
            self.skipped.labels(shadow.name).inc(count)
            return False
        pool = self._executor()
        if pool is None:
            self._slots.release()
            self.skipped.labels(shadow.name).inc(count)
            return False

        def task() -> None:
            try:
                run(shadow)
                self.mirrored.labels(shadow.name, shadow.version).inc(count)
            except Exception as exc:  # the caller has its answer; the shadow's failure is only counted
                self.failed.labels(shadow.name, shadow.version).inc(count)
                log.info("the shadow %s version %s failed on a copied request: %s",
                         shadow.name, shadow.version, exc)
            finally:
                self._slots.release()

        try:
            pool.submit(task)
        except RuntimeError:  # shut down meanwhile
            self._slots.release()
            self.skipped.labels(shadow.name).inc(count)
            return False
        return True

    def close(self) -> None:
        """Finish the copies already taken (so their rows reach the log), take no more."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def shadow_of(models: LoadedModels, answered: ServedModel) -> ServedModel | None:
    """The shadow version that gets a copy of a request ``answered`` served, if any."""
    if answered.alias == SHADOW:
        return None
    state = models.state(answered.name)
    return state.shadow.served if state is not None else None


# -- status ---------------------------------------------------------------------------------------


def version_status(state: ModelState) -> list[dict[str, Any]]:
    """TF Serving's ``model_version_status`` for one model."""
    found: list[dict[str, Any]] = []
    if state.served is not None:
        found.append({"version": state.served.version, "state": "AVAILABLE",
                      "status": {"error_code": "OK", "error_message": ""}})
    target = state.target_version
    if target is not None and (state.served is None or state.served.version != target):
        if state.error and state.failed_version == target:
            found.append({"version": target, "state": "END",
                          "status": {"error_code": "UNKNOWN", "error_message": state.error}})
        else:
            found.append({"version": target, "state": "LOADING",
                          "status": {"error_code": "OK", "error_message": ""}})
    found.extend(alias_version_status(state, {entry["version"] for entry in found}))  # canary, shadow
    return found
