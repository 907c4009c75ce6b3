"""Which version of each model is served, and how a new one replaces it.

The ``production`` alias in MLflow is the truth. :class:`ModelFollower` moves the served models
towards it: on start, on each ``model.alias_moved`` event, and on a timer for events that Redis
lost. A new version is downloaded, opened and warmed up to the side, then swapped in with one
reference assignment; requests already running finish on the version they started with. A
version that fails to load never replaces a working one: the failure goes into the model's status.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.serving.core.loaded import (
    SIDE_ALIASES,
    AliasSlot,
    LoadedModels,
    ServedModel,
    retire_served,
    slot,
)
from services.serving.core.metrics import ServingMetrics
from services.serving.runtimes.base import ModelLoadError
from services.serving.runtimes.loader import LoadedRuntime, load_runtime
from services.serving.settings import ServingSettings
from shipyard_common.events import EventBus
from shipyard_common.lineage import (
    DEFAULT_CANARY_WEIGHT,
    PRODUCTION,
    TAG_CANARY_WEIGHT,
)

log = logging.getLogger("shipyard.serving.models")

_COMPLETE_MARKER = ".complete"
_PAGE_SIZE = 1000
# Until MLflow answers, serving is not ready: look again soon rather than a full interval later.
_RETRY_AFTER_FAILURE_S = 2.0


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
            PRODUCTION, *SIDE_ALIASES,
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
            follow_side_aliases(self, name, *found[name])  # canary and shadow, beside production
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
        follow_side_aliases(self, name, aliases, dict(model.tags or {}))  # canary and shadow

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
                        loaded_at=datetime.now(UTC), batching=self.settings.batching_for(name),
                        text=loaded.text, columns=loaded.columns)
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
        alias: str = PRODUCTION,
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
            log.warning("version %s of %s failed to load as its %s: %s", version, name, alias, reason,
                        extra={"model": name, "version": version})
            return reason

    def load(self, name: str, version: str) -> LoadedRuntime:
        started = time.perf_counter()
        tags = dict(self.mlflow.get_model_version(name, version).tags or {})
        folder = self.download(name, version)
        loaded = load_runtime(folder, name=name, version=version, tags=tags, settings=self.settings)
        self.metrics.observe_load(name, version, time.perf_counter() - started)
        return loaded

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
            _install(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _prune(self, name: str, keep: set[str | None]) -> None:
        """Drop downloaded versions other than the served one and the one it replaced."""
        model_dir = self.models_dir / _folder_name(name)
        state = self.models.state(name)
        if state is not None:  # the canary's and shadow's files too
            keep = keep | {getattr(state, alias).target_version for alias in SIDE_ALIASES}
        for folder in model_dir.iterdir() if model_dir.exists() else []:
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def _install(staging: Path, target: Path) -> None:
    """Move a complete download into place. Serving's worker processes share the models folder: where
    another got there first (its copy complete), keep it, since it may be loading from it, and drop
    ours; only a leftover without the marker is replaced, moved aside first so that the rename stays
    one step."""
    try:
        staging.rename(target)  # atomic; fails where the target exists
        return
    except OSError:
        if not target.exists():
            raise
    if (target / _COMPLETE_MARKER).exists():
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.stale")
    target.rename(aside)
    staging.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


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


def follow_side_aliases(
    follower: ModelFollower, name: str, aliases: Mapping[str, str], tags: Mapping[str, str] | None
) -> None:
    """Move the canary and shadow of ``name`` (which production serves) to what the aliases name."""
    models = follower.models
    if models.state(name) is None:
        return
    models._update(name, canary_weight=weight_from_tags(tags))
    for alias in SIDE_ALIASES:
        version = aliases.get(alias)
        ensure_alias(follower, name, alias, None if version is None else str(version))


def ensure_alias(follower: ModelFollower, name: str, alias: str, version: str | None) -> None:
    """Load ``version`` as the ``alias`` of ``name`` (None: unload it) unless it already is."""
    from services.serving.core.loaded import ServedModel, retire_served

    models = follower.models
    state = models.state(name)
    if state is None:
        return
    current = slot(state, alias)
    if version is None:
        if current.status is None:
            return
        models._update(name, **{alias: AliasSlot()})
        log.info("unloading the %s of %s (version %s): the alias is gone", alias, name,
                 current.served.version if current.served else None)
        if current.served is not None:
            retire_served(current.served)
        return
    if current.target_version != version:
        changed = replace(current, target_version=version)
        if current.failed_version not in (None, version):
            changed = replace(changed, error=None, failed_version=None, failed_at=None)
        models._update(name, **{alias: changed})
        current = changed
    if current.served is not None and current.served.version == version:
        return
    started = time.perf_counter()
    loaded = follower.try_load(name, version, failed_version=current.failed_version,
                               failed_at=current.failed_at, alias=alias)
    if loaded is None:
        return
    if isinstance(loaded, str):
        _update_slot(models, name, alias, error=loaded, failed_version=version, failed_at=time.monotonic())
        follower.metrics.load_failures.labels(name).inc()
        return
    served = ServedModel(name=name, version=version, runtime=loaded.runtime, signature=loaded.signature,
                         loaded_at=datetime.now(UTC), alias=alias,
                         batching=follower.settings.batching_for(name), text=loaded.text,
                         columns=loaded.columns)
    previous = _update_slot(models, name, alias, served=served, error=None, failed_version=None,
                            failed_at=None)
    log.info("serving %s version %s as its %s (was %s), loaded in %.2fs", name, version, alias,
             previous.served.version if previous and previous.served else None,
             time.perf_counter() - started, extra={"model": name, "version": version})
    if previous is not None and previous.served is not None:
        retire_served(previous.served)


def _update_slot(models: LoadedModels, name: str, alias: str, **changes: Any) -> AliasSlot | None:
    """Change the ``alias`` slot of ``name`` in one step; the slot as it was, None if no model."""
    with models._lock:
        state = models._states.get(name)
        if state is None:
            return None
        before = slot(state, alias)
        changed: dict[str, Any] = {alias: replace(before, **changes)}
        models._states[name] = replace(state, **changed)
        return before


