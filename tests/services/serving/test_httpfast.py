"""Predictions answered inside uvicorn's HTTP protocol (services/serving/fastlane/uvicorn_protocol.py)
keep HTTP/1.1's rules, on the one uvicorn release that protocol is bound to.

Raw sockets against a real uvicorn serving the real app with :class:`FastLaneHttpProtocol`:
several requests on one kept-alive connection, pipelined requests answered in order,
``Connection: close`` and HTTP/1.0 closing the connection, uvicorn's default headers on each
answer, and a body that arrives in pieces.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import numpy as np
import uvicorn
from sqlalchemy import select

from services.serving.fastlane.uvicorn_protocol import UVICORN_VERSION, bound_uvicorn, find_fast_lane
from shipyard_common.db import Database
from shipyard_common.records import PredictionRecord
from tests.services.serving.test_fastlane import ROWS, VIEWER
from tests.support import wait_for

BODY = json.dumps({"inputs": ROWS}).encode()


def test_the_protocol_is_bound_to_the_installed_uvicorn() -> None:
    """Fails on a uvicorn upgrade: check serving's protocol against the new release's httptools_impl and
    shipyard_common/runner.py's drain against its supervisor, then move UVICORN_VERSION (until then,
    serving runs predictions on the ASGI fast lane instead)."""
    assert uvicorn.__version__ == UVICORN_VERSION, (
        f"uvicorn is {uvicorn.__version__}, but services/serving/fastlane/uvicorn_protocol.py and "
        f"shipyard_common/runner.py are written against {UVICORN_VERSION}: read the private names they "
        "use again before moving the pin (shipyard_common.runner.UVICORN_VERSION)"
    )
    assert bound_uvicorn()


def request(name: str, *, extra: str = "", version: str = "1.1", body: bytes = BODY) -> bytes:
    head = (f"POST /v1/models/{name}/predict HTTP/{version}\r\nHost: test\r\n"
            f"Authorization: {VIEWER['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


Answer = tuple[int, dict[str, str], bytes]


def read_responses(sock: socket.socket, count: int, timeout: float = 10) -> list[Answer]:
    """``count`` responses (status, headers, body) read off ``sock``; each must have a Content-Length."""
    sock.settimeout(timeout)
    buffer = b""
    found: list[Answer] = []
    while len(found) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(found)} responses"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            buffer += chunk
        found.append((int(status_line.split()[1]), headers, buffer[:length]))
        buffer = buffer[length:]
    return found


def closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def warm(base: str, name: str) -> None:
    """Cheap calls run inline (and so in the protocol) once a few have been measured."""
    for _ in range(8):
        response = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": ROWS}, headers=VIEWER)
        response.raise_for_status()


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def test_kept_alive_and_pipelined_requests_are_answered_in_order(apps: tuple[Any, str, str, str]) -> None:
    app, base, _, name = apps
    warm(base, name)
    lane = find_fast_lane(app)
    assert lane is not None
    before = lane.protocol_answers
    with connect(base) as sock:
        for _ in range(3):  # one after the other on one connection
            sock.sendall(request(name))
            ((status, headers, body),) = read_responses(sock, 1)
            assert status == 200 and headers["x-model-version"] == "1"
            assert "date" in headers and headers["server"] == "uvicorn"
            assert len(json.loads(body)["outputs"]) == len(ROWS)
        # Pipelined: three requests in one write (ids in order), and a refused one between them.
        ids = [f"pipe-{i}" for i in range(3)]
        batch = b"".join(request(name, extra=f"X-Request-ID: {i}\r\n") for i in ids[:2])
        batch += request(name, body=b'{"inputs": [[1, 2]]}')
        batch += request(name, extra=f"X-Request-ID: {ids[2]}\r\n")
        sock.sendall(batch)
        answers = read_responses(sock, 4)
        assert [status for status, _, _ in answers] == [200, 200, 422, 200]
        assert "features" in json.loads(answers[2][2])["error"]["message"]
    assert lane.protocol_answers - before >= 3


def test_connection_close_and_http_10_close_after_the_answer(apps: tuple[Any, str, str, str]) -> None:
    _, base, _, name = apps
    warm(base, name)
    with connect(base) as sock:
        sock.sendall(request(name, extra="Connection: close\r\n"))
        ((status, headers, _),) = read_responses(sock, 1)
        assert status == 200 and headers.get("connection") == "close"
        assert closed(sock)
    with connect(base) as sock:
        sock.sendall(request(name, version="1.0"))
        ((status, _, body),) = read_responses(sock, 1)
        assert status == 200 and json.loads(body)["model_version"] == "1"
        assert closed(sock)


def test_a_body_in_pieces_and_a_client_that_leaves(apps: tuple[Any, str, str, str]) -> None:
    _, base, _, name = apps
    warm(base, name)
    payload = request(name)
    with connect(base) as sock:
        for start in range(0, len(payload), 7):  # headers and body dribbled in small writes
            sock.sendall(payload[start:start + 7])
            time.sleep(0.002)
        ((status, _, body),) = read_responses(sock, 1)
        assert status == 200 and len(json.loads(body)["outputs"]) == len(ROWS)
    with connect(base) as sock:  # half a body, then gone: nothing to answer, the server stays up
        sock.sendall(payload[: len(payload) - 10])
    response = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": ROWS}, headers=VIEWER)
    assert response.status_code == 200


def burst(base: str, name: str, bodies: list[tuple[str, bytes]]) -> list[Answer]:
    """Each body on its own connection, all sent before any answer is read: requests arriving together."""
    sockets = [connect(base) for _ in bodies]
    try:
        for sock, (request_id, body) in zip(sockets, bodies, strict=True):
            sock.sendall(request(name, extra=f"X-Request-ID: {request_id}\r\n", body=body))
        return [read_responses(sock, 1)[0] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_requests_arriving_together_share_a_runtime_call_and_each_gets_its_own_rows(
    apps: tuple[Any, str, str, str],
) -> None:
    app, base, plain_base, name = apps
    warm(base, name)
    lane = find_fast_lane(app)
    assert lane is not None
    plane = app.state.dataplane
    batcher = plane.models.state(name).served.batcher
    merged_before = batcher.merged
    requests_before = plane.metrics.version(name, "1").requests.get()
    rng = np.random.default_rng(11)
    sent: dict[str, list[list[float]]] = {}
    answered: dict[str, list[list[float]]] = {}
    rounds = 0
    # Whether requests are read in one loop iteration is up to the kernel and the scheduler: bursts
    # until some were merged (the first burst nearly always is; on two cores busy with another test
    # worker, it can take dozens).
    while rounds < 3 or (batcher.merged == merged_before and rounds < 200):
        bodies: list[tuple[str, bytes]] = []
        for index in range(12):
            rows = rng.normal(size=(1 + index % 3, 4)).round(4).tolist()
            request_id = f"merge-{rounds}-{index}"
            sent[request_id] = rows
            bodies.append((request_id, json.dumps({"inputs": rows}).encode()))
        # Refusals in the same burst stay with their request: a row of the wrong width, no rows.
        bodies.append((f"bad-width-{rounds}", b'{"inputs": [[1.5, 2.5]]}'))
        bodies.append((f"no-rows-{rounds}", b'{"inputs": []}'))
        answers = burst(base, name, bodies)
        for (request_id, _), (status, headers, body) in zip(bodies, answers, strict=True):
            if request_id.startswith("bad-width"):
                assert status == 422 and "features" in json.loads(body)["error"]["message"]
            elif request_id.startswith("no-rows"):
                assert status == 422
            else:
                assert status == 200 and headers["x-model-version"] == "1", body
                answered[request_id] = json.loads(body)["outputs"]
        rounds += 1
    assert batcher.merged > merged_before, "no two requests arrived in one loop iteration in 200 bursts"

    # Every answer is the one the plain app gives that request's rows alone.
    with httpx.Client(headers=VIEWER) as client:
        for request_id, rows in sent.items():
            alone = client.post(f"{plain_base}/v1/models/{name}/predict", json={"inputs": rows}).json()
            np.testing.assert_allclose(answered[request_id], alone["outputs"], rtol=1e-5, atol=1e-6)
    assert plane.metrics.version(name, "1").requests.get() - requests_before == len(sent)

    # Each request has its own record: its id, its rows, its outputs, once.
    wait_for(lambda: plane.prediction_log.pending() == 0, timeout=30, what="the log shipped")
    database = Database(plane.settings.platform.database_url)
    try:
        with database.session() as session:
            records = list(session.scalars(
                select(PredictionRecord).where(PredictionRecord.request_id.like("merge-%"))))
    finally:
        database.dispose()
    assert sorted(r.request_id for r in records) == sorted(sent)
    for record in records:
        assert record.model == name and record.version == "1" and record.role == "production"
        np.testing.assert_allclose(record.inputs, sent[record.request_id], rtol=1e-6)
        np.testing.assert_allclose(record.outputs, answered[record.request_id], rtol=1e-6)
        assert record.latency_ms > 0
