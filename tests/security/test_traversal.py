"""Path traversal and hostile sources in every name, path and URI field of the four services.

The fields come from each service's OpenAPI (path and query parameters, and the string leaves of
JSON bodies, enums left out) plus the flow parameters the trainer's pipeline route passes on, which
its OpenAPI types as a free object. Each field is classified in KINDS: ``NAME`` (becomes a path, a
git ref or a registry key, so it is checked before any lookup: 400 or 422), ``LOOKUP`` (a key
looked up in a table or a map, never a path: any 4xx) or ``NotAPath`` with the reason. A field
that KINDS does not classify fails the test, so a new one cannot slip through unchecked.

Each NAME and LOOKUP field, in every route it appears in, is sent every HOSTILE value (traversal
spelt six ways, a file:// URL, the cloud metadata address, a loopback URL), the rest of the request
valid, with an admin token: it must be a 4xx whose message says what is wrong, never a 2xx or 5xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shipyard_common.auth import Role
from shipyard_common.paths import inputs_folder
from tests.security.conftest import every_route, fill, message_of, signed_in
from tests.support import auth

pytestmark = pytest.mark.security

HOSTILE = {
    "dot-dot": "../../etc/passwd",
    "encoded": "%2e%2e%2fetc%2fpasswd",
    "double-encoded": "%252e%252e%252fetc%252fpasswd",
    "backslash": "..\\..\\etc\\passwd",
    "fragment": "x#/../../etc/passwd",
    "absolute": "/etc/passwd",
    "file-url": "file:///etc/passwd",
    "metadata-url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "loopback-url": "http://127.0.0.1:6379/",
}


class NotAPath:
    """A free-text field that never becomes a path, a URI or a key: why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


NAME, LOOKUP = "name", "lookup"
Kind = str | NotAPath
TEXT = NotAPath("free text kept in a row (a reason, a rule, a label), never a path")
COLUMN = NotAPath("a column of the dataset's frame, looked up in the frame's columns")
CURSOR = NotAPath("an opaque page token the service decodes and checks itself")
MOMENT = NotAPath("a date-time, parsed by pydantic")
REQUEST_ID = NotAPath("the X-Request-ID serving answered: matched to logged predictions in a table")
# Per service: field (location:name, body leaves dotted) -> kind. One entry covers every route
# that has the field.
# A job spec's fields: a job's body, and a sweep's base.
JOB_KINDS: dict[str, Kind] = {
    "model_name": NAME, "data.dataset": NAME, "data.rev": NAME, "init_from.model_name": NAME,
    "init_from.version": NAME, "model.factory": NAME, "data.target": COLUMN, "data.features[]": COLUMN,
    "data.split.column": COLUMN, "data.split.test_rev": NAME, "data.sequence.column": COLUMN,
    "data.sequence.id": COLUMN, "data.sequence.step": COLUMN, "data.sequence.features[]": COLUMN,
}
KINDS: dict[str, dict[str, Kind]] = {
    "trainer": {
        "path:name": NAME, "path:rev": NAME, "query:tag": NAME, "query:a": NAME, "query:b": NAME,
        **{f"body:{field}": kind for field, kind in JOB_KINDS.items()},
        **{f"body:base.{field}": kind for field, kind in JOB_KINDS.items()},
        "body:parameters.csv_path": NAME, "body:parameters.dataset_name": NAME,
        "body:parameters.model_name": NAME, "body:parameters.dataset_rev": NAME,
        "body:parameters.parent_version": NAME, "body:parameters.name": NAME,
        "path:job_id": LOOKUP, "query:model_name": NAME, "path:run_id": LOOKUP, "path:sweep_id": LOOKUP,
        "body:objective.metric": NotAPath("a metric's name, matched against a trial job's metrics"),
    },
    "registry": {
        "path:name": NAME, "path:version": LOOKUP, "query:a": LOOKUP, "query:b": LOOKUP,
        "body:version": LOOKUP, "query:model": NAME,
        "body:reason": TEXT, "query:reason": TEXT, "body:rules[]": TEXT, "query:page_token": CURSOR,
        "query:at": MOMENT,
        "query:search": NAME,  # becomes part of MLflow's filter string: refused unless a name's characters
    },
    "monitor": {
        "path:model": NAME, "body:model": NAME, "body:parameters.csv_path": NAME,
        "body:parameters.dataset_rev": NAME, "query:version": LOOKUP, "query:model": NAME,
        "body:[].request_id": REQUEST_ID, "body:reason": TEXT, "body:[].label": TEXT,
        "query:page_token": CURSOR, "query:status": LOOKUP, "query:format": LOOKUP,
    },
    "serving": {"path:name": LOOKUP, "path:version": LOOKUP, "path:label": LOOKUP,
                # Tensor and signature names, matched against the loaded model's signature.
                "body:inputs[].name": LOOKUP, "body:outputs[].name": LOOKUP, "body:signature_name": LOOKUP,
                "body:id": NotAPath("the request's id, echoed in the answer and kept in the prediction log")},
}
# Flow parameters the trainer's pipeline route passes on: its OpenAPI types them as a free object.
PIPELINE_PARAMETERS = ("name", "csv_path", "dataset_name", "model_name", "dataset_rev", "parent_version")
JOB = {"model_name": "sec", "data": {"dataset": "sec", "rev": "latest", "task": "classification",
                                     "target": "y"}}
