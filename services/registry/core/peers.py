"""What the registry reads from its peers over HTTP: serving's status, the monitor's verdicts,
live metrics and retraining triggers.

Services never import each other. These reads forward the caller's own credentials (every role
may read), answer within ``timeout_s`` and are kept for ``cache_s``, so a page never waits long
on a peer that is down: it shows "unknown" instead (a failed read is kept as long as a good one).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from services.registry.core.schemas import (
    DriftVerdict,
    LiveFigures,
    LiveVersion,
    Monitoring,
    RetrainingTrigger,
    ServingStatus,
)

log = logging.getLogger("shipyard.registry.peers")


@dataclass
class Peers:
    serving_url: str
    monitor_url: str
    timeout_s: float = 1.0
    cache_s: float = 2.0
    http: httpx.Client = field(default_factory=lambda: httpx.Client())
    _cache: dict[tuple[str, str], tuple[float, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        self.http.close()

    def _get(self, url: str, authorization: str) -> Any:
        """The JSON at ``url`` (cached briefly per caller); raises on any failure."""
        key = (url, authorization)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is None or now - hit[0] >= self.cache_s:
            try:
                response = self.http.get(
                    url, headers={"Authorization": authorization}, timeout=self.timeout_s
                )
                response.raise_for_status()
                hit = (now, response.json())
            except Exception as exc:  # kept too: a peer that is down is asked again only after cache_s
                hit = (now, exc)
            with self._lock:
                if len(self._cache) > 1024:
                    self._cache.clear()
                self._cache[key] = hit
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]

    def serving(self, authorization: str) -> dict[str, ServingStatus]:
        """Every served model's status by name; empty when serving cannot be asked."""
        try:
            found = self._get(f"{self.serving_url.rstrip('/')}/v1/models", authorization)
        except Exception as exc:
            log.info("serving's status is unavailable: %s", exc)
            return {}
        return {entry["name"]: serving_status(entry) for entry in found if isinstance(entry, dict)}

    def _monitor(self, path: str, authorization: str, **query: Any) -> Any:
        url = f"{self.monitor_url.rstrip('/')}{path}"
        return self._get(f"{url}?{urlencode(query)}" if query else url, authorization)

    def drift(self, authorization: str) -> dict[str, DriftVerdict]:
        """The monitor's newest verdict by model; empty when the monitor cannot be asked."""
        try:
            return self.drift_verdicts(authorization)
        except Exception as exc:
            log.info("the monitor's verdicts are unavailable: %s", exc)
            return {}

    def drift_verdicts(self, authorization: str) -> dict[str, DriftVerdict]:
        """The monitor's newest verdict by model (``GET /drift``); raises when it cannot be asked."""
        found = self._monitor("/drift", authorization)
        return {
            entry["model"]: drift_verdict(entry)
            for entry in (found if isinstance(found, list) else [])
            if isinstance(entry, dict) and "model" in entry
        }

    def live(self, authorization: str, model: str) -> list[LiveVersion]:
        """Each version's live metrics from ground truth (``GET /feedback/{model}``), newest version first."""
        found = self._monitor(f"/feedback/{quote(model, safe='')}", authorization, windows=1)
        return [live_version(entry) for entry in found.get("versions", []) if isinstance(entry, dict)]

    def triggers(self, authorization: str, model: str, limit: int = 10) -> list[RetrainingTrigger]:
        """The model's newest retraining triggers (``GET /triggers?model=``)."""
        found = self._monitor("/triggers", authorization, model=model, max_results=limit)
        entries = found.get("triggers", []) if isinstance(found, dict) else found
        return [retraining_trigger(entry) for entry in entries if isinstance(entry, dict)][:limit]

    def monitoring(self, authorization: str, model: str) -> Monitoring:
        """Drift, live metrics and triggers of ``model``; a part the monitor cannot give says why."""
        view = Monitoring()
        try:
            view.drift = self.drift_verdicts(authorization).get(model)
        except Exception as exc:
            view.drift_error = unavailable(exc)
        try:
            view.live = self.live(authorization, model)
        except Exception as exc:
            view.live_error = unavailable(exc)
        try:
            view.triggers = self.triggers(authorization, model)
        except Exception as exc:
            view.triggers_error = unavailable(exc)
        return view


def unavailable(exc: Exception) -> str:
    log.info("the monitor is unavailable: %s", exc)
    if isinstance(exc, httpx.HTTPStatusError):
        return f"monitor unavailable (it answered {exc.response.status_code})"
    return "monitor unavailable"


def drift_verdict(entry: dict[str, Any]) -> DriftVerdict:
    return DriftVerdict(
        dataset_drift=entry.get("dataset_drift"), drift_share=entry.get("drift_share"),
        version=entry.get("version"), rows=entry.get("current_rows"), computed_at=entry.get("computed_at"),
        window_id=entry.get("window_id"), status=entry.get("status"), labelled=entry.get("labelled"),
        accuracy=entry.get("accuracy"), f1=entry.get("f1"), mae=entry.get("mae"), rmse=entry.get("rmse"),
    )


def live_version(entry: dict[str, Any]) -> LiveVersion:
    latest = entry.get("latest") or {}
    return LiveVersion(
        version=str(entry.get("version")), task=entry.get("task"),
        overall=LiveFigures.model_validate(entry.get("overall") or {}),
        latest=LiveFigures.model_validate(latest),
    )


def retraining_trigger(entry: dict[str, Any]) -> RetrainingTrigger:
    found = entry.get("outcome")
    outcome: dict[str, Any] = found if isinstance(found, dict) else {}
    new_version = outcome.get("version") or outcome.get("model_version")
    job_id, request_id = outcome.get("job_id"), outcome.get("request_id")
    return RetrainingTrigger(
        id=entry["id"], version=entry.get("version"), cause=str(entry.get("cause")),
        reason=entry.get("reason") or "", state=str(entry.get("state")), flow_run_id=entry.get("flow_run_id"),
        flow_run_url=entry.get("flow_run_url"), job_id=None if job_id is None else str(job_id),
        new_version=None if new_version is None else str(new_version),
        request_id=None if request_id is None else str(request_id), message=entry.get("message"),
        created_at=entry.get("created_at"), updated_at=entry.get("updated_at"),
    )


def serving_status(entry: dict[str, Any]) -> ServingStatus:
    canary = entry.get("canary") or {}
    return ServingStatus(
        version=entry.get("version"),
        status=entry.get("status"),
        error=entry.get("error"),
        canary_version=canary.get("version"),
        canary_weight=canary.get("weight"),
    )
