"""Canary and shadow versions beside production, and which loaded version answers a request.

Besides ``production``, a registered model may carry two more aliases that serving loads:

* ``canary``: answers a share of the requests that name no version, drawn at random per request
  with the model's ``shipyard.canary_weight`` tag (default 0.1; the registry sets it when it moves
  the alias). The response names the version that answered (body and ``X-Model-Version``).
* ``shadow``: sees a copy of every request production or the canary answered, off the request
  path (a small bounded pool; when it is full the copy is skipped and counted, never waited for).
  Its predictions go to the prediction log with role ``shadow`` and are never returned.

Both are loaded, warmed up and swapped like production (by the follower, on its one thread),
and a version that fails to load never replaces a working one. Explicit version routes and the
``canary``/``shadow`` labels address them too.

A replaced or removed version is closed only once the requests running on it are done: every
request holds its version's :class:`Lease` while it runs, and :func:`retire` waits for the
holders to let go (a request that picks a version just as it is retired is answered by the
version now in its place).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter

from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.lineage import (
    CANARY,
    DEFAULT_CANARY_WEIGHT,
    PRODUCTION,
    SHADOW,
    TAG_CANARY_WEIGHT,
)

if TYPE_CHECKING:
    from services.serving.models import LoadedModels, ModelFollower, ModelState, ServedModel
    from services.serving.runtimes.base import Runtime

log = logging.getLogger("shipyard.serving.routing")

#: The aliases served beside production, in the order they are followed.
ROLES: tuple[str, ...] = (CANARY, SHADOW)
Role = Literal["production", "canary", "shadow"]

# A retired version stays open this long for requests that chose it just before the swap and
# have not started running yet; after that, it waits only for the requests holding it.
RETIRE_GRACE_S = 1.0
# A request stuck this long on a retired version (a hung TF Serving call) no longer keeps it open.
RETIRE_DRAIN_TIMEOUT_S = 600.0

P = ParamSpec("P")
T = TypeVar("T")


# -- leases: close a version only when its requests are done ------------------------------------


class Lease:
    """Counts the requests running on one loaded version; once retired, it takes no new ones."""

    def __init__(self) -> None:
        # acquire/release take the bare lock (a C-level context manager, every request twice);
        # only retire() waits on the condition, and only a retired lease is notified.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._holders = 0
        self._retired = False

    @property
    def holders(self) -> int:
        return self._holders

    def acquire(self) -> bool:
        """Hold the version for one request; False once it is retired (use its successor)."""
        with self._lock:
            if self._retired:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._retired and self._holders <= 0:
                self._cond.notify_all()

    def retire(self, timeout: float) -> bool:
        """Take no new holders and wait until the current ones are done; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retired = True
            while self._holders > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def retire_runtime(
    runtime: Runtime, lease: Lease | None, *, grace_s: float = RETIRE_GRACE_S,
    drain_timeout_s: float = RETIRE_DRAIN_TIMEOUT_S,
) -> None:
    """Close ``runtime`` in the background once the requests running on it are done."""

    def close() -> None:
        if lease is not None and grace_s > 0:
            time.sleep(grace_s)
        if lease is not None and not lease.retire(drain_timeout_s):
            log.warning("closing a replaced %s runtime with %d requests still on it after %ss",
                        runtime.format, lease.holders, drain_timeout_s)
        try:
            runtime.close()
        except Exception as exc:  # closing is best effort; the process keeps serving
            log.warning("closing a replaced %s runtime failed: %s", runtime.format, exc)

    threading.Thread(target=close, name="retire-runtime", daemon=True).start()


# -- canary and shadow slots ------------------------------------------------------------------


@dataclass(frozen=True)
class RoleSlot:
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

    def to_json(self, role: str, weight: float | None = None) -> dict[str, Any] | None:
        if self.status is None:
            return None
        found: dict[str, Any] = {
            "role": role,
            "version": self.served.version if self.served else None,
            "status": self.status,
            "target_version": self.target_version,
            "error": self.error,
            "failed_version": self.failed_version,
            "loaded_at": self.served.loaded_at.isoformat() if self.served else None,
        }
        if role == CANARY:
            found["weight"] = weight
        return found


def slot(state: ModelState, role: str) -> RoleSlot:
    return cast(RoleSlot, getattr(state, role))


def weight_from_tags(tags: Mapping[str, str] | None) -> float:
    """The model's canary weight tag, or the default when it is missing or unusable."""
    raw = (tags or {}).get(TAG_CANARY_WEIGHT)
    if raw is None:
        return DEFAULT_CANARY_WEIGHT
    try:
        weight = float(raw)
    except ValueError:
        weight = -1.0
    if not 0 < weight <= 1:
        log.warning("ignoring the canary weight tag %r: not a number in (0, 1]", raw)
        return DEFAULT_CANARY_WEIGHT
    return weight


def follow_roles(
    follower: ModelFollower, name: str, aliases: Mapping[str, str], tags: Mapping[str, str] | None
) -> None:
    """Move the canary and shadow of ``name`` (which production serves) to what the aliases name."""
    models = follower.models
    if models.state(name) is None:
        return
    models._update(name, canary_weight=weight_from_tags(tags))
    for role in ROLES:
        version = aliases.get(role)
        ensure_role(follower, name, role, None if version is None else str(version))