# A valid body per route (the hostile value replaces one field of it); {} where none is needed.
BODIES: dict[tuple[str, str, str], Any] = {
    ("trainer", "POST", "/jobs"): JOB,
    ("trainer", "POST", "/sweeps"): {
        "base": JOB, "trials": 2, "objective": {"metric": "val_accuracy"},
        "space": {"training.learning_rate": {"type": "choice", "values": [0.1]}}},
    ("trainer", "POST", "/pipelines/{name}/runs"): {"parameters": {}},
    ("registry", "POST", "/models/{name}/requests"): {"version": "1", "reason": "because"},
    ("registry", "POST", "/requests/{request_id}/approve"): {"reason": "because"},
    ("registry", "POST", "/requests/{request_id}/reject"): {"reason": "because"},
    ("registry", "POST", "/models/{name}/rollback"): {"reason": "because"},
    ("registry", "PUT", "/models/{name}/gate"): {"rules": []},
    ("monitor", "PUT", "/policies/{model}"): {"drift_share_above": 0.5},
    ("monitor", "POST", "/triggers"): {"model": "sec", "reason": "because"},
    ("monitor", "POST", "/feedback"): [{"request_id": "r1", "label": 1}],
    ("serving", "POST", "/v1/models/{name}/predict"): {"inputs": [[1.0]]},
    **{("serving", "POST", path): {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",
                                                "data": [1.0]}], "outputs": [{"name": "output"}]}
       for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")},
    **{("serving", "POST", path): {"instances": [[1.0]]} for path in (
        "/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict",
        "/v1/models/{name}/labels/{label}:predict")},
}
# Where a field lives in a part of the body the base leaves out: that part, valid, to put it in.
PARTS = {
    "body:model.factory": {"model": {"type": "plugin", "factory": "plugins:build"}},
    "body:init_from.model_name": {"init_from": {"model_name": "sec", "version": "1"}},
    "body:init_from.version": {"init_from": {"model_name": "sec", "version": "1"}},
}
PARTS |= {f"body:base.{field[len('body:'):]}": {"base": {**JOB, **part}} for field, part in PARTS.items()}
# Valid values of path and query parameters (the trainer's pipeline runs: the ingest pipeline).
VALID = {"name": "sec", "model": "sec", "rev": "latest", "version": "1", "label": "stable",
         "alias": "production", "job_id": "no-such-job", "sweep_id": "no-such-sweep",
         "run_id": "00000000-0000-4000-8000-000000000000",
         "request_id": "1", "trigger_id": "1", "window_id": "1", "a": "latest", "b": "latest"}
