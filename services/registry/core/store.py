"""MLflow, the registry's store: models, versions, aliases, runs and artifacts.

Every MLflow call the registry makes goes through :class:`Store`, which turns MLflow's failures
into the platform's errors once. Reads go to MLflow's REST API directly (one HTTP call, JSON into a
small record: a page costs MLflow's time and little more) and are page-shaped: one search per page
of models or versions, never one call per version. Writes and artifacts use MLflow's client.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

import httpx
import orjson
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shipyard_common.errors import InvalidInput, NotFound, ShipyardError, UpstreamError
from shipyard_common.mlflow_client import mlflow_unavailable, mlflow_unreachable

log = logging.getLogger("shipyard.registry.store")

# MLflow's largest page for registry searches.
MAX_PAGE = 1000


@contextmanager
def mlflow_errors(missing: str, tracking_uri: str) -> Iterator[None]:
    """Translate MLflow's failures into the platform's errors; ``missing`` explains a 404.

    A server that does not answer (refused, timed out, 5xx) is the platform's one 503 for it
    (:func:`shipyard_common.mlflow_client.mlflow_unavailable`).
    """
    try:
        yield
    except ShipyardError:
        raise
    except Exception as exc:
        if mlflow_unreachable(exc):
            raise mlflow_unavailable(tracking_uri, exc) from exc
        if not isinstance(exc, MlflowException):  # an error of the client itself
            raise mlflow_unavailable(tracking_uri, exc) from exc
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(missing) from exc
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise InvalidInput(f"the MLflow registry refused the request: {exc.message}") from exc
        raise UpstreamError(f"the MLflow registry answered with an error: {exc.message}") from exc


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


def checked_page_token(token: str) -> str:
    """``token`` if it can be a ``next_page_token`` MLflow gave (base64 of a JSON object), else 400.

    MLflow's server answers some other tokens (not ASCII, or base64 of a number) with a 500, which
    the registry would pass on as MLflow being down (503): the caller's mistake is named here instead.
    """
    try:
        decoded = orjson.loads(base64.b64decode(token.encode("ascii"), validate=True))
    except (UnicodeEncodeError, binascii.Error, orjson.JSONDecodeError):
        decoded = None
    # MLflow's tokens are base64 of {"offset": N} today; a token in another shape is one it did not give.
    if not isinstance(decoded, dict) or not isinstance(decoded.get("offset"), int):
        raise InvalidInput(f"page_token {token[:64]!r} is not a next_page_token this API answered; "
                           "leave it out for the first page")
    return token


@dataclass
class Page(Generic[T]):
    items: list[T]
    token: str | None


def _tags(entries: list[dict[str, Any]] | None) -> dict[str, str]:
    return {entry["key"]: entry.get("value", "") for entry in entries or []}


@dataclass(frozen=True)
class ModelRecord:
    """A registered model as MLflow's REST API answers it."""

    name: str
    description: str | None
    aliases: dict[str, str]
    tags: dict[str, str]
    latest_version: str | None
    created_ms: int | None
    updated_ms: int | None

    @classmethod
    def of(cls, body: dict[str, Any]) -> ModelRecord:
        latest = [str(v["version"]) for v in body.get("latest_versions") or []]
        return cls(
            name=body["name"],
            description=body.get("description") or None,
            aliases={a["alias"]: str(a["version"]) for a in body.get("aliases") or []},
            tags=_tags(body.get("tags")),
            latest_version=max(latest, key=int) if latest else None,
            created_ms=_int(body.get("creation_timestamp")),
            updated_ms=_int(body.get("last_updated_timestamp")),
        )


@dataclass(frozen=True)
class VersionRecord:
    """A model version as MLflow's REST API answers it (a search leaves its aliases out)."""

    name: str
    version: str
    run_id: str | None
    source: str | None
    status: str | None
    description: str | None
    tags: dict[str, str]
    created_ms: int | None

    @classmethod
    def of(cls, body: dict[str, Any]) -> VersionRecord:
        return cls(
            name=body["name"],
            version=str(body["version"]),
            run_id=body.get("run_id") or None,
            source=body.get("source"),
            status=body.get("status"),
            description=body.get("description") or None,
            tags=_tags(body.get("tags")),
            created_ms=_int(body.get("creation_timestamp")),
        )


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, body: dict[str, Any]) -> RunRecord:
        data = body.get("data") or {}
        return cls(
            run_id=body["info"]["run_id"],
            experiment_id=str(body["info"].get("experiment_id", "")),
            params={p["key"]: p.get("value", "") for p in data.get("params") or []},
            metrics={m["key"]: float(m["value"]) for m in data.get("metrics") or []},
        )


