"""Predictions answered inside uvicorn's HTTP protocol (services/serving/httpfast.py) keep HTTP/1.1's rules.

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

from services.serving.httpfast import find_fast_lane
from tests.services.serving.test_fastlane import ROWS, VIEWER

BODY = json.dumps({"inputs": ROWS}).encode()


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
