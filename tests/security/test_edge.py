"""The edge (shipyard_common.edge) on real service apps over real HTTP: bodies bounded before auth,
JSON depth and size, trusted hosts, CORS and the per-caller rate limit."""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.app import create_app as create_registry
from services.registry.settings import RegistrySettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from shipyard_common.auth import Role
from shipyard_common.edge import install_edge
from shipyard_common.edge.jsonscan import JsonLimits, check_json_shape
from shipyard_common.errors import ShipyardError
from shipyard_common.settings import ServiceSettings
from shipyard_common.web import install_common
from tests.support import auth, free_port, running_app, test_platform

pytestmark = pytest.mark.security

MIB = 1024 * 1024
ORIGIN = "https://ui.example.com"


def platform_for(root: Path, redis_url: str) -> Any:
    # MLflow is never reached by these requests: a closed port is enough.
    return test_platform(root / "state", redis_url=redis_url, db_url=f"sqlite:///{root / 'shipyard.db'}",
                         mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")


def trainer_settings(root: Path, redis_url: str, **options: Any) -> TrainerSettings:
    return TrainerSettings(platform=platform_for(root, redis_url),
                           queue_prefix=f"edge-{uuid.uuid4().hex[:8]}-", **options)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    """The trainer with a 1 MiB body limit, 4 MiB for dataset uploads, JSON of at most 100,000
    values, and one CORS origin."""
    settings = trainer_settings(tmp_path_factory.mktemp("edge-trainer"), redis_url, max_body_bytes=MIB,
                                dataset_max_bytes=4 * MIB, max_json_values=100_000,
                                cors_allowed_origins=[ORIGIN])
    with running_app(create_trainer(settings)) as base:
        yield base


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    """The trainer with a rate limit of 1 request a second per caller, in bursts of 3."""
    settings = trainer_settings(tmp_path_factory.mktemp("edge-limited"), redis_url,
                                rate_limit_per_s=1, rate_limit_burst=3)
    with running_app(create_trainer(settings)) as base:
        yield base


def raw_request(base: str, head: str, body_chunks: int = 0, chunk: int = 64 * 1024,
                timeout: float = 60) -> tuple[int, dict[str, Any], int, float]:
    """Send ``head``, then up to ``body_chunks`` chunks of a chunked body without waiting for the
    server, reading its answer as it comes: (status, JSON body, body bytes sent, seconds)."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode())
    sock.setblocking(False)
    frame = memoryview(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n")
    pending, sent, chunks_left, answer = frame[:0], 0, body_chunks, b""
    try:
        while time.monotonic() - started < timeout:
            writing = bool(chunks_left or pending)
            readable, writable, _ = select.select([sock], [sock] if writing else [], [], 1)
            if readable:
                data = sock.recv(65536)
                answer += data
                if not data or complete(answer):
                    break
            elif writable:
                if not pending:
                    pending, chunks_left = frame, chunks_left - 1
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    pending, chunks_left = frame[:0], 0  # the server stopped reading: read its answer
                    continue
                pending, sent = pending[n:], sent + n
    finally:
        sock.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(body), sent, time.monotonic() - started


def complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def post_head(base: str, path: str, extra: str) -> str:
    host = base.removeprefix("http://")
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}\r\n"


def test_a_streamed_200_mb_body_without_a_token_is_refused_at_the_limit(trainer: str) -> None:
    # 3,200 chunks of 64 KiB: 200 MiB, had the server kept reading. It stops at its 1 MiB limit.
    head = post_head(trainer, "/jobs", "Transfer-Encoding: chunked\r\n")
    status, body, sent, seconds = raw_request(trainer, head, body_chunks=3200)
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large" and "limit of 1048576" in body["error"]["message"]
    # What was sent before the answer: the limit plus what the sockets' buffers took in, not 200 MiB.
    assert sent < 32 * MIB, sent
    assert seconds < 30


def test_a_declared_length_over_the_limit_is_refused_before_auth_and_unread(trainer: str) -> None:
    # No token and no body at all: the answer comes from the headers alone.
    head = post_head(trainer, "/jobs", "Content-Length: 209715200\r\n")
    status, body, sent, seconds = raw_request(trainer, head)
    assert status == 413 and sent == 0 and seconds < 10
    assert body["error"] == {
        "code": "payload_too_large",
        "message": "the request body is 209715200 bytes, over the limit of 1048576 bytes",
    }


def test_dataset_uploads_have_their_own_larger_limit(trainer: str) -> None:
    url = f"{trainer}/datasets/edge-check"
    # 2 MiB is over the service's 1 MiB but within the uploads' 4 MiB: it reaches the route, which
    # finds it is no Parquet file.
    reached = httpx.post(url, params={"format": "parquet"}, content=b"x" * (2 * MIB),
                         headers=auth(Role.TRAINER), timeout=60)
    assert reached.status_code == 400 and "cannot be read as parquet" in reached.json()["error"]["message"]
    too_large = httpx.post(url, content=b"x" * (5 * MIB), headers=auth(Role.TRAINER), timeout=60)
    assert too_large.status_code == 413 and "limit of 4194304" in too_large.json()["error"]["message"]
    # The larger limit is for the uploads only: another route with the same body is refused.
    rules = httpx.put(f"{url}/rules", content=b"x" * (2 * MIB), headers=auth(Role.TRAINER), timeout=60)
    assert rules.status_code == 413


@pytest.mark.parametrize("token", [None, Role.TRAINER])
def test_json_nested_100000_deep_is_a_400_saying_so(trainer: str, token: Role | None) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = {"Content-Type": "application/json", **(auth(token) if token else {})}
    response = httpx.post(f"{trainer}/jobs", content=deep, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "code": "bad_request",
        "message": "the JSON body nests arrays or objects 100000 levels deep; at most 64 are accepted",
    }
    # Unclosed, and objects rather than arrays: the same.
    unclosed = httpx.post(f"{trainer}/jobs", content=b'{"a":' * 100_000, headers=headers, timeout=30)
    assert unclosed.status_code == 400 and "100000 levels deep" in unclosed.json()["error"]["message"]


def test_json_with_too_many_values_is_a_400_saying_so(trainer: str) -> None:
    many = b"[" + b"0," * 200_000 + b"0]"  # 400 kB, within the body limit
    response = httpx.post(f"{trainer}/jobs", content=many, headers={
        "Content-Type": "application/json", **auth(Role.TRAINER)}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == (
        "the JSON body holds about 200002 values; at most 100000 are accepted in one request")


def test_a_host_the_service_does_not_answer_to_is_a_400(trainer: str) -> None:
    port = trainer.rsplit(":", 1)[1]
    refused = httpx.get(f"{trainer}/jobs", headers={"Host": "evil.example", **auth(Role.VIEWER)})
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "code": "bad_request",
        "message": "the Host header names 'evil.example', which this service does not answer to "
                   "(its allowed_hosts setting)",
    }
    rebound = httpx.get(f"{trainer}/healthz", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(f"{trainer}/healthz", headers={"Host": host}).status_code == 200, host


def test_cors_preflight_answers_the_allowed_origin_only(trainer: str) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(f"{trainer}/jobs", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{trainer}/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # Answers to allowed pages carry the header; others do not.
    read = httpx.get(f"{trainer}/jobs", headers={"Origin": ORIGIN, **auth(Role.VIEWER)})
    assert read.status_code == 200 and read.headers["access-control-allow-origin"] == ORIGIN
    foreign = httpx.get(f"{trainer}/jobs", headers={"Origin": "https://evil.example", **auth(Role.VIEWER)})
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers


def test_without_cors_origins_no_page_elsewhere_is_answered(limited: str) -> None:
    asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    preflight = httpx.options(f"{limited}/jobs", headers=asked)
    assert "access-control-allow-origin" not in preflight.headers


def test_normal_requests_pass_the_edge_unchanged(trainer: str) -> None:
    assert httpx.get(f"{trainer}/jobs", headers=auth(Role.VIEWER)).json() == []
    # A JSON body within the limits reaches the app, which answers it as before (no such dataset).
    spec = {"model_name": "m", "framework": "pytorch", "model": {"type": "mlp", "hidden": [8]},
            "data": {"dataset": "missing", "rev": "latest", "task": "classification", "target": "y"}}
    answered = httpx.post(f"{trainer}/jobs", json=spec, headers=auth(Role.TRAINER))
    assert answered.status_code == 422 and "data.dataset" in answered.text
    # A chunked JSON body within the limit is replayed to the app whole.
    chunks = (part.encode() for part in json.dumps(spec))
    chunked = httpx.post(f"{trainer}/jobs", content=chunks,
                         headers={"Content-Type": "application/json", **auth(Role.TRAINER)})
    assert chunked.status_code == 422 and "data.dataset" in chunked.text
    assert httpx.post(f"{trainer}/jobs", json=spec).status_code == 401
    metrics = httpx.get(f"{trainer}/metrics").text
    assert 'route="(edge)"' in metrics  # the refusals above are counted


def test_a_burst_over_the_rate_limit_is_a_429_with_retry_after(limited: str) -> None:
    viewer = auth(Role.VIEWER)
    answers = [httpx.get(f"{limited}/jobs", headers=viewer) for _ in range(8)]
    statuses = [a.status_code for a in answers]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:], statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "at most 1 a second" in refused.json()["error"]["message"]
    # Per caller: another token has its own bucket; probes are never limited.
    assert httpx.get(f"{limited}/jobs", headers=auth(Role.TRAINER)).status_code == 200
    assert all(httpx.get(f"{limited}/healthz").status_code == 200 for _ in range(5))
    time.sleep(int(refused.headers["retry-after"]) + 0.2)
    assert httpx.get(f"{limited}/jobs", headers=viewer).status_code == 200


def test_invented_tokens_share_their_address_bucket(limited: str) -> None:
    # Each a token of its own, yet all take from this address's bucket (3 at most, 1 more a second;
    # the bucket may be partly spent by the module's other requests without a token).
    statuses = [httpx.get(f"{limited}/jobs", headers={"Authorization": f"Bearer made-up-{i}"}).status_code
                for i in range(8)]
    first = statuses.index(429)
    assert set(statuses[:first]) <= {401} and first <= 3, statuses


def test_the_registry_and_the_monitor_refuse_at_the_edge_too(tmp_path: Path, redis_url: str) -> None:
    platform = platform_for(tmp_path, redis_url)
    for app, path in ((create_registry(RegistrySettings(platform=platform, max_body_bytes=MIB)), "/requests"),
                      (create_monitor(MonitorSettings(platform=platform, max_body_bytes=MIB)), "/feedback")):
        with running_app(app) as base:
            status, body, _, _ = raw_request(base, post_head(base, path, "Content-Length: 209715200\r\n"))
            assert status == 413 and body["error"]["code"] == "payload_too_large", path
            deep = httpx.post(f"{base}{path}", content=b"[" * 100_000, headers=auth(Role.ADMIN))
            assert deep.status_code == 400 and "100000 levels deep" in deep.json()["error"]["message"]
            assert httpx.get(f"{base}/healthz", headers={"Host": "evil.example"}).status_code == 400


@pytest.mark.parametrize(("body", "depth_refused"), [
    (b'{"a": "[[[[[[[[[[", "b": "\\"[[[[[[[[[[[["}', False),  # brackets in strings, escaped quotes
    (b'["\\\\", [[[[1]]]]]', False),  # an escaped backslash ends before the quote
    (b"[" * 64 + b"]" * 64, False),
    (b"[" * 65 + b"]" * 65, True),
    (b"[{" * 33 + b"}]" * 33, True),
    (b"[1, 2", False),  # malformed, but shallow: the parser says what is wrong
])
def test_the_json_scan_reads_structure_not_text(body: bytes, depth_refused: bool) -> None:
    assert (check_json_shape(body, JsonLimits()) is not None) == depth_refused


def test_a_service_with_its_own_error_shape_gets_its_refusals_in_it(tmp_path: Path) -> None:
    # Serving's OIP v2 answers {"error": "message"}: the edge takes a function that shapes the body.
    app = FastAPI()
    settings = ServiceSettings(platform=test_platform(tmp_path), max_body_bytes=1024)
    install_common(app, service="shaped", platform=settings.platform)

    def v2_shape(scope: Any, error: ShipyardError) -> bytes:
        return json.dumps({"error": error.message}).encode()

    install_edge(app, settings, service="shaped", error_body=v2_shape)
    with running_app(app) as base:
        too_large = httpx.post(f"{base}/v2/models/m/infer", content=b"x" * 2048)
        assert too_large.status_code == 413
        assert too_large.json() == {"error": "the request body is 2048 bytes, over the limit of 1024 bytes"}
        host = httpx.get(f"{base}/healthz", headers={"Host": "evil.example"})
        assert host.status_code == 400 and isinstance(host.json()["error"], str)