def _int(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _rest_client(tracking_uri: str, timeout_s: float) -> httpx.Client:
    """MLflow's REST API, with the credentials MLflow's own client would send (its environment)."""
    auth: httpx.Auth | None = None
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = httpx.BasicAuth(
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        )
    return httpx.Client(
        base_url=f"{tracking_uri.rstrip('/')}/api/2.0/mlflow",
        auth=auth,
        headers=headers,
        timeout=timeout_s,
        limits=httpx.Limits(max_keepalive_connections=32),
    )


@dataclass
class Store:
    """Reads over MLflow's REST API (one HTTP call each, JSON into small records); writes and
    artifacts through MLflow's client. ``at_once`` runs independent reads in parallel."""

    client: MlflowClient
    rest: httpx.Client
    tracking_uri: str
    artifact_cache_size: int = 256
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(16, "mlflow-read"))
    _artifacts: OrderedDict[tuple[str, str], bytes | None] = field(default_factory=OrderedDict)
    _artifacts_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, tracking_uri: str, *, timeout_s: float = 30.0) -> Store:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return cls(client=client, rest=_rest_client(tracking_uri, timeout_s), tracking_uri=tracking_uri)

    def close(self) -> None:
        self.rest.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def at_once(self, *calls: Callable[[], Any]) -> list[Any]:
        """The results of ``calls``, made in parallel (the first in this thread). Each call must be
        a leaf read that never waits on this pool itself, so the pool cannot deadlock."""
        futures = [self.pool.submit(call) for call in calls[1:]]
        first = calls[0]()
        return [first, *(future.result() for future in futures)]

    def _get(self, path: str, params: dict[str, Any], missing: str) -> dict[str, Any]:
        try:
            response = self.rest.get(path, params=params)
        except httpx.HTTPError as exc:
            raise mlflow_unavailable(self.tracking_uri, exc) from exc
        if response.status_code == 200:
            return orjson.loads(response.content)  # type: ignore[no-any-return]
        try:
            error = response.json()
            code, message = error.get("error_code"), error.get("message", response.text[:300])
        except ValueError:
            code, message = None, response.text[:300]
        if code == "RESOURCE_DOES_NOT_EXIST" or response.status_code == 404:
            raise NotFound(missing)
        if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise InvalidInput(f"the MLflow registry refused the request: {message}")
        if response.status_code >= 500:
            raise mlflow_unavailable(self.tracking_uri, f"it fails with HTTP {response.status_code}")
        raise UpstreamError(f"the MLflow registry answered {response.status_code}: {message}")

    # reads
    def model(self, name: str) -> ModelRecord:
        body = self._get("/registered-models/get", {"name": name}, f"model {name!r} is not in the registry")
        return ModelRecord.of(body["registered_model"])

    def models(
        self, *, max_results: int, page_token: str | None, search: str | None = None
    ) -> Page[ModelRecord]:
        """One page of the models by name; with ``search``, those whose name contains it in any case
        (MLflow's ``ILIKE``, where ``_`` stands for any one character: the caller keeps exact matches)."""
        params: dict[str, Any] = {"max_results": max_results, "order_by": "name ASC"}
        if search:
            params["filter"] = f"name ILIKE '%{search}%'"
        if page_token:
            params["page_token"] = checked_page_token(page_token)
        body = self._get("/registered-models/search", params, "no registered models")
        return Page(
            [ModelRecord.of(m) for m in body.get("registered_models") or []],
            body.get("next_page_token") or None,
        )

    def versions(self, name: str, *, max_results: int, page_token: str | None) -> Page[VersionRecord]:
        """One page of ``name``'s versions, newest first."""
        params: dict[str, Any] = {
            "filter": name_filter(name),
            "max_results": max_results,
            "order_by": "version_number DESC",
        }
        if page_token:
            params["page_token"] = checked_page_token(page_token)
        body = self._get("/model-versions/search", params, f"model {name!r} is not in the registry")
        return Page(
            [VersionRecord.of(v) for v in body.get("model_versions") or []],
            body.get("next_page_token") or None,
        )

    def all_versions(self, name: str) -> list[VersionRecord]:
        versions: list[VersionRecord] = []
        token: str | None = None
        while True:
            page = self.versions(name, max_results=MAX_PAGE, page_token=token)
            versions.extend(page.items)
            if not page.token:
                return versions
            token = page.token

    def version(self, name: str, version: str) -> VersionRecord:
        version = checked_version(name, version)
        body = self._get(
            "/model-versions/get",
            {"name": name, "version": version},
            f"model {name!r} has no version {version}",
        )
        return VersionRecord.of(body["model_version"])

    def run(self, run_id: str) -> RunRecord | None:
        """The run, or None when it is gone (a deleted run must not hide its version)."""
        try:
            return RunRecord.of(self._get("/runs/get", {"run_id": run_id}, f"run {run_id} is gone")["run"])
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
        with mlflow_errors(f"model {name!r} has no version {version}", self.tracking_uri):
            self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        with mlflow_errors(f"model {name!r} has no alias {alias!r}", self.tracking_uri):
            self.client.delete_registered_model_alias(name, alias)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        with mlflow_errors(f"model {name!r} is not in the registry", self.tracking_uri):
            self.client.set_registered_model_tag(name, key, value)

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        with mlflow_errors(f"model {name!r} has no version {version}", self.tracking_uri):
            self.client.set_model_version_tag(name, version, key, value)

    def delete_version_tag(self, name: str, version: str, key: str) -> None:
        with mlflow_errors(f"model {name!r} has no version {version}", self.tracking_uri):
            self.client.delete_model_version_tag(name, version, key)
