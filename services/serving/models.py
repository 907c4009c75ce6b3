"""Which version of each model is served, and how a new one replaces it.

The ``production`` alias in MLflow is the truth. :class:`ModelFollower` moves the served models
towards it: on start, on each ``model.alias_moved`` event, and on a timer for events that Redis
lost. A new version is downloaded, opened and warmed up to the side, then swapped in with one
reference assignment; requests already running finish on the version they started with. A
version that fails to load never replaces a working one: the failure goes into the model's status.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.serving.batching import with_batching
from services.serving.callcost import REMOTE_FORMATS, CallCost
from services.serving.metrics import ServingMetrics
from services.serving.routing import ROLES, Lease, RoleSlot, follow_roles, retire_runtime
from services.serving.runtimes.base import ModelLoadError, Runtime, Signature, TensorSpec
from services.serving.runtimes.loader import LoadedRuntime, load_runtime
from services.serving.settings import ServingSettings
from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.events import EventBus
from shipyard_common.lineage import DEFAULT_CANARY_WEIGHT, PRODUCTION

log = logging.getLogger("shipyard.serving.models")

_COMPLETE_MARKER = ".complete"
_PAGE_SIZE = 1000
# Until MLflow answers, serving is not ready: look again soon rather than a full interval later.
_RETRY_AFTER_FAILURE_S = 2.0


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
    #: production, canary or shadow: which alias it is loaded for (the prediction log's role).
    role: str = PRODUCTION
    #: Held by each request running on it; a replaced version is closed once they are done.
    lease: Lease = field(default_factory=Lease, compare=False, repr=False)
    #: CPU per runtime call, for runtimes that do not measure their own (batching.py does).
    own_cost: CallCost = field(default_factory=CallCost, compare=False, repr=False)

    #: What one runtime call of this version costs (the fast lane runs cheap ones inline): the
    #: runtime's own measure (batching.py) or ``own_cost``. Set at creation.
    cost: CallCost = field(init=False, compare=False, repr=False)
    #: The input of a version that takes rows of fractional numbers (one 2-D floating-point input
    #: with a free batch dimension), which our protocol's rows fill directly; None otherwise.
    rows_input: TensorSpec | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.own_cost.remote = self.runtime.format in REMOTE_FORMATS
        measured = getattr(self.runtime, "cost", None)
        # A frozen dataclass: derived fields are set once, here.
        object.__setattr__(self, "cost", measured if isinstance(measured, CallCost) else self.own_cost)
        inputs = self.signature.inputs
        rows_input = inputs[0] if len(inputs) == 1 else None
        if rows_input is not None and (
            len(rows_input.shape) != 2 or rows_input.shape[0] is not None or rows_input.dtype.kind != "f"
        ):
            rows_input = None
        object.__setattr__(self, "rows_input", rows_input)


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
    canary: RoleSlot = RoleSlot()
    shadow: RoleSlot = RoleSlot()
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
            for served in (state.served, *(getattr(state, role).served for role in ROLES)):
                if served is not None:
                    with contextlib.suppress(Exception):
                        served.runtime.close()

    def remove(self, name: str) -> None:
        with self._lock:
            removed = self._states.pop(name, None)
        if removed is not None:
            for served in (removed.served, *(getattr(removed, role).served for role in ROLES)):
                if served is not None:
                    retire_served(served)
        with contextlib.suppress(KeyError):  # never loaded, so never labelled
            self._metrics.loaded_version.remove(name)


def _folder_name(model_name: str) -> str:
    """A model name as a single safe path segment; a hash keeps rewritten names distinct."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name).strip(".") or "model"
    if safe == model_name:
        return safe
    return f"{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