def ensure_role(follower: ModelFollower, name: str, role: str, version: str | None) -> None:
    """Load ``version`` as the ``role`` of ``name`` (None: unload it) unless it already is."""
    from services.serving.models import ServedModel, retire_served

    models = follower.models
    state = models.state(name)
    if state is None:
        return
    current = slot(state, role)
    if version is None:
        if current.status is None:
            return
        models._update(name, **{role: RoleSlot()})
        log.info("unloading the %s of %s (version %s): the alias is gone", role, name,
                 current.served.version if current.served else None)
        if current.served is not None:
            retire_served(current.served)
        return
    if current.target_version != version:
        changed = replace(current, target_version=version)
        if current.failed_version not in (None, version):
            changed = replace(changed, error=None, failed_version=None, failed_at=None)
        models._update(name, **{role: changed})
        current = changed
    if current.served is not None and current.served.version == version:
        return
    started = time.perf_counter()
    loaded = follower.try_load(name, version, failed_version=current.failed_version,
                               failed_at=current.failed_at, role=role)
    if loaded is None:
        return
    if isinstance(loaded, str):
        _update_slot(models, name, role, error=loaded, failed_version=version, failed_at=time.monotonic())
        follower.metrics.load_failures.labels(name).inc()
        return
    served = ServedModel(name=name, version=version, runtime=loaded.runtime, signature=loaded.signature,
                         loaded_at=datetime.now(UTC), role=role)
    previous = _update_slot(models, name, role, served=served, error=None, failed_version=None,
                            failed_at=None)
    log.info("serving %s version %s as its %s (was %s), loaded in %.2fs", name, version, role,
             previous.served.version if previous and previous.served else None,
             time.perf_counter() - started, extra={"model": name, "version": version})
    if previous is not None and previous.served is not None:
        retire_served(previous.served)


def _update_slot(models: LoadedModels, name: str, role: str, **changes: Any) -> RoleSlot | None:
    """Change the ``role`` slot of ``name`` in one step; the slot as it was, None if no model."""
    with models._lock:
        state = models._states.get(name)
        if state is None:
            return None
        before = slot(state, role)
        changed: dict[str, Any] = {role: replace(before, **changes)}
        models._states[name] = replace(state, **changed)
        return before


def role_status(state: ModelState) -> dict[str, Any]:
    """The canary and shadow fields of a model's status (``GET /v1/models/{name}``)."""
    return {
        "canary_weight": state.canary_weight,
        CANARY: state.canary.to_json(CANARY, state.canary_weight),
        SHADOW: state.shadow.to_json(SHADOW),
    }


def role_version_status(state: ModelState, listed: set[str]) -> list[dict[str, Any]]:
    """TF Serving's ``model_version_status`` entries of the canary and shadow versions."""
    found: list[dict[str, Any]] = []
    for role in ROLES:
        current = slot(state, role)
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


def role_versions(state: ModelState) -> dict[str, str]:
    """The versions the canary and shadow serve now: role → version."""
    return {role: s.served.version for role in ROLES if (s := slot(state, role)).served is not None}


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
        served = models.served(name)  # raises when nothing serves the model
        state = models.state(name)
        if label is not None and label != PRODUCTION:
            found = slot(state, label).served if state is not None and label in ROLES else None
            if found is None:
                loaded = ", ".join(f"{role} (version {v})" for role, v in
                                   (role_versions(state) if state else {}).items())
                raise NotFound(
                    f"model {name!r} has no version loaded under the label {label!r}: serving loads the "
                    f"'{PRODUCTION}' alias (version {served.version})"
                    + (f" and {loaded}" if loaded else "")
                )
            return found
        if version is not None and version != served.version:
            for role in ROLES:
                candidate = slot(state, role).served if state is not None else None
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
        """What now answers in place of ``retired`` (same model and role), if anything."""
        state = models.state(retired.name)
        if state is None:
            return None
        if retired.role == PRODUCTION:
            return state.served
        return slot(state, retired.role).served


def hold(models: LoadedModels, router: Router, served: ServedModel) -> ServedModel:
    """Acquire the lease of ``served``, or of its successor if it was retired meanwhile: the one held.

    A version retired between being chosen and running is replaced by its successor in the
    same role, which was serving that role at some moment during the request. The caller
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

    def submit(self, shadow: ServedModel, run: Callable[[ServedModel], object]) -> bool:
        """Run ``run(shadow)`` in the pool; False (and counted) when the pool is full."""
        if not self._slots.acquire(blocking=False):
            self.skipped.labels(shadow.name).inc()
            return False
        pool = self._executor()
        if pool is None:
            self._slots.release()
            self.skipped.labels(shadow.name).inc()
            return False

        def task() -> None:
            try:
                run(shadow)
                self.mirrored.labels(shadow.name, shadow.version).inc()
            except Exception as exc:  # the caller has its answer; the shadow's failure is only counted
                self.failed.labels(shadow.name, shadow.version).inc()
                log.info("the shadow %s version %s failed on a copied request: %s",
                         shadow.name, shadow.version, exc)
            finally:
                self._slots.release()

        try:
            pool.submit(task)
        except RuntimeError:  # shut down meanwhile
            self._slots.release()
            self.skipped.labels(shadow.name).inc()
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
    if answered.role == SHADOW:
        return None
    state = models.state(answered.name)
    return state.shadow.served if state is not None else None

