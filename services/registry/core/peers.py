"""What the registry reads from its peers over HTTP: serving's status and the monitor's verdicts.

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

import httpx

from services.registry.core.schemas import DriftVerdict, ServingStatus

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

    def drift(self, authorization: str) -> dict[str, DriftVerdict]:
        """The monitor's newest verdict by model; empty when the monitor cannot be asked."""
        try:
            found = self._get(f"{self.monitor_url.rstrip('/')}/drift", authorization)
        except Exception as exc:
            log.info("the monitor's verdicts are unavailable: %s", exc)
            return {}
        return {
            entry["model"]: DriftVerdict(
                dataset_drift=entry.get("dataset_drift"),
                drift_share=entry.get("drift_share"),
                version=entry.get("version"),
                rows=entry.get("current_rows"),
                computed_at=entry.get("computed_at"),
            )
            for entry in found
            if isinstance(entry, dict) and "model" in entry
        }


def serving_status(entry: dict[str, Any]) -> ServingStatus:
    canary = entry.get("canary") or {}
    return ServingStatus(
        version=entry.get("version"),
        status=entry.get("status"),
        error=entry.get("error"),
        canary_version=canary.get("version"),
        canary_weight=canary.get("weight"),
    )
