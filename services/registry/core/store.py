"""MLflow, the registry's store: models, versions, aliases, runs and artifacts.

Every MLflow call the registry makes goes through :class:`Store`, which turns MLflow's failures
into the platform's errors once. Reads are page-shaped: one search per page of models or
versions, never one call per version.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shipyard_common.errors import InvalidInput, NotFound, ShipyardError, Unavailable, UpstreamError

log = logging.getLogger("shipyard.registry.store")

# MLflow's largest page for registry searches.
MAX_PAGE = 1000


@contextmanager
def mlflow_errors(missing: str) -> Iterator[None]:
    """Translate MLflow's failures into the platform's errors; ``missing`` explains a 404."""
    try:
        yield
    except ShipyardError:
        raise
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(missing) from exc
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise InvalidInput(f"the MLflow registry refused the request: {exc.message}") from exc
        if "API request to" in exc.message:  # the client gave up reaching the server
            raise Unavailable(f"the MLflow registry cannot be reached: {exc.message}") from exc
        raise UpstreamError(f"the MLflow registry answered with an error: {exc.message}") from exc
    except Exception as exc:  # requests' connection errors surface unwrapped from the client
        raise Unavailable(f"the MLflow registry cannot be reached: {exc}") from exc


def checked_version(name: str, version: str) -> str:
    """``version`` as MLflow spells it; a non-number is a version that cannot exist (404)."""
    if not version.isdigit():
        raise NotFound(f"model {name!r} has no version {version!r}: versions are whole numbers")
    return str(int(version))


def name_filter(name: str) -> str:
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise InvalidInput(f"model name {name!r} contains both quote characters and cannot be searched")


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    token: str | None


@dataclass
class Store:
    client: MlflowClient
    artifact_cache_size: int = 256
    _artifacts: OrderedDict[tuple[str, str], bytes | None] = field(default_factory=OrderedDict)
    _artifacts_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, tracking_uri: str) -> Store:
        return cls(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))

    # reads
    def model(self, name: str) -> RegisteredModel:
        with mlflow_errors(f"model {name!r} is not in the registry"):
            return self.client.get_registered_model(name)

    def models(self, *, max_results: int, page_token: str | None) -> Page[RegisteredModel]:
        with mlflow_errors("no registered models"):
            found = self.client.search_registered_models(
                max_results=max_results, page_token=page_token, order_by=["name ASC"]
            )
        return Page(list(found), found.token or None)

    def versions(self, name: str, *, max_results: int, page_token: str | None) -> Page[ModelVersion]:
        """One page of ``name``'s versions, newest first. MLflow leaves their aliases empty."""
        with mlflow_errors(f"model {name!r} is not in the registry"):
            found = self.client.search_model_versions(
                name_filter(name),
                max_results=max_results,
                page_token=page_token,
                order_by=["version_number DESC"],
            )
        return Page(list(found), found.token or None)

    def all_versions(self, name: str) -> list[ModelVersion]:
        versions: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.versions(name, max_results=MAX_PAGE, page_token=token)
            versions.extend(page.items)
            if not page.token:
                return versions
            token = page.token

    def version(self, name: str, version: str) -> ModelVersion:
        version = checked_version(name, version)
        with mlflow_errors(f"model {name!r} has no version {version}"):
            return self.client.get_model_version(name, version)

    def run(self, run_id: str) -> Run | None:
        """The run, or None when it is gone (a deleted run must not hide its version)."""
        try:
            return self.client.get_run(run_id)
        except Exception as exc:
            log.info("run %s is unreadable: %s", run_id, exc)
            return None

    def artifact(self, run_id: str, path: str) -> bytes | None:
        """The bytes of the run's artifact file ``path``, or None if it has none; cached (immutable)."""
        key = (run_id, path)
        with self._artifacts_lock:
            if key in self._artifacts:
                self._artifacts.move_to_end(key)
                return self._artifacts[key]
        data = self._download(run_id, path)
        with self._artifacts_lock:
            self._artifacts[key] = data
            while len(self._artifacts) > self.artifact_cache_size:
                self._artifacts.popitem(last=False)
        return data

    def _download(self, run_id: str, path: str) -> bytes | None:
        parent = str(PurePosixPath(path).parent)
        try:
            listed = {a.path for a in self.client.list_artifacts(run_id, None if parent == "." else parent)}
            if path not in listed:
                return None
            with tempfile.TemporaryDirectory(prefix="shipyard-artifact-") as folder:
                return Path(self.client.download_artifacts(run_id, path, folder)).read_bytes()
        except Exception as exc:
            log.info("artifact %s of run %s is unreadable: %s", path, run_id, exc)
            return None

    def list_artifacts(self, run_id: str, folder: str) -> list[str]:
        try:
            return [a.path for a in self.client.list_artifacts(run_id, folder) if not a.is_dir]
        except Exception as exc:
            log.info("artifacts of run %s are unreadable: %s", run_id, exc)
            return []

    # writes
    def set_alias(self, name: str, alias: str, version: str) -> None:
        with mlflow_errors(f"model {name!r} has no version {version}"):
            self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        with mlflow_errors(f"model {name!r} has no alias {alias!r}"):
            self.client.delete_registered_model_alias(name, alias)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        with mlflow_errors(f"model {name!r} is not in the registry"):
            self.client.set_registered_model_tag(name, key, value)

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        with mlflow_errors(f"model {name!r} has no version {version}"):
            self.client.set_model_version_tag(name, version, key, value)

    def delete_version_tag(self, name: str, version: str, key: str) -> None:
        with mlflow_errors(f"model {name!r} has no version {version}"):
            self.client.delete_model_version_tag(name, version, key)
