"""The worker Deployment as the scaler sees it: its replicas, read and set through the ``scale``
subresource of the Kubernetes API (``kubernetes`` client, ``AppsV1Api``).

RBAC the scaler's service account needs in the Deployment's namespace: ``get`` and ``patch`` on
``deployments/scale`` (each tick), ``get`` on ``deployments`` (the check at start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from shipyard_common.errors import ShipyardError

log = logging.getLogger("shipyard.trainer.scaler")

MERGE_PATCH = "application/merge-patch+json"
T = TypeVar("T")


class KubernetesError(ShipyardError):
    """The Kubernetes API refused or failed a call; the message says which, where and what to check."""


def api_client() -> client.ApiClient:
    """A client for the cluster this runs in (its service account), else the current kubeconfig context."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        log.info("kubernetes: in-cluster configuration (the pod's service account)")
    except ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
        log.info("kubernetes: not in a cluster; the kubeconfig's current context")
    return client.ApiClient()


class WorkerDeployment:
    """One Deployment's replicas: read and set, each call bounded by ``timeout_s``."""

    def __init__(self, api: client.ApiClient, *, namespace: str, name: str, timeout_s: float) -> None:
        self.apps = client.AppsV1Api(api)
        self.namespace = namespace
        self.name = name
        self.timeout_s = timeout_s

    def check(self) -> int:
        """The Deployment's replicas now; :class:`KubernetesError` if it cannot be read (missing, RBAC)."""
        deployment = self._call("read", lambda: self.apps.read_namespaced_deployment(
            self.name, self.namespace, _request_timeout=self.timeout_s))
        return int(deployment.spec.replicas or 0) if deployment.spec is not None else 0

    def replicas(self) -> int:
        """The replicas the Deployment asks for now (``spec.replicas`` of its scale)."""
        scale = self._call("read the scale of", lambda: self.apps.read_namespaced_deployment_scale(
            self.name, self.namespace, _request_timeout=self.timeout_s))
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def scale(self, replicas: int) -> None:
        """Set the Deployment's replicas (a merge patch of its scale)."""
        self._call(f"scale to {replicas}", lambda: self.apps.patch_namespaced_deployment_scale(
            self.name, self.namespace, {"spec": {"replicas": replicas}},
            _request_timeout=self.timeout_s, _content_type=MERGE_PATCH))

    def _call(self, what: str, call: Callable[[], T]) -> T:
        where = f"deployment {self.name!r} in namespace {self.namespace!r}"
        try:
            return call()
        except ApiException as exc:
            raise KubernetesError(f"could not {what} {where}: {_hint(exc)}") from exc
        except (HTTPError, OSError) as exc:
            raise KubernetesError(f"could not {what} {where}: the API server did not answer: {exc}") from exc


def _hint(exc: ApiException) -> str:
    if exc.status == 404:
        return "it does not exist: check SHIPYARD_SCALER_DEPLOYMENT and SHIPYARD_SCALER_NAMESPACE"
    if exc.status in (401, 403):
        return ("the service account may not: grant get and patch on deployments/scale and get on "
                "deployments in that namespace")
    return f"the API server answered {exc.status} {exc.reason}"
