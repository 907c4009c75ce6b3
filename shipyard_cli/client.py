"""A small HTTP client for the four services, used by the CLI and the demo."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings

# The registry's largest page: fewer round trips when a list is walked whole.
PAGE_SIZE = 1000


class ClientError(RuntimeError):
    """A service answered with an error; the message is the service's own (``details`` too, if any)."""

    def __init__(self, status: int, message: str, details: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.details = details


class ShipyardClient:
    def __init__(self, platform: PlatformSettings, token: str = DEV_ADMIN_TOKEN, timeout: float = 60) -> None:
        self.platform = platform
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ShipyardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(0, f"cannot reach {url}: {exc} (is the stack up? 'shipyard status')") from exc
        if response.status_code >= 400:
            details = None
            try:
                error = response.json()["error"]
                message, details = error["message"], error.get("details")
            except (ValueError, KeyError, TypeError, AttributeError):
                message = response.text[:500]
            raise ClientError(response.status_code, message, details)
        return response.json()

    def _pages(self, url: str, key: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every item of a paged list (``{key: [...], "next_page_token": ...}``), page after page."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            query = {**(params or {}), "max_results": PAGE_SIZE}
            if token:
                query["page_token"] = token
            page = self._call("GET", url, params=query)
            items.extend(page[key])
            token = page.get("next_page_token")
            if not token:
                return items

    # datasets (on the trainer)
    def add_dataset(
        self, name: str, content: bytes, *, fmt: str, tag: str | None = None,
        allow_schema_change: bool = False,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"format": fmt, "allow_schema_change": allow_schema_change}
        if tag:
            params["tag"] = tag
        return self._call("POST", f"{self.platform.trainer_url}/datasets/{quote(name, safe='')}",
                          params=params, content=content)

    def set_dataset_rules(self, name: str, text: str) -> dict[str, Any]:
        return self._call("PUT", f"{self.platform.trainer_url}/datasets/{quote(name, safe='')}/rules",
                          content=text.encode())

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.trainer_url}/datasets")

    def dataset_versions(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.trainer_url}/datasets/{quote(name, safe='')}")

    def show_dataset(self, name: str, rev: str) -> dict[str, Any]:
        url = f"{self.platform.trainer_url}/datasets/{quote(name, safe='')}/versions/{quote(rev, safe='')}"
        return self._call("GET", url)

    def diff_datasets(self, name: str, a: str, b: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.trainer_url}/datasets/{quote(name, safe='')}/diff",
                          params={"a": a, "b": b})

    # trainer
    def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.trainer_url}/jobs", json=spec)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.trainer_url}/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.trainer_url}/jobs/{job_id}/cancel")

    def job_logs(self, job_id: str, after: int = 0) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.trainer_url}/jobs/{job_id}/logs", params={"after": after})

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.trainer_url}/jobs")

    def submit_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.trainer_url}/sweeps", json=spec)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.trainer_url}/sweeps/{quote(sweep_id, safe='')}")

    def list_sweeps(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.trainer_url}/sweeps")

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.trainer_url}/sweeps/{quote(sweep_id, safe='')}/cancel")

    # registry: reads
    @property
    def ui_url(self) -> str:
        """The registry's web UI."""
        return ui_url(self.platform)

    def list_models(self) -> list[dict[str, Any]]:
        """Every registered model (all pages of ``GET /models``)."""
        return self._pages(f"{self.platform.registry_url}/models", "models")

    def get_model(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.registry_url}/models/{model}")

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        """Every version of ``model``, newest first (all pages of ``GET /models/{name}/versions``)."""
        return self._pages(f"{self.platform.registry_url}/models/{model}/versions", "versions")

    def get_version(self, model: str, version: str) -> dict[str, Any]:
        """One version in full: metrics, lineage, signature, params, model card, serving, drift."""
        return self._call("GET", f"{self.platform.registry_url}/models/{model}/versions/{version}")

    def compare(self, model: str, a: str, b: str) -> dict[str, Any]:
        """Version ``b`` against version ``a`` (deltas are b − a)."""
        return self._call("GET", f"{self.platform.registry_url}/models/{model}/compare",
                          params={"a": a, "b": b})

    def history(self, model: str, at: str | None = None) -> dict[str, Any]:
        """Alias moves of ``model``, newest first; with ``at`` (ISO 8601), production at that moment."""
        return self._call("GET", f"{self.platform.registry_url}/models/{model}/history",
                          params={"at": at} if at else None)

    def audit(self, model: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if model:
            params["model"] = model
        if limit:
            params["limit"] = limit
        return self._call("GET", f"{self.platform.registry_url}/audit", params=params or None)

    # registry: promotion requests
    def request_promotion(
        self, model: str, version: str, *, reason: str, alias: str = "production",
        weight: float | None = None,
    ) -> dict[str, Any]:
        """Ask for ``alias`` → ``version`` (trainer or approver); another approver decides it."""
        body: dict[str, Any] = {"version": str(version), "alias": alias, "reason": reason}
        if weight is not None:
            body["weight"] = weight
        return self._call("POST", f"{self.platform.registry_url}/models/{model}/requests", json=body)

    def list_requests(self, model: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        params = {key: value for key, value in (("model", model), ("state", state)) if value}
        return self._call("GET", f"{self.platform.registry_url}/requests", params=params or None)

    def get_request(self, request_id: int | str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.registry_url}/requests/{request_id}")

    def approve(self, request_id: int | str, reason: str) -> dict[str, Any]:
        """Approve a request that is not your own; the alias moves if the gate passes."""
        return self._call("POST", f"{self.platform.registry_url}/requests/{request_id}/approve",
                          json={"reason": reason})

    def reject(self, request_id: int | str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.registry_url}/requests/{request_id}/reject",
                          json={"reason": reason})

    def cancel_request(self, request_id: int | str) -> dict[str, Any]:
        """Withdraw your own pending request."""
        return self._call("POST", f"{self.platform.registry_url}/requests/{request_id}/cancel")

    # registry: moves
    def promote(
        self, model: str, version: str, alias: str = "production", reason: str | None = None,
        weight: float | None = None,
    ) -> Any:
        """Move an alias at once, without a request (admin only; marked direct in the audit)."""
        body: dict[str, Any] = {"alias": alias, "reason": reason}
        if weight is not None:
            body["weight"] = weight
        return self._call(
            "POST", f"{self.platform.registry_url}/models/{model}/versions/{version}/promote", json=body,
        )

    def rollback(self, model: str, reason: str) -> dict[str, Any]:
        """Production back to the version it named before the current one (approver)."""
        return self._call("POST", f"{self.platform.registry_url}/models/{model}/rollback",
                          json={"reason": reason})

    def archive(self, model: str, version: str, reason: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.registry_url}/models/{model}/versions/{version}/archive",
                          json={"reason": reason})

    def restore(self, model: str, version: str, reason: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"{self.platform.registry_url}/models/{model}/versions/{version}/restore",
                          json={"reason": reason})

    def remove_alias(self, model: str, alias: str, reason: str | None = None) -> Any:
        return self._call(
            "DELETE", f"{self.platform.registry_url}/models/{model}/aliases/{alias}",
            params={"reason": reason} if reason else None,
        )

    # registry: gates
    def get_gate(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"{self.platform.registry_url}/models/{model}/gate")

    def set_gate(self, model: str, rules: list[str], aliases: list[str] | None = None) -> dict[str, Any]:
        """Replace ``model``'s gate (admin); an empty ``rules`` list lifts it."""
        body: dict[str, Any] = {"rules": list(rules)}
        if aliases:
            body["aliases"] = list(aliases)
        return self._call("PUT", f"{self.platform.registry_url}/models/{model}/gate", json=body)

    # serving
    def predict(
        self, model: str, inputs: list[list[float]], *, request_id: str | None = None
    ) -> dict[str, Any]:
        """``model``'s answer; ``request_id`` (sent as ``X-Request-ID``) names the request, so that its true
        labels can be sent to the monitor later."""
        headers = {"X-Request-ID": request_id} if request_id else None
        return self._call("POST", f"{self.platform.serving_url}/v1/models/{model}/predict",
                          json={"inputs": inputs}, headers=headers)

    def serving_models(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.serving_url}/v1/models")

    # monitor: windows, drift and reports, as the monitor's loop stored them
    def drift(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The drift of the newest ``ok`` window of ``model`` (of ``version``, if given)."""
        params = {"version": version} if version else None
        return self._call("GET", f"{self.platform.monitor_url}/drift/{quote(model, safe='')}", params=params)

    def drift_summaries(self) -> list[dict[str, Any]]:
        """Per model: the newest verdict, the newest window's status, the newest live metrics."""
        return self._call("GET", f"{self.platform.monitor_url}/drift")

    def windows(
        self, model: str, *, version: str | None = None, status: str | None = None, limit: int = 50,
        before: int | None = None,
    ) -> dict[str, Any]:
        """One page of ``model``'s closed windows, newest first (``next_before`` for the next page)."""
        params = {k: v for k, v in {"version": version, "status": status, "limit": limit,
                                    "before": before}.items() if v is not None}
        url = f"{self.platform.monitor_url}/windows/{quote(model, safe='')}"
        return self._call("GET", url, params=params)

    def send_feedback(self, labels: list[dict[str, Any]]) -> dict[str, Any]:
        """True labels ``[{"request_id", "row", "label"}]`` (at most 10,000): the counts matched, pending …"""
        return self._call("POST", self._monitor("/feedback"), json=labels)

    # monitor: retraining policies and the triggers they fired
    def put_policy(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", self._monitor(f"/policies/{quote(model, safe='')}"), json=body)

    def policies(self) -> list[dict[str, Any]]:
        return self._call("GET", self._monitor("/policies"))

    def policy(self, model: str) -> dict[str, Any]:
        return self._call("GET", self._monitor(f"/policies/{quote(model, safe='')}"))

    def delete_policy(self, model: str) -> dict[str, Any]:
        return self._call("DELETE", self._monitor(f"/policies/{quote(model, safe='')}"))

    def triggers(
        self, model: str | None = None, state: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"model": model, "state": state, "max_results": limit}.items() if v}
        return list(self._call("GET", self._monitor("/triggers"), params=params)["triggers"])

    def trigger(self, model: str, reason: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"model": model, "reason": reason, "parameters": parameters}
        return self._call("POST", self._monitor("/triggers"), json=body)

    def _monitor(self, path: str) -> str:
        return f"{self.platform.monitor_url.rstrip('/')}{path}"

    def reports(self, model: str, *, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        """One page of ``model``'s windows that have an Evidently report, newest first."""
        params = {"limit": limit, **({"before": before} if before else {})}
        url = f"{self.platform.monitor_url}/reports/{quote(model, safe='')}"
        return self._call("GET", url, params=params)


def ui_url(platform: PlatformSettings) -> str:
    """Where the registry serves its web UI."""
    return f"{platform.registry_url.rstrip('/')}/ui"
