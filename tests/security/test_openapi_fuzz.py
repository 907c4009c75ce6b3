"""Schemathesis against every service's OpenAPI (issue 14): no 5xx, and every answer is what the
OpenAPI says (its status code documented, its body the schema documented for that code).

Each service runs as its tests run it (uvicorn on a free port; the machine's Redis, a PostgreSQL
database or SQLite file of the test's own, the session's real MLflow server). Its ``/openapi.json``
is loaded with schemathesis, and every operation is called with requests generated from it, valid
ones (positive) and invalid ones (negative), with an admin token: a fixed seed (``derandomize``),
``EXAMPLES`` of each, no shrinking (a failure is reported as found), after the examples the OpenAPI
documents. Operations with a ``{name}`` or ``{model}`` are fuzzed a second time with the name of what
the fixtures made (a dataset version for the trainer; a registered and served model for the others),
so that requests get past the lookup into parsing, the registry and the data plane (v2 infer's
example is answered, and its answer checked). Serving runs in the fast lane's HTTP protocol, as
``python -m services.serving`` serves it.

A failing operation does not stop the others: the test fails at the end listing each failure
(schemathesis' own report of the request, the answer and what was wrong). No operation is left out.
The ones that start work do it only on what the fixtures set up: ``POST /jobs`` queues a job only
for a dataset version that exists (the fixture's), on a queue prefix of the test's own that no worker
takes; dataset versions and rules are added to the fixture's dataset in the test's own state folder; a
pipeline run or a retraining needs a pipeline or model of that name, and generated names are
not one, so they are refused (404) before Prefect is called; alias moves, archives and retraining
policies act on the fixture's model, which no other test uses.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.app import create_app as create_registry
from services.registry.settings import RegistrySettings
from services.serving.app import create_app as create_serving
from services.serving.fastlane.uvicorn_protocol import FastLaneHttpProtocol
from services.serving.settings import ServingSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from shipyard_common.datasets import DataRepo
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import register_folder
from tests.support import auth, running_app, wait_for

pytestmark = pytest.mark.security

# Examples per operation and generation mode: the whole file stays near a minute on two cores.
EXAMPLES = 6
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
ADMIN = auth("admin")


def fuzz(base: str, *, model: str | None = None) -> list[str]:
    """Every operation of the app at ``base``, with valid requests and (where one exists) invalid ones;
    with ``model``, operations with a ``{name}`` or ``{model}`` again with it. The failures, one text
    each (empty: none)."""
    document = httpx.get(f"{base}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    operations, calls = 0, [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        described = document["paths"][operation.path][operation.method.lower()]
        fixed: list[dict[str, str]] = [{}]
        if model is not None:
            names = {p for p in ("name", "model") if "{" + p + "}" in operation.path}
            if names:
                fixed.append(dict.fromkeys(names, model))
        for path_parameters in fixed:
            modes = [GenerationMode.POSITIVE]
            if can_be_invalid(described, set(path_parameters)):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                problem = run_operation(operation, mode, path_parameters or None, calls)
                if problem:
                    failures.append(f"{operation.label} ({mode.value}, {path_parameters}):\n{problem}")
    # Every operation was called at least once per pass (a strategy that generates nothing would not be).
    assert operations > 0 and calls[0] >= operations, (operations, calls)
    return failures


# Keywords that only describe: a schema with no others (beyond "type": "string") takes any string.
DESCRIPTIVE = {"title", "description", "default", "examples"}


def any_string(schema: dict[str, Any]) -> bool:
    """Whether every string is valid for ``schema`` (a plain or optional ``str`` parameter)."""
    if "anyOf" in schema:
        return any(any_string(s) for s in schema["anyOf"])
    return schema.get("type") == "string" and set(schema) - DESCRIPTIVE == {"type"}


def can_be_invalid(described: dict[str, Any], fixed: set[str]) -> bool:
    """Whether an invalid request exists for the operation: a body, a required query parameter, or a
    parameter (not the token headers, which every call sets, nor a fixed name) that is more than any
    string. Schemathesis otherwise searches hundreds of cases before it gives up."""
    if "requestBody" in described:
        return True
    for parameter in described.get("parameters", []):
        if parameter["in"] == "header" or parameter["name"] in fixed:
            continue
        if parameter.get("required") and parameter["in"] == "query":
            return True
        if not any_string(parameter.get("schema", {})):
            return True
    return False


def run_operation(
    operation: Any, mode: GenerationMode, path_parameters: dict[str, str] | None, calls: list[int]
) -> str:
    """``EXAMPLES`` generated calls of ``operation`` (positive: after the examples its OpenAPI gives);
    what schemathesis reports of the first failure."""
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
    if mode is GenerationMode.POSITIVE:
        documented = operation.get_strategies_from_examples(path_parameters=path_parameters)
        problem = "".join(calls_of(operation, one, mode, calls, examples=1) for one in documented)
        if problem:
            return problem
    return calls_of(operation, strategy, mode, calls, examples=EXAMPLES)


def calls_of(operation: Any, strategy: Any, mode: GenerationMode, calls: list[int], *, examples: int) -> str:
    """``examples`` calls of ``operation`` drawn from ``strategy``; the first failure's report."""

    @given(case=strategy)
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
              print_blob=False)
    def call(case: Any) -> None:
        calls[0] += 1
        case.call_and_validate(headers=ADMIN, checks=CHECKS, timeout=30)

    try:
        call()
    except Unsatisfiable:
        # Negative: the operation has nothing that can be made invalid (no parameter, or only the name
        # fixed here). Positive: never expected, so reported.
        return "" if mode is GenerationMode.NEGATIVE else "no valid request can be generated"
    # Schemathesis' failures (a group of them: a BaseExceptionGroup), with the request and the answer.
    except (Exception, BaseExceptionGroup) as exc:
        return str(exc)
    return ""


