"""A small HTTP client for the four services, used by the CLI and the demo."""

from __future__ import annotations

from typing import Any

import httpx

from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings


class ClientError(RuntimeError):
    """A service answered with an error; the message is the service's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ShipyardClient:
    def __init__(self, platform: PlatformSettings, token: str = DEV_ADMIN_TOKEN, timeout: float = 60) -> None:
        self.platform = platform
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(0, f"cannot reach {url}: {exc} (is the stack up? 'shipyard status')") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ClientError(response.status_code, message)
        return response.json()

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

    # registry
    def list_models(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.registry_url}/models")

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.registry_url}/models/{model}/versions")

    def promote(
        self, model: str, version: str, alias: str = "production", reason: str | None = None,
        weight: float | None = None,
    ) -> Any:
        body: dict[str, Any] = {"alias": alias, "reason": reason}
        if weight is not None:
            body["weight"] = weight
        return self._call(
            "POST", f"{self.platform.registry_url}/models/{model}/versions/{version}/promote", json=body,
        )

    def remove_alias(self, model: str, alias: str, reason: str | None = None) -> Any:
        return self._call(
            "DELETE", f"{self.platform.registry_url}/models/{model}/aliases/{alias}",
            params={"reason": reason} if reason else None,
        )

    # serving
    def predict(self, model: str, inputs: list[list[float]]) -> dict[str, Any]:
        return self._call(
            "POST", f"{self.platform.serving_url}/v1/models/{model}/predict", json={"inputs": inputs}
        )

    def serving_models(self) -> list[dict[str, Any]]:
        return self._call("GET", f"{self.platform.serving_url}/v1/models")

    # monitor
    def drift(self, model: str, window: int | None = None) -> dict[str, Any]:
        params = {"window": window} if window else None
        return self._call("GET", f"{self.platform.monitor_url}/drift/{model}", params=params)