# Bodies that are files, not JSON.
RAW_BODIES = {("trainer", "POST", "/datasets/{name}"): b"y,x\n1,2\n",
              ("trainer", "PUT", "/datasets/{name}/rules"): b""}


@dataclass(frozen=True)
class Case:
    service: str
    method: str
    path: str
    field: str
    kind: Kind = field(compare=False)

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path} {self.field}"


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def string_leaves(spec: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted names of the free strings in ``schema`` (``[]`` for list items; enums left out)."""
    schema, found = _resolve(spec, schema), set()
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            found |= string_leaves(spec, sub, prefix)
    if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
        found.add(prefix)
    if schema.get("type") == "array" and "items" in schema:
        found |= string_leaves(spec, schema["items"], prefix + "[]")
    for name, sub in schema.get("properties", {}).items():
        found |= string_leaves(spec, sub, f"{prefix}.{name}" if prefix else name)
    return found


def openapi_fields(service: str, app: FastAPI) -> list[Case]:
    """Every free string field of every route in ``app``'s OpenAPI, classified or not."""
    spec, cases = app.openapi(), []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            fields = {f"{p['in']}:{p['name']}" for p in operation.get("parameters", [])
                      if p["in"] in ("path", "query") and "" in string_leaves(spec, p["schema"])}
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                fields |= {f"body:{leaf}" for leaf in string_leaves(spec, body["schema"])}
            if service == "trainer" and path == "/pipelines/{name}/runs":
                fields |= {f"body:parameters.{name}" for name in PIPELINE_PARAMETERS}
            kinds = KINDS[service]
            cases += [Case(service, method.upper(), path, f, kinds.get(f, "unclassified")) for f in fields]
    return sorted(cases, key=str)


@pytest.fixture(scope="module")
def fields(apps: dict[str, FastAPI]) -> list[Case]:
    return [case for service, app in sorted(apps.items()) for case in openapi_fields(service, app)]


def test_every_free_string_field_is_classified(fields: list[Case]) -> None:
    """A field KINDS does not classify fails here: say whether it is a name, a lookup or text."""
    unclassified = [str(case) for case in fields if case.kind == "unclassified"]
    assert not unclassified, f"fields with no entry in KINDS: {unclassified}"
    assert all(case.kind.reason for case in fields if isinstance(case.kind, NotAPath))


def set_leaf(body: Any, dotted: str, value: str) -> Any:
    """A copy of ``body`` with the leaf ``dotted`` (``[]``: the first item) set to ``value``."""
    body = json.loads(json.dumps(body))
    target, parts = body, [p for p in dotted.replace("[]", ".0").split(".") if p]
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        target.insert(int(last), value)
    else:
        target[last] = value
    return body


def hostile_request(client: TestClient, case: Case, value: str) -> Any:
    """``case``'s route with ``value`` in its field and valid values everywhere else."""
    location, _, name = case.field.partition(":")
    params = {**VALID, "name": "ingest"} if case.path == "/pipelines/{name}/runs" else VALID
    values = {k: quote(v, safe="") for k, v in params.items()}
    if location == "path":
        # Quoted twice: TestClient decodes the path once more than a server does (starlette's
        # testclient unquotes httpx's already decoded path), so the route sees ``value`` exactly.
        values[name] = quote(quote(value, safe=""), safe="")
    query = {name: value} if location == "query" else {}
    if case.path.endswith("/diff") or case.path.endswith("/compare"):
        query = {"a": VALID["a"], "b": VALID["b"], **query}
    kwargs: dict[str, Any] = {"params": query, "headers": auth("admin")}
    key = (case.service, case.method, case.path)
    if key in RAW_BODIES:
        kwargs["content"] = RAW_BODIES[key]
    elif case.method in ("POST", "PUT"):
        base = {**BODIES.get(key, {}), **PARTS.get(case.field, {})}
        kwargs["json"] = set_leaf(base, name, value) if location == "body" else base
    return client.request(case.method, fill(case.path, values), **kwargs)


def routed_away(case: Case, value: str) -> bool:
    """Whether ``value`` in ``case``'s path cannot reach its route: the server decodes ``%2F`` to a
    '/' before routing, so the path has more segments than the route (a 404 that no handler saw)."""
    return case.field.startswith("path:") and "/" in value


def says_which(case: Case, value: str, message: str) -> bool:
    """Whether a refusal names the field (its last part) or quotes the value: a person can tell
    what to change."""
    leaf = case.field.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    return leaf in message or value in message or repr(value) in message


def test_names_paths_and_sources_are_refused(clients: dict[str, TestClient], fields: list[Case]) -> None:
    """Every hostile value in every name and lookup field: a 4xx with a message; a NAME field's
    refusal comes before any lookup (400 or 422), and says what is not allowed."""
    failures = []
    for case in fields:
        if isinstance(case.kind, NotAPath):
            continue
        for label, value in HOSTILE.items():
            response = hostile_request(clients[case.service], case, value)
            status, message = response.status_code, message_of(response)
            if not 400 <= status < 500 or not message.strip():
                failures.append(f"{case} {label}: {status} {response.text[:200]}")
            elif case.kind == NAME and status not in (400, 404, 422):
                failures.append(f"{case} {label}: {status} (a name is refused before use) {message[:200]}")
            elif case.kind == NAME and status == 404 and not routed_away(case, value):
                failures.append(f"{case} {label}: looked up, not refused: {message[:200]}")
            elif case.kind == NAME and status != 404 and not says_which(case, value, message):
                failures.append(f"{case} {label}: the refusal names neither field nor value: {message[:200]}")
    assert not failures, "\n".join(failures)


def test_flow_parameters_take_a_file_in_the_inputs_folder_and_no_config(
    clients: dict[str, TestClient], security_platform: Any
) -> None:
    """The trainer starts a flow (which runs as the platform) with a caller's parameters: a
    ``config`` of the caller's (the flow's URLs, folders and token) is refused, and a ``csv_path``
    in the inputs folder, relative or absolute, passes the check (then Prefect, a stub that knows no
    deployment here: 404, the deployment is not known to it)."""
    trainer, admin = clients["trainer"], auth("admin")
    config = {"trainer_url": "http://169.254.169.254/", "data_repo": "/", "token": "x"}
    refused = trainer.post("/pipelines/ingest/runs", headers=admin,
                           json={"parameters": {"name": "sec", "config": config}})
    assert refused.status_code == 400 and "config" in message_of(refused), refused.text
    inputs = inputs_folder(security_platform.state_dir)
    for csv_path in ("sec.csv", str(inputs / "sec.csv")):
        passed = trainer.post("/pipelines/ingest/runs", headers=admin,
                              json={"parameters": {"name": "sec", "csv_path": csv_path}})
        assert passed.status_code == 404, passed.text
        assert "not known to the Prefect server" in message_of(passed), passed.text
    monitor = clients["monitor"]
    policy = monitor.put("/policies/sec", headers=admin,
                         json={"drift_share_above": 0.5, "parameters": {"config": config}})
    assert policy.status_code == 422 and "config" in message_of(policy), policy.text


def test_ui_pages_refuse_a_model_name_that_is_not_a_name(
    apps: dict[str, FastAPI], clients: dict[str, TestClient]
) -> None:
    """The registry's pages and forms name models in their addresses too: every UI route with a
    {name}, signed in as admin, answers a hostile name with a 400 page saying it is not allowed."""
    browser, csrf = signed_in(apps["registry"], Role.ADMIN)
    routes = [(m, p) for m, p in every_route(apps["registry"]) if "{name}" in p]
    assert len(routes) > 10, routes
    values = {**VALID, "file": "curve.png"}
    for method, path in routes:
        for label in ("backslash", "double-encoded"):
            hostile = quote(quote(HOSTILE[label], safe=""), safe="")
            address = fill(path, {**{k: quote(v, safe="") for k, v in values.items()}, "name": hostile})
            page = browser.request(method, address, data={"csrf": csrf} if method == "POST" else None)
            assert page.status_code == 400 and "is not allowed" in page.text, f"{method} {path} {label}"
