"""The prediction hot path in process, without sockets: Shipyard against the bare ASGI app.

Run from the repository root:  .venv/bin/python bench/serving_hotpath.py [--requests N] [--connections C]
[--profile]

Both servers are driven the way uvicorn drives them, minus the kernel: the raw bytes of a
single-row MLP predict request go into uvicorn's HTTP protocol object (``data_received``), whose
``httptools`` parser calls the app, and the response bytes come out of an in-memory transport;
one request after the other on one kept-alive connection, in one event loop (``--connections C``:
C connections whose requests are read in the same loop iteration, as under load, where serving
merges them):

- ``bare``: ``bench/serving_reference.py`` (orjson, one ONNX Runtime session) under uvicorn's
  own ``httptools`` protocol, what ``bench/serving.py`` calls the bare reference;
- ``shipyard``: serving's HTTP protocol (``fastlane/uvicorn_protocol.py``) with the fast lane and
  the real parts behind it: token check, the version's signature check, its batcher,
  metrics, and the prediction log (journal, shipper process, SQLite) — as
  ``python -m services.serving`` sets them up by default.

It prints microseconds per request for each and their ratio: the CPU the request path costs in
Python, with the kernel's share (the same for both, and the noisiest part of a wrk run on a
shared machine) left out. ``--profile`` prints a cProfile of the Shipyard loop; ``--clock cpu`` reads
this thread's CPU time instead of the wall clock, which other work on a busy machine inflates far less.
``--without log,metrics,validation,auth`` bounds what those features cost the request: it replaces
serving's own parts for them with no-ops in this process (a measurement, never a serving switch).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import os
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

from serving_models import export  # noqa: E402

TOKEN = "bench-viewer-token"


class _Transport:
    """An asyncio transport that keeps what is written (uvicorn's protocol writes responses to it)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _protocol(app: Any, protocol_class: Any) -> tuple[Any, _Transport]:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app, log_config=None, access_log=False, lifespan="off", http=protocol_class)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 23 Nov 2026 12:00:00 GMT"), *config.encoded_headers]
    protocol = config.http_protocol_class(config=config, server_state=state, app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


#: What a request's time is read from: the wall clock, or (``--clock cpu``) this thread's CPU time,
#: which a busy machine inflates far less (the model runs on this thread: one intra-op thread).
CLOCK = time.perf_counter


async def _drive(app: Any, protocol_class: Any, payload: bytes, requests: int) -> float:
    protocol, transport = _protocol(app, protocol_class)
    started = CLOCK()
    for _ in range(requests):
        protocol.data_received(payload)
        # One loop iteration per request, as a server's loop makes between reads (serving's
        # callbacks for the iteration's end run there); more while the ASGI path answers in a task.
        await asyncio.sleep(0)
        while not protocol.cycle.response_complete:
            await asyncio.sleep(0)
    elapsed = CLOCK() - started
    response = b"".join(transport.written[-2:])
    if b" 200 OK" not in response:
        raise SystemExit(f"the app answered: {response[:400]!r}")
    protocol.connection_lost(None)
    return elapsed / requests


async def _drive_many(
    app: Any, protocol_class: Any, payload: bytes, requests: int, connections: int
) -> float:
    """As :func:`_drive`, with ``connections`` kept-alive connections whose requests arrive together:
    each round, every connection's request is read in one loop iteration (as a server's loop reads
    every socket that became readable), then the loop runs until every one is answered."""
    pairs = [_protocol(app, protocol_class) for _ in range(connections)]
    rounds = max(1, requests // connections)
    started = CLOCK()
    for _ in range(rounds):
        for protocol, _transport in pairs:
            protocol.data_received(payload)
        await asyncio.sleep(0)
        while not all(protocol.cycle.response_complete for protocol, _ in pairs):
            await asyncio.sleep(0)
    elapsed = CLOCK() - started
    for protocol, transport in pairs:
        if b" 200 OK" not in b"".join(transport.written[-2:]):
            raise SystemExit(f"the app answered: {b''.join(transport.written[-2:])[:400]!r}")
        protocol.connection_lost(None)
    return elapsed / (rounds * connections)


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\n{extra}Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _shipyard_request(protocol: str, row: list[float]) -> bytes:
    """One single-row MLP request in ``protocol``: ours, OIP v2 JSON or binary, or TF Serving REST."""
    import numpy as np
    import orjson

    if protocol == "ours":
        return _request("/v1/models/mlp/predict", orjson.dumps({"inputs": [row]}))
    if protocol == "tf":
        return _request("/v1/models/mlp:predict", orjson.dumps({"instances": [row]}))
    tensor: dict[str, Any] = {"name": "input", "shape": [1, len(row)], "datatype": "FP32"}
    if protocol == "v2":
        return _request("/v2/models/mlp/infer", orjson.dumps({"inputs": [{**tensor, "data": row}]}))
    raw = np.asarray([row], dtype="<f4").tobytes()
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
    length = f"Inference-Header-Content-Length: {len(header)}\r\n"
    return _request("/v2/models/mlp/infer", header + raw, length)


class _LaneApp:
    """The ASGI app the fast lane fronts, reduced to the lane (the protocol finds it here)."""

    def __init__(self, lane: Any) -> None:
        self.middleware_stack = lane

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.middleware_stack(scope, receive, send)


def shipyard_lane(folder: Path, onnx_path: Path) -> tuple[Any, Any]:
    """The fast lane over real serving parts, and a function that closes them."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import CollectorRegistry

    from services.serving.core.dataplane import DataPlane
    from services.serving.core.loaded import LoadedModels, ServedModel
    from services.serving.core.metrics import ServingMetrics
    from services.serving.fastlane.lane import FastLane
    from services.serving.predlog.log import PredictionLog
    from services.serving.runtimes.loader import load_runtime
    from services.serving.settings import ServingSettings
    from shipyard_common.auth import Role, TokenAuthenticator
    from shipyard_common.db import Database
    from shipyard_common.metrics import HttpMetrics
    from shipyard_common.settings import PlatformSettings

    platform = PlatformSettings(env="test", state_dir=folder / "state", tokens={TOKEN: "viewer"})
    settings = ServingSettings(platform=platform)
    model_folder = folder / "model"
    (model_folder / "onnx").mkdir(parents=True)
    (model_folder / "onnx" / "model.onnx").write_bytes(onnx_path.read_bytes())
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    loaded = load_runtime(model_folder, name="mlp", version="1", tags={"shipyard.format": "onnx"},
                          settings=settings)
    print(f"Shipyard's ONNX Runtime session: {getattr(loaded.runtime, 'threads', '?')} intra-op thread(s)")
    models = LoadedModels(metrics)
    models.set_target("mlp", "1")
    models.install(ServedModel(name="mlp", version="1", runtime=loaded.runtime, signature=loaded.signature,
                               loaded_at=datetime.now(UTC), batching=settings.batching_for("mlp")))
    models.reconciled.set()
    database = Database(f"sqlite:///{folder / 'serving.db'}")
    database.create_tables()
    prediction_log = PredictionLog(
        database, capacity=settings.prediction_log_capacity, batch_size=settings.prediction_log_batch,
        flush_interval_s=settings.prediction_log_flush_s,
        journal_dir=folder / "journal",
    )
    prediction_log.start()
    executor = ThreadPoolExecutor(settings.request_threads)
    state = SimpleNamespace(
        dataplane=DataPlane(settings=settings, models=models, prediction_log=prediction_log, metrics=metrics,
                            executor=executor),
        authenticator=TokenAuthenticator({TOKEN: Role.VIEWER}),
        http_metrics=HttpMetrics(registry, "serving"),
    )

    async def not_here(scope: Any, receive: Any, send: Any) -> None:
        raise SystemExit(f"the fast lane handed {scope['path']} to the app")

    def close() -> None:
        executor.shutdown()
        prediction_log.close()
        print(f"prediction log: {prediction_log.written} rows written", file=sys.stderr)

    return FastLane(not_here, state=state, body_limit=settings.max_body_bytes), close


#: What ``--without`` can take out of the request path, for a measurement of what it costs.
FEATURES = ("log", "metrics", "validation", "auth")


def without(features: set[str]) -> None:
    """Replace serving's parts for ``features`` with no-ops in this process (measurement only).

    ``log``: nothing appended (the record is still built); ``metrics``: no counter, gauge or
    histogram updated; ``validation``: the JSON rows converted as the bare app does (one
    ``np.asarray``), unchecked; ``auth``: no token check. What is left is the request path's own
    work (routing, batcher, lease).
    """
    import numpy as np

    from services.serving.core import dataplane
    from services.serving.fastlane.lane import FastLane
    from services.serving.predlog.log import PredictionLog
    from shipyard_common import sharded

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    if "log" in features:
        PredictionLog.try_reserve = lambda self, count=1: True  # type: ignore[method-assign]
        PredictionLog.release = PredictionLog.append_reserved = nothing  # type: ignore[method-assign]
    if "metrics" in features:
        for part, verbs in ((sharded.ShardedCounter, ("inc",)), (sharded.ShardedGauge, ("inc", "dec")),
                            (sharded.ShardedHistogram, ("observe",))):
            for verb in verbs:
                setattr(part, verb, nothing)
        FastLane.count = nothing  # type: ignore[method-assign]
    if "validation" in features:
        dataplane.merge_json = (  # type: ignore[attr-defined]
            lambda tensors, spec, **kwargs: np.asarray(tensors[0].values, dtype=spec.dtype))
    if "auth" in features:
        FastLane._authorize = nothing  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of --requests each")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="the profile's order (a pstats key)")
    parser.add_argument("--lines", type=int, default=30, help="the profile's length")
    parser.add_argument("--connections", type=int, default=1,
                        help="connections whose requests arrive in the same loop iteration")
    parser.add_argument("--asgi", action="store_true",
                        help="Shipyard under uvicorn's own HTTP protocol (the ASGI lane), not serving's")
    parser.add_argument("--protocol", choices=("ours", "v2", "v2bin", "tf"), default="ours",
                        help="Shipyard's request: ours, OIP v2 JSON or binary, TF Serving REST")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this thread's CPU time (steadier on a busy machine)")
    parser.add_argument("--without", default="",
                        help=f"comma-separated features replaced by no-ops, to bound their cost: {FEATURES}")
    args = parser.parse_args()
    left_out = {name for name in args.without.split(",") if name}
    if left_out - set(FEATURES):
        parser.error(f"--without takes {FEATURES}, not {sorted(left_out - set(FEATURES))}")
    without(left_out)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter

    import numpy as np
    import orjson

    row = [round(float(v), 4) for v in np.random.default_rng(7).normal(size=64)]
    body = orjson.dumps({"inputs": [row]})
    with tempfile.TemporaryDirectory(prefix="shipyard-hotpath-") as tmp:
        folder = Path(tmp)
        onnx_path = export("mlp", folder / "mlp.onnx")
        os.environ["BENCH_MODEL_PATH"] = str(onnx_path)
        reference = importlib.import_module("serving_reference").app
        lane, close = shipyard_lane(folder, onnx_path)
        from services.serving.fastlane.uvicorn_protocol import FastLaneHttpProtocol

        # --asgi: the fast lane as a plain ASGI app under uvicorn's own protocol (a task per request).
        ours_app, ours_protocol = _LaneApp(lane), ("httptools" if args.asgi else FastLaneHttpProtocol)
        bare_protocol = "httptools"
        ours_request = _shipyard_request(args.protocol, row)
        bare_request = _request("/predict", body)
        import uvloop  # uvicorn's loop wherever it is installed, as it is with Shipyard

        loop = uvloop.new_event_loop()
        gc.collect()
        gc.freeze()  # as serving does (settings.gc_freeze)

        def run(app: Any, protocol: Any, payload: bytes, requests: int) -> float:
            if args.connections > 1:
                many = _drive_many(app, protocol, payload, requests, args.connections)
                return loop.run_until_complete(many)
            return loop.run_until_complete(_drive(app, protocol, payload, requests))

        try:
            run(ours_app, ours_protocol, ours_request, 2000)  # warm-up: the model's cost gets measured
            run(reference, bare_protocol, bare_request, 2000)
            ours = bare = float("inf")
            for _ in range(args.rounds):  # alternated, so that a noisy moment hits both
                ours = min(ours, run(ours_app, ours_protocol, ours_request, args.requests))
                bare = min(bare, run(reference, bare_protocol, bare_request, args.requests))
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                run(ours_app, ours_protocol, ours_request, args.requests)
                profiler.disable()
        finally:
            loop.close()
            close()
    print(f"bare ASGI app under uvicorn:          {bare * 1e6:7.1f} µs per request")
    print(f"Shipyard (fast lane in the protocol): {ours * 1e6:7.1f} µs per request")
    print(f"bare ÷ Shipyard, requests/s:          {bare / ours:7.2f}")
    if args.profile:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.lines)


if __name__ == "__main__":
    main()
