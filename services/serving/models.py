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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.serving.metrics import ServingMetrics
from services.serving.runtimes.onnx import ModelLoadError, OnnxModel, find_model_file, load_onnx_model
from services.serving.settings import ServingSettings
from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.events import EventBus
from shipyard_common.lineage import PRODUCTION

log = logging.getLogger("shipyard.serving.models")

_COMPLETE_MARKER = ".complete"
_PAGE_SIZE = 1000
# Until MLflow answers, serving is not ready: look again soon rather than a full interval later.
_RETRY_AFTER_FAILURE_S = 2.0

Status = Literal["loading", "serving", "updating", "degraded", "failed"]


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    runtime: OnnxModel
    loaded_at: datetime


@dataclass(frozen=True)
class ModelState:
    """A snapshot: replaced as a whole under the lock, so readers never see half an update."""

    name: str
    target_version: str | None = None
    served: ServedModel | None = None
    error: str | None = None
    failed_version: str | None = None
    failed_at: float | None = None

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

    def remove(self, name: str) -> None:
        with self._lock:
            self._states.pop(name, None)
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

    def on_event(self, payload: dict[str, object]) -> None:
        if payload.get("type") == "model.alias_moved" and payload.get("alias") == PRODUCTION:
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
    def production_versions(self) -> dict[str, str]:
        """Every registered model that has a ``production`` alias, and the version it names."""
        found: dict[str, str] = {}
        page_token: str | None = None
        while True:
            page = self.mlflow.search_registered_models(max_results=_PAGE_SIZE, page_token=page_token)
            for model in page:
                version = (model.aliases or {}).get(PRODUCTION)
                if version is not None:
                    found[model.name] = str(version)
            page_token = page.token
            if not page_token:
                return found

    def reconcile(self) -> None:
        """One full pass: load what production names, unload what it no longer names."""
        wanted = self.production_versions()
        for name, version in sorted(wanted.items()):
            if self._stop.is_set():
                return
            self.ensure(name, version)
        for name in self.models.names() - set(wanted):
            log.info("unloading %s: it no longer has a %s alias", name, PRODUCTION)
            self.models.remove(name)
        self.models.reconciled.set()

    def sync_model(self, name: str) -> None:
        """Follow one model's alias: read it from MLflow, since events may arrive out of order."""
        try:
            version = self.mlflow.get_model_version_by_alias(name, PRODUCTION)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                log.info("unloading %s: %s", name, exc.message)
                self.models.remove(name)
                return
            raise
        self.ensure(name, str(version.version))

    def ensure(self, name: str, version: str) -> None:
        """Make ``version`` the served version of ``name`` unless it is already, or recently failed."""
        state = self.models.set_target(name, version)
        if state.served is not None and state.served.version == version:
            return
        if (
            state.failed_version == version
            and state.failed_at is not None
            and time.monotonic() - state.failed_at < self.settings.failed_load_retry_s
        ):
            return
        started = time.perf_counter()
        try:
            runtime = self.load(name, version)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "version %s of %s failed to load: %s", version, name, reason,
                extra={"model": name, "version": version},
            )
            self.models.record_failure(name, version, reason)
            return
        previous = state.served.version if state.served else None
        self.models.install(
            ServedModel(name=name, version=version, runtime=runtime, loaded_at=datetime.now(UTC))
        )
        log.info(
            "serving %s version %s (was %s), loaded in %.2fs", name, version, previous,
            time.perf_counter() - started, extra={"model": name, "version": version},
        )
        self._prune(name, keep={version, previous})

    def load(self, name: str, version: str) -> OnnxModel:
        folder = self.download(name, version)
        return load_onnx_model(
            find_model_file(folder),
            intra_op_threads=self.settings.intra_op_threads,
            graph_optimization=self.settings.graph_optimization,
        )

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
        for folder in model_dir.iterdir() if model_dir.exists() else []:
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
