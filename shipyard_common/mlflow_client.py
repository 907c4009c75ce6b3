"""The platform's MLflow client: how long one call may take, and what its failure means.

MLflow's client retries a refused connection for minutes by default (7 retries, a backoff factor
of 2, 120 s per attempt): a route that needs MLflow while it is down hung for about 170 s.
:func:`apply_mlflow_client_limits` sets the platform's own limits (``SHIPYARD_MLFLOW_REQUEST_*``)
for every MLflow client in the process; each service's app and the trainer's worker call it.

:func:`mlflow_unreachable` tells a server that is not answering (refused, timed out, 5xx) from an
answer that refuses the request; :func:`mlflow_unavailable` turns the first into the platform's one
error for it, :class:`~shipyard_common.errors.Unavailable` (503), and :func:`patiently` waits for
MLflow to come back, with a bounded backoff, for work that can wait (a training job).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from shipyard_common.errors import ShipyardError, Unavailable
from shipyard_common.settings import PlatformSettings

log = logging.getLogger("shipyard.mlflow")

T = TypeVar("T")

# What MLflow's client says when it gave up reaching the server (rest_utils.http_request), or when
# the server answered a 5xx without an MLflow error body (verify_rest_response).
_GAVE_UP = re.compile(r"^API request to \S+ failed with (timeout )?exception")
_SERVER_ERROR = re.compile(r"^API request to endpoint \S+ failed with error code 5\d\d")
_UNAVAILABLE_CODES = frozenset({"TEMPORARILY_UNAVAILABLE"})


def apply_mlflow_client_limits(platform: PlatformSettings) -> None:
    """Set MLflow's client timeout, retries, backoff and credentials for this process from ``platform``.

    MLflow reads them from the environment at every call, so this takes effect at once; the
    platform's settings win over values already in the environment, so that every service agrees.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(platform.mlflow_request_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(platform.mlflow_request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(platform.mlflow_request_backoff_s)
    # MLflow adds up to this much random delay to each backoff (1 s by default).
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = str(min(1.0, platform.mlflow_request_backoff_s / 2))
    # MLflow's basic-auth app: its client signs in with these (a service deployed with only
    # SHIPYARD_MLFLOW_PASSWORD or _PASSWORD_FILE, not started by the local stack, too).
    credentials = platform.mlflow_credentials()
    if credentials is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = credentials


def mlflow_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the MLflow server is not answering (refused, timed out, 5xx), as
    opposed to an answer that refuses the request (a missing model, a bad parameter)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        return exc.error_code in _UNAVAILABLE_CODES
    if isinstance(exc, MlflowException):
        return bool(_GAVE_UP.match(exc.message) or _SERVER_ERROR.match(exc.message))
    import httpx
    import requests

    # Not every OSError: a local file the client cannot read is no outage of the server.
    client_gave_up = isinstance(exc, requests.ConnectionError | requests.Timeout | httpx.TransportError)
    return client_gave_up or isinstance(exc, ConnectionError | TimeoutError)


def why_unreachable(exc: BaseException) -> str:
    """A short reason for a person: connection refused, timed out, or the server's error status."""
    text = str(exc)
    if "Connection refused" in text or "NewConnectionError" in text:
        return "connection refused"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    status = re.search(r"too many (5\d\d) error responses|failed with error code (5\d\d)", text)
    if status:
        return f"it fails with HTTP {status.group(1) or status.group(2)}"
    return text[:200]


def mlflow_unavailable(tracking_uri: str, why: BaseException | str, *, then: str = "") -> Unavailable:
    """The platform's error for an MLflow server that is not answering (503): ``why`` is the failure
    (or its reason, said already), ``then`` what came of it."""
    reason = why if isinstance(why, str) else why_unreachable(why)
    return Unavailable(
        f"the model registry (MLflow at {tracking_uri}) is not answering: {reason}{then}",
        details={"component": "mlflow", "tracking_uri": tracking_uri},
    )


@contextmanager
def mlflow_calls(tracking_uri: str) -> Iterator[None]:
    """Raise :func:`mlflow_unavailable` for an unreachable MLflow inside the block; other errors pass."""
    try:
        yield
    except ShipyardError:
        raise
    except Exception as exc:
        if mlflow_unreachable(exc):
            raise mlflow_unavailable(tracking_uri, exc) from exc
        raise


@dataclass(frozen=True)
class Wait:
    """One wait for MLflow: the ``retry`` about to be made (of ``retries``), after ``delay_s``."""

    tracking_uri: str
    retry: int
    retries: int
    delay_s: float
    reason: str

    def describe(self) -> str:
        return (f"waiting for MLflow at {self.tracking_uri}: retry {self.retry} of {self.retries} "
                f"in {self.delay_s:g} s ({self.reason})")


@dataclass(frozen=True)
class Patience:
    """How long work that can wait (a job) waits for MLflow: ``retries`` waits, the first of
    ``backoff_s``, each twice the last, at most ``max_backoff_s``."""

    tracking_uri: str
    retries: int
    backoff_s: float
    max_backoff_s: float
    on_wait: Callable[[Wait], None] = lambda wait: None
    on_back: Callable[[], None] = lambda: None

    def delay(self, retry: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)))


def patiently(call: Callable[[], T], patience: Patience) -> T:
    """``call()``, retried while MLflow is unreachable, ``patience.retries`` times with backoff.

    Each wait is reported to ``patience.on_wait`` first (a job shows it in its progress; it may
    raise to stop waiting), and ``on_back`` is called once MLflow answers after a wait; when the
    retries are spent, the :func:`mlflow_unavailable` error says how long it waited.
    """
    started = time.monotonic()
    retry = 0
    while True:
        try:
            result = call()
        except ShipyardError:
            raise
        except Exception as exc:
            if not mlflow_unreachable(exc):
                raise
            retry += 1
            if retry > patience.retries:
                then = f"; gave up after {patience.retries} retries over {time.monotonic() - started:.0f} s"
                raise mlflow_unavailable(patience.tracking_uri, exc, then=then) from exc
            wait = Wait(patience.tracking_uri, retry, patience.retries, patience.delay(retry),
                        why_unreachable(exc))
            log.warning("%s", wait.describe())
            patience.on_wait(wait)
            time.sleep(wait.delay_s)
            continue
        if retry:
            patience.on_back()
        return result
