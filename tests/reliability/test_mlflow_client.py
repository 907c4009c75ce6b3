"""The platform's MLflow client limits and its one reading of an MLflow that does not answer
(shipyard_common.mlflow_client), on MLflow's real client against a port nothing listens on."""

from __future__ import annotations

import time
from typing import Any

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from shipyard_common.errors import NotFound, Unavailable
from shipyard_common.mlflow_client import (
    Patience,
    Wait,
    apply_mlflow_client_limits,
    mlflow_calls,
    mlflow_unreachable,
    patiently,
)
from tests.support import free_port, test_platform

pytestmark = pytest.mark.reliability

LIMITS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
          "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")


@pytest.fixture
def closed_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    """An MLflow URI nothing listens on, with the platform's default limits applied (undone after)."""
    for name in LIMITS:
        monkeypatch.setenv(name, "0")  # restored by monkeypatch, whatever apply sets
    apply_mlflow_client_limits(test_platform(tmp_path))
    return f"http://127.0.0.1:{free_port()}"


def test_the_platform_settings_become_mlflows_client_limits(monkeypatch, tmp_path):
    for name in LIMITS:
        monkeypatch.setenv(name, "99")
    platform = test_platform(tmp_path, mlflow_request_timeout_s=7, mlflow_request_retries=1,
                             mlflow_request_backoff_s=3)
    apply_mlflow_client_limits(platform)
    import os

    assert [os.environ[name] for name in LIMITS] == ["7", "1", "3", "1.0"]
    assert platform.as_env()["SHIPYARD_MLFLOW_REQUEST_TIMEOUT_S"] == "7"


def test_a_refused_mlflow_is_one_503_within_seconds(closed_uri):
    started = time.monotonic()
    with pytest.raises(Unavailable) as refused, mlflow_calls(closed_uri):
        MlflowClient(tracking_uri=closed_uri).get_registered_model("m")
    assert time.monotonic() - started < 15  # MLflow's own defaults took about 170 s
    assert refused.value.status_code == 503
    expected = f"the model registry (MLflow at {closed_uri}) is not answering: connection refused"
    assert refused.value.message == expected


def test_an_answer_that_refuses_the_request_is_not_an_outage():
    missing = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no model"})
    assert not mlflow_unreachable(missing)
    assert not mlflow_unreachable(MlflowException("bad input", error_code="INVALID_PARAMETER_VALUE"))
    assert not mlflow_unreachable(FileNotFoundError("a local file"))
    server_error = MlflowException("API request to endpoint /api/2.0/mlflow/x failed with error code 502")
    assert mlflow_unreachable(server_error)


def test_patience_waits_says_so_and_goes_on_when_mlflow_answers(closed_uri, tmp_path):
    apply_mlflow_client_limits(test_platform(tmp_path, mlflow_request_retries=0))  # each call fails at once
    client = MlflowClient(tracking_uri=closed_uri)
    waits: list[Wait] = []
    back: list[bool] = []
    calls = iter([lambda: client.get_registered_model("m"), lambda: client.get_registered_model("m"),
                  lambda: "answered"])
    patience = Patience(closed_uri, retries=3, backoff_s=0.01, max_backoff_s=0.02, on_wait=waits.append,
                        on_back=lambda: back.append(True))
    assert patiently(lambda: next(calls)(), patience) == "answered"
    assert [w.describe() for w in waits] == [
        f"waiting for MLflow at {closed_uri}: retry 1 of 3 in 0.01 s (connection refused)",
        f"waiting for MLflow at {closed_uri}: retry 2 of 3 in 0.02 s (connection refused)",
    ]
    assert back == [True]


def test_patience_gives_up_saying_why_and_lets_other_errors_through_at_once(closed_uri, tmp_path):
    apply_mlflow_client_limits(test_platform(tmp_path, mlflow_request_retries=0))  # each call fails at once
    client = MlflowClient(tracking_uri=closed_uri)
    patience = Patience(closed_uri, retries=2, backoff_s=0.01, max_backoff_s=0.01)
    with pytest.raises(Unavailable, match="connection refused; gave up after 2 retries over"):
        patiently(lambda: client.get_registered_model("m"), patience)
    tries: list[int] = []

    def missing() -> None:
        tries.append(1)
        raise NotFound("no such model")

    with pytest.raises(NotFound):
        patiently(missing, patience)
    assert tries == [1]