def report(failures: list[str]) -> str:
    return f"{len(failures)} operation(s) failed:\n\n" + "\n\n".join(failures)


@pytest.fixture
def served_model(mlflow_server: str) -> str:
    """A model with a production version that serving can load (an ONNX classifier)."""
    factory = ModelFactory(mlflow_server)
    version = register_folder(factory, unique_name("fuzz"), seed=5, serve="onnx")
    factory.set_production(version.name, version.version)
    return version.name


def ready(base: str, timeout: float = 120) -> str:
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout=timeout, what=f"{base} ready")
    return base


@pytest.fixture
def dataset(platform: PlatformSettings) -> str:
    """A dataset with one version in the test's own data repository, for the dataset routes to find."""
    import pandas as pd

    DataRepo.from_settings(platform).add("fuzz", pd.DataFrame({"x": [0.5, 1.5, 2.5], "y": [0, 1, 0]}))
    return "fuzz"


def test_trainer_openapi(platform: PlatformSettings, dataset: str) -> None:
    app = create_trainer(TrainerSettings(platform=platform, queue_prefix=f"fuzz-{uuid.uuid4().hex[:8]}-"))
    with running_app(app) as base:
        failures = fuzz(ready(base), model=dataset)
    assert not failures, report(failures)


def test_registry_openapi(platform: PlatformSettings, served_model: str) -> None:
    with running_app(create_registry(RegistrySettings(platform=platform))) as base:
        failures = fuzz(ready(base), model=served_model)
    assert not failures, report(failures)


def test_serving_openapi(platform: PlatformSettings, served_model: str) -> None:
    """As ``python -m services.serving`` serves it: predictions answered in the fast lane's protocol."""
    app = create_serving(ServingSettings(platform=platform, reconcile_interval_s=300.0))
    with running_app(app, http=FastLaneHttpProtocol) as base:
        failures = fuzz(ready(base), model=served_model)
    assert not failures, report(failures)


def test_monitor_openapi(platform: PlatformSettings, served_model: str) -> None:
    with running_app(create_monitor(MonitorSettings(platform=platform))) as base:
        failures = fuzz(ready(base), model=served_model)
    assert not failures, report(failures)