class ModelFollower:
    """Keeps :class:`LoadedModels` on the ``production`` alias of every registered model.

    All loading happens on one thread, so two events for one model never load it twice at once.
    """

    def __init__(
        self, *, settings: ServingSettings, models: LoadedModels, metrics: ServingMetrics
    ) -> None:
        platform = settings.platform
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.tracking_uri = platform.mlflow_tracking_uri
        self.mlflow = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.events = EventBus(redis_url=platform.redis_url, channel=platform.events_channel)
        self.models_dir = (platform.state_dir / "serving" / "models").resolve()
        self._requests: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            self.events.subscribe(self.on_event, self._stop),
            threading.Thread(target=self._run, name="model-follower", daemon=True),
        ]
        self._threads[1].start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._requests.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self.models.close_all()

    def on_event(self, payload: dict[str, object]) -> None:
        if payload.get("type") in ("model.alias_moved", "model.alias_removed") and payload.get("alias") in (
            PRODUCTION, *ROLES,
        ):
            self._requests.put(str(payload["model"]))

    def _run(self) -> None:
        next_full = time.monotonic()
        while not self._stop.is_set():
            wait = next_full - time.monotonic()
            if wait <= 0:
                # Checked before taking events, so that a stream of events cannot starve it.
                next_full = time.monotonic() + self._guarded(self.reconcile)
                continue
            try:
                name = self._requests.get(timeout=wait)
            except queue.Empty:
                continue
            if name is None:
                return
            retry_in = self._guarded(functools.partial(self.sync_model, name))
            next_full = min(next_full, time.monotonic() + retry_in)

    def _guarded(self, step: Callable[[], None]) -> float:
        """Run ``step``; the seconds until the next full reconcile, sooner after a failure."""
        try:
            step()
            return self.settings.reconcile_interval_s
        except Exception as exc:
            log.warning("following the registry failed (%s: %s); retrying", type(exc).__name__, exc)
            return min(self.settings.reconcile_interval_s, _RETRY_AFTER_FAILURE_S)

    # -- following the registry ---------------------------------------------------------------
    def served_aliases(self) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
        """Every registered model that has a ``production`` alias: its aliases and its tags."""
        found: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        page_token: str | None = None
        while True:
            page = self.mlflow.search_registered_models(max_results=_PAGE_SIZE, page_token=page_token)
            for model in page:
                aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
                if PRODUCTION in aliases:
                    found[model.name] = (aliases, dict(model.tags or {}))
            page_token = page.token
            if not page_token:
                return found

    def production_versions(self) -> dict[str, str]:
        """Every registered model that has a ``production`` alias, and the version it names."""
        return {name: aliases[PRODUCTION] for name, (aliases, _) in self.served_aliases().items()}

    def reconcile(self) -> None:
        """One full pass: load what the aliases name, unload what they no longer name."""
        found = self.served_aliases()
        wanted = {name: aliases[PRODUCTION] for name, (aliases, _) in found.items()}
        for name, version in sorted(wanted.items()):
            if self._stop.is_set():
                return
            self.ensure(name, version)
            follow_roles(self, name, *found[name])  # canary and shadow, beside production
        for name in self.models.names() - set(wanted):
            log.info("unloading %s: it no longer has a %s alias", name, PRODUCTION)
            self.models.remove(name)
        self.models.reconciled.set()

    def sync_model(self, name: str) -> None:
        """Follow one model's alias: read it from MLflow, since events may arrive out of order."""
        try:
            model = self.mlflow.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                log.info("unloading %s: %s", name, exc.message)
                self.models.remove(name)
                return
            raise
        aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
        if PRODUCTION not in aliases:
            if name in self.models.names():
                log.info("unloading %s: it no longer has a %s alias", name, PRODUCTION)
            self.models.remove(name)
            return
        self.ensure(name, aliases[PRODUCTION])
        follow_roles(self, name, aliases, dict(model.tags or {}))  # canary and shadow

    def ensure(self, name: str, version: str) -> None:
        """Make ``version`` the served version of ``name`` unless it is already, or recently failed."""
        state = self.models.set_target(name, version)
        if state.served is not None and state.served.version == version:
            return
        started = time.perf_counter()
        loaded = self.try_load(name, version, failed_version=state.failed_version, failed_at=state.failed_at)
        if loaded is None:
            return
        if isinstance(loaded, str):
            self.models.record_failure(name, version, loaded)
            return
        previous = state.served.version if state.served else None
        self.models.install(
            ServedModel(name=name, version=version, runtime=loaded.runtime, signature=loaded.signature,
                        loaded_at=datetime.now(UTC))
        )
        log.info(
            "serving %s version %s as %s (was %s), loaded in %.2fs", name, version, loaded.runtime.format,
            previous, time.perf_counter() - started, extra={"model": name, "version": version},
        )
        if state.served is not None:
            retire_served(state.served)
        self._prune(name, keep={version, previous})

    def try_load(
        self, name: str, version: str, *, failed_version: str | None, failed_at: float | None,
        role: str = PRODUCTION,
    ) -> LoadedRuntime | str | None:
        """Load ``version`` (see :meth:`load`); or why it failed (logged; the caller records it);
        or None without trying, when this same version failed less than ``failed_load_retry_s`` ago."""
        if (
            failed_version == version
            and failed_at is not None
            and time.monotonic() - failed_at < self.settings.failed_load_retry_s
        ):
            return None
        try:
            return self.load(name, version)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            log.warning("version %s of %s failed to load as its %s: %s", version, name, role, reason,
                        extra={"model": name, "version": version})
            return reason

    def load(self, name: str, version: str) -> LoadedRuntime:
        started = time.perf_counter()
        tags = dict(self.mlflow.get_model_version(name, version).tags or {})
        folder = self.download(name, version)
        loaded = load_runtime(folder, name=name, version=version, tags=tags, settings=self.settings)
        self.metrics.observe_load(name, version, time.perf_counter() - started)
        # Concurrent requests for this version are merged into one runtime call (batching.py).
        return with_batching(loaded, name=name, version=version, policy=self.settings.batching_for(name),
                             metrics=self.metrics)

    def download(self, name: str, version: str) -> Path:
        """The version's artifacts under the state folder, downloaded once."""
        model_dir = self.models_dir / _folder_name(name)
        target = model_dir / version
        if (target / _COMPLETE_MARKER).exists():
            return target
        # Download beside the target and rename, so a crash mid-download never leaves a folder
        # that looks complete.
        staging = model_dir / f".{version}.{uuid.uuid4().hex[:8]}.partial"
        staging.mkdir(parents=True)
        try:
            # Exactly what "models:/name/version" resolves to, but resolved by our own client:
            # MLflow's resolver builds its client from the process-wide URIs, whatever it is told,
            # and would open ./mlflow.db rather than the platform's registry.
            source = self.mlflow.get_model_version_download_uri(name, version)
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=self.tracking_uri
            )
            (staging / _COMPLETE_MARKER).touch()
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _prune(self, name: str, keep: set[str | None]) -> None:
        """Drop downloaded versions other than the served one and the one it replaced."""
        model_dir = self.models_dir / _folder_name(name)
        state = self.models.state(name)
        if state is not None:  # the canary's and shadow's files too
            keep = keep | {getattr(state, role).target_version for role in ROLES}
        for folder in model_dir.iterdir() if model_dir.exists() else []:
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
