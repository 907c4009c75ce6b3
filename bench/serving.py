"""Serving throughput and latency: Shipyard's endpoints against ``mlflow models serve`` and a bare ASGI app.

Run from the repository root:  .venv/bin/python bench/serving.py [--help]   (needs ``wrk``)

For each model (``--models``) and each number of connections (``--connections``), ``wrk`` sends
single-row POSTs for ``--duration`` seconds to each target, one after the other (``--repeat``
rounds of all of them; each target's median round counts), and the script prints requests/s and
p50/p99 latency as a markdown table, each also as a ratio against the bare reference with 1
worker measured in the same run (``ref1``). It ends by counting each Shipyard instance's
prediction log against the requests wrk saw answered. Targets (``--targets``):

- ``shipyard``: ``POST /v1/models/{name}/predict`` of the real serving service
  (``python -m services.serving``, 1 worker process, batching on: the defaults), reading the
  model's ``production`` alias from a real MLflow server (SQLite) under a temporary folder, with
  its own SQLite database; auth, validation, metrics and the prediction log on, as by default.
- ``shipyard2``: the same, a second instance with ``SHIPYARD_SERVING_WORKERS=2`` (two worker
  processes), to compare with ``ref2``.
- ``nobatch``: the same, a third instance with ``SHIPYARD_SERVING_BATCHING=false`` (1 worker): the
  batching goal compares ``shipyard`` with it on ``big``.
- ``pglog`` (only when named): the same, 1 worker, with its prediction log (and its other tables)
  in a PostgreSQL database made for the run on ``--pg-url``'s server and dropped at the end.
- ``bound`` (only when named): the same, 1 worker, with its prediction log, metrics, input checks and
  token check replaced by no-ops (``bench/serving_without.py``): a bound on what they cost a request,
  not a way to run serving (its answers are not logged, so the log count leaves it out).
- ``v2``: the same service's Open Inference Protocol ``POST /v2/models/{name}/infer``, if it
  answers; "not available" otherwise. ``v2bin``: the same with the input as a binary tensor
  (``Inference-Header-Content-Length``). ``tf``: TF Serving's REST ``POST /v1/models/{name}:predict``
  with ``{"instances": [row]}``.
- ``mlflow``: ``mlflow models serve --env-manager local`` (its default: 1 uvicorn worker) on the
  same ONNX file saved with ``mlflow.onnx.save_model`` (pyfunc flavour), body ``{"inputs": [[...]]}``.
- ``ref1`` / ``ref2``: ``bench/serving_reference.py``, a raw ASGI app (orjson, one ONNX Runtime
  session with serving's session options) under uvicorn with 1 and 2 worker processes.

Also printed: the in-process ONNX Runtime rate for one row (``session.run`` in a loop, ~2 s), the
ceiling for any server. wrk runs on the same machine as the servers and takes CPU from them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform as host_platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

from serving_models import MODELS, export, in_process_rate  # noqa: E402

ALL_TARGETS = ("shipyard", "v2", "v2bin", "tf", "shipyard2", "nobatch", "pglog", "bound", "mlflow", "ref1",
               "ref2")
# pglog needs a PostgreSQL server, bound is a measurement of what features cost: only when asked for.
DEFAULT_TARGETS = tuple(t for t in ALL_TARGETS if t not in ("pglog", "bound"))
# Extra serving instances: target → (label, environment on top of the default instance's).
EXTRA_SERVING = {
    "shipyard2": ("Shipyard /v1 predict (2w)", {"SHIPYARD_SERVING_WORKERS": "2"}),
    "nobatch": ("Shipyard /v1 predict, batching off (1w)", {"SHIPYARD_SERVING_BATCHING": "false"}),
    "pglog": ("Shipyard /v1 predict, log on PostgreSQL (1w)", {}),
    "bound": ("Shipyard /v1 predict, no log, metrics, validation or auth (1w)",
              {"BENCH_WITHOUT": "log,metrics,validation,auth"}),
}
# The bound instance runs serving with those features as no-ops (bench/serving_without.py).
UNLOGGED = frozenset({"bound"})
TOKEN = "bench-viewer-token"
REGISTERED_PREFIX = "bench-serving"
# The goals of issue 4.
GOAL_VS_MLFLOW = 10.0
GOAL_VS_REF = 0.8
GOAL_P99_MS = 10.0
GOAL_BATCHING = 2.0


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int


@dataclass
class Target:
    key: str
    label: str
    url: str
    body: bytes
    headers: dict[str, str]
    workers: int
    unavailable: str | None = None


class Processes:
    """Every process this script starts, each in its own process group; all stopped at the end."""

    def __init__(self, log_dir: Path, *more_log_dirs: Path) -> None:
        self.log_dir = log_dir
        self.log_dirs = [log_dir, *more_log_dirs]  # Stack writes its logs under the state folder
        self.pids: list[tuple[str, int]] = []
        self.databases: list[tuple[str, str]] = []  # (admin URL, database name)

    def postgres_database(self, admin_url: str) -> str:
        """A new database on ``admin_url``'s server (dropped by :meth:`stop_all`): its SQLAlchemy URL."""
        import psycopg2

        name = f"shipyard_bench_{uuid.uuid4().hex[:10]}"
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            admin.close()
        self.databases.append((admin_url, name))
        return f"{admin_url.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append((name, process.pid))
        return process.pid

    def adopt(self, name: str, pid: int) -> None:
        self.pids.append((name, pid))

    def stop(self, pid: int) -> None:
        from shipyard_common.processes import stop_process_group

        stop_process_group(pid, timeout=10)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self.pids = [(n, p) for n, p in self.pids if p != pid]

    def stop_all(self) -> None:
        for _, pid in reversed(list(self.pids)):
            with contextlib.suppress(Exception):
                self.stop(pid)
        for admin_url, name in self.databases:
            import psycopg2

            with contextlib.suppress(Exception):
                admin = psycopg2.connect(admin_url)
                admin.autocommit = True
                with admin.cursor() as cursor:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin.close()
        self.databases = []

    def alive(self, pid: int) -> bool:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return False
        return True

    def tail(self, name: str, lines: int = 25) -> str:
        for folder in self.log_dirs:
            with contextlib.suppress(OSError):
                return "\n".join((folder / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


def wait_until(check: Any, *, timeout: float, what: str, procs: Processes | None = None,
               pid: int | None = None, name: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None and pid is not None and not procs.alive(pid):
            raise RuntimeError(f"{name} exited while starting:\n{procs.tail(name)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    tail = procs.tail(name) if procs is not None and name else ""
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    import httpx

    response = httpx.post(url, content=body, headers=headers, timeout=60)
    return response.status_code, response.text


# -- wrk -------------------------------------------------------------------------------------------
LUA = """wrk.method = "POST"
local body_file = assert(io.open("{body_path}", "rb"))
wrk.body = body_file:read("*a")
body_file:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(target: Target, connections: int, duration: float, lua_dir: Path) -> Result:
    lua_dir.mkdir(parents=True, exist_ok=True)
    script = lua_dir / f"{target.key}.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items())
    body_path = lua_dir / f"{target.key}.body"
    body_path.write_bytes(target.body)
    script.write_text(LUA.format(body_path=body_path, headers=headers))
    argv = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{duration:g}s",
            "--timeout", "10s", "--latency", "-s", str(script), target.url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, duration_us, p50, p99, *errors = (float(v) for v in line.split()[1:])
    return Result(requests_per_s=requests / (duration_us / 1e6), p50_ms=p50 / 1000, p99_ms=p99 / 1000,
                  errors=int(sum(errors)), requests=int(requests))


# -- the parts -------------------------------------------------------------------------------------
def register(client: Any, name: str, onnx_path: Path) -> str:
    """Log ``onnx_path`` as ``onnx/model.onnx`` of a run, register it, point ``production`` at it."""
    from shipyard_common.lineage import ONNX_ARTIFACT_PATH, ONNX_FILE_NAME, PRODUCTION, TAG_FORMAT

    experiment = client.get_experiment_by_name("bench-serving")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("bench-serving")
    run_id = client.create_run(experiment_id).info.run_id
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(onnx_path, Path(folder) / ONNX_FILE_NAME)
        client.log_artifacts(run_id, folder, ONNX_ARTIFACT_PATH)
    client.set_terminated(run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{client.get_run(run_id).info.artifact_uri}/{ONNX_ARTIFACT_PATH}", run_id=run_id,
        tags={TAG_FORMAT: "onnx"},
    )
    client.set_registered_model_alias(name, PRODUCTION, version.version)
    return str(version.version)


def row_for(n_features: int) -> list[float]:
    values = np.random.default_rng(7).normal(size=n_features)
    return [round(float(v), 4) for v in values]


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,big", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--connections", default="1,8,32", help="comma list of wrk connection counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma list of {', '.join(ALL_TARGETS)}")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk per target and model first")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every target per connection count; the table shows each one's median")
    parser.add_argument("--redis-url",
                        default=os.environ.get("SHIPYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
                        help="serving follows alias events there (a channel of this run's own)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, models)")
    parser.add_argument("--pg-url", default=os.environ.get("SHIPYARD_BENCH_PG_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL server where pglog's database is made (and dropped)")
    args = parser.parse_args()

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    connections = [int(c) for c in args.connections.split(",") if c.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for key in models:
        if key not in MODELS:
            parser.error(f"unknown model {key!r}")
    for key in targets:
        if key not in ALL_TARGETS:
            parser.error(f"unknown target {key!r}")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt install wrk)")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Also when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-serving-"))
    procs = Processes(tmp / "logs", tmp / "state" / "logs")
    try:
        run(args, models, connections, targets, tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, models: list[str], connections: list[int], targets: list[str],
        tmp: Path, procs: Processes) -> None:
    import httpx
    from mlflow.tracking import MlflowClient

    from services.serving.settings import ServingSettings
    from shipyard_cli.stack import Stack
    from shipyard_common.processes import free_port
    from shipyard_common.settings import PlatformSettings, disable_telemetry

    disable_telemetry()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    serving_port = free_port()
    platform = PlatformSettings(
        env="test", state_dir=tmp / "state", redis_url=args.redis_url, tokens={TOKEN: "viewer"},
        log_json=False, log_level="WARNING", mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        serving_url=f"http://127.0.0.1:{serving_port}",
        events_channel=f"bench-serving-{uuid.uuid4().hex[:8]}",
    )
    serving_settings = ServingSettings(platform=platform)
    fields = set(type(serving_settings).model_fields)
    ort_threads = serving_settings.intra_op_threads
    batching = sorted(f for f in fields if "batching" in f or f.startswith(("batch_", "max_batch_delay")))
    shipyard_workers = int(getattr(serving_settings, "workers", 1))
    stack = Stack(platform)
    child_env = stack.child_env()
    child_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}"
    child_env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"

    print(f"# serving benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {os.cpu_count()} CPU cores ({host_platform.machine()}), wrk on the same cores; "
          f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"wrk: -t min(c,2) -c c -d {args.duration:g}s --latency, single-row POSTs; models {models}, "
          f"connections {connections}, targets {targets}")
    print(f"ONNX Runtime intra-op threads: {ort_threads} (serving's default, or 1 where serving chose 1 "
          "for a model at load; the references use the same session options and threads)")
    print(f"Shipyard serving workers: {shipyard_workers} (shipyard, nobatch), 2 (shipyard2)\n")

    # Models, exported like the trainer does.
    paths: dict[str, Path] = {}
    for key in models:
        started = time.perf_counter()
        paths[key] = export(key, tmp / "models" / key / "model.onnx")
        print(f"exported {key}: {MODELS[key].description}, {paths[key].stat().st_size / 1e6:.1f} MB "
              f"({time.perf_counter() - started:.1f} s)")

    # The threads serving chose per model at load (runtime_threads in its status); until serving
    # has answered, serving's configured number.
    threads = {key: ort_threads for key in models}

    # The platform: Redis (if none answers), MLflow, the serving service.
    names = {key: f"{REGISTERED_PREFIX}-{key}" for key in models}
    extra_urls: dict[str, str] = {}
    # Each extra instance's own database: SQLite in the run's folder, or (pglog) a PostgreSQL
    # database made for the run and dropped at the end.
    database_urls = {extra: f"sqlite:///{tmp / f'{extra}.db'}" for extra in EXTRA_SERVING}
    if "pglog" in targets:
        database_urls["pglog"] = procs.postgres_database(args.pg_url)
    if any(t in targets for t in ("shipyard", "v2", "v2bin", "tf", *EXTRA_SERVING)):
        redis_part = stack.redis_component()
        if redis_part is not None:
            procs.adopt("redis", stack.start_component(redis_part).pid)
        record = stack.start_component(stack.mlflow_component())
        procs.adopt("mlflow", record.pid)
        stack.wait_ready(record, timeout=120)
        uri = platform.mlflow_tracking_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for key in models:
            register(client, names[key], paths[key])
        record = stack.start_component(stack.service_component("serving"))
        procs.adopt("serving", record.pid)
        base = platform.serving_url
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def all_served() -> bool:
            if httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
                return False
            return all(httpx.get(f"{base}/v1/models/{names[k]}", headers=auth, timeout=5).json()["status"]
                       == "serving" for k in models)

        wait_until(all_served, timeout=180, what="serving ready with every model loaded", procs=procs,
                   pid=record.pid, name="serving")
        for key in models:
            status = httpx.get(f"{base}/v1/models/{names[key]}", headers=auth, timeout=5).json()
            threads[key] = int(status.get("runtime_threads") or ort_threads)
        # The extra instances: own port and database, same registry, token and models.
        for extra in targets:
            if extra not in EXTRA_SERVING:
                continue
            port = free_port()
            env = {**stack.child_env(), **EXTRA_SERVING[extra][1], "SHIPYARD_SERVING_PORT": str(port),
                   "SHIPYARD_DB_URL": database_urls[extra], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
            command = [sys.executable, str(BENCH_DIR / "serving_without.py")] if extra in UNLOGGED else [
                sys.executable, "-m", "services.serving"]
            pid = procs.start(extra, command, env)
            extra_urls[extra] = f"http://127.0.0.1:{port}"

            def extra_served(url: str = extra_urls[extra]) -> bool:
                if httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
                    return False
                return all(httpx.get(f"{url}/v1/models/{names[k]}", headers=auth, timeout=5).json()["status"]
                           == "serving" for k in models)

            wait_until(extra_served, timeout=180, what=f"{extra} ready with every model loaded", procs=procs,
                       pid=pid, name=extra)

    results: dict[tuple[str, str, int], Result | str] = {}
    # Requests each Shipyard instance answered (wrk's counts and the check requests), by its database.
    databases = {"shipyard": platform.database_url, "v2": platform.database_url,
                 "v2bin": platform.database_url, "tf": platform.database_url,
                 **{extra: database_urls[extra] for extra in extra_urls if extra not in UNLOGGED}}
    answered: dict[str, int] = dict.fromkeys(databases.values(), 0)

    def tally(target: Target, requests: int) -> None:
        if target.key in databases:
            answered[databases[target.key]] += requests

    for key in models:
        model = MODELS[key]
        row = row_for(model.n_features)
        per_model: list[Target] = []
        headers = {"Content-Type": "application/json"}
        if "shipyard" in targets:
            per_model.append(Target("shipyard", f"Shipyard /v1 predict ({shipyard_workers}w)",
                                    f"{platform.serving_url}/v1/models/{names[key]}/predict",
                                    json_body({"inputs": [row]}),
                                    {**headers, "Authorization": f"Bearer {TOKEN}"}, shipyard_workers))
        for extra, url in extra_urls.items():
            per_model.append(Target(extra, EXTRA_SERVING[extra][0], f"{url}/v1/models/{names[key]}/predict",
                                    json_body({"inputs": [row]}),
                                    {**headers, "Authorization": f"Bearer {TOKEN}"},
                                    2 if extra == "shipyard2" else 1))
        if "v2" in targets:
            tensor = {"name": "input", "shape": [1, model.n_features], "datatype": "FP32", "data": row}
            body = {"inputs": [tensor]}
            per_model.append(Target("v2", f"Shipyard /v2 infer ({shipyard_workers}w)",
                                    f"{platform.serving_url}/v2/models/{names[key]}/infer", json_body(body),
                                    {**headers, "Authorization": f"Bearer {TOKEN}"}, shipyard_workers))
        if "v2bin" in targets:
            import numpy as np

            raw = np.asarray([row], dtype="<f4").tobytes()
            tensor_head = {"name": "input", "shape": [1, model.n_features], "datatype": "FP32",
                           "parameters": {"binary_data_size": len(raw)}}
            header = json_body({"inputs": [tensor_head]})
            per_model.append(Target("v2bin", f"Shipyard /v2 infer, binary tensor ({shipyard_workers}w)",
                                    f"{platform.serving_url}/v2/models/{names[key]}/infer", header + raw,
                                    {"Content-Type": "application/octet-stream",
                                     "Inference-Header-Content-Length": str(len(header)),
                                     "Authorization": f"Bearer {TOKEN}"}, shipyard_workers))
        if "tf" in targets:
            per_model.append(Target("tf", f"Shipyard TF Serving REST :predict ({shipyard_workers}w)",
                                    f"{platform.serving_url}/v1/models/{names[key]}:predict",
                                    json_body({"instances": [row]}),
                                    {**headers, "Authorization": f"Bearer {TOKEN}"}, shipyard_workers))
        started_here: list[int] = []
        try:
            if "mlflow" in targets:
                import mlflow.onnx
                import onnx

                folder = tmp / "mlflow-models" / key
                if not folder.exists():
                    mlflow.onnx.save_model(onnx.load(str(paths[key])), str(folder))
                port = free_port()
                name = f"mlflow-serve-{key}"
                pid = procs.start(name, [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                         str(folder), "--env-manager", "local", "-p", str(port)], child_env)
                started_here.append(pid)
                url = f"http://127.0.0.1:{port}"
                wait_until(lambda url=url: httpx.get(f"{url}/ping", timeout=5).status_code == 200,
                           timeout=120, what="mlflow models serve", procs=procs, pid=pid, name=name)
                per_model.append(Target("mlflow", "mlflow models serve (1w)", f"{url}/invocations",
                                        json_body({"inputs": [row]}), headers, 1))
            for workers in (1, 2):
                if f"ref{workers}" not in targets:
                    continue
                port = free_port()
                name = f"ref{workers}-{key}"
                env = {**child_env, "BENCH_MODEL_PATH": str(paths[key]),
                       "BENCH_ORT_THREADS": str(threads[key])}
                pid = procs.start(name, [sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR),
                                         "serving_reference:app", "--host", "127.0.0.1", "--port", str(port),
                                         "--workers", str(workers), "--lifespan", "off", "--no-access-log",
                                         "--log-level", "warning"], env)
                started_here.append(pid)
                url = f"http://127.0.0.1:{port}/"
                body = json_body({"inputs": [row]})
                wait_until(lambda url=url, body=body, headers=headers: post(url, body, headers)[0] == 200,
                           timeout=120,
                           what=f"reference server ({workers} workers)", procs=procs, pid=pid, name=name)
                per_model.append(Target(f"ref{workers}", f"bare ASGI reference ({workers}w)", url, body,
                                        headers, workers))

            # Each must answer 200 once before it is timed.
            for target in per_model:
                status, text = post(target.url, target.body, target.headers)
                if status != 200:
                    target.unavailable = "not available" if status == 404 else f"failed: HTTP {status}"
                    print(f"{key} {target.key}: HTTP {status} {text[:200]}")
                else:
                    tally(target, 1)
            for target in per_model:
                if target.unavailable is None and args.warmup > 0:
                    tally(target, run_wrk(target, max(connections), args.warmup, tmp / "lua").requests)
            for c in connections:
                # Rounds of every target in turn, so that a slow spell of this shared machine
                # hits all of them; each target's median round (by req/s) is its figure.
                rounds: dict[str, list[Result]] = {target.key: [] for target in per_model}
                for _ in range(args.repeat):
                    for target in per_model:
                        if target.unavailable is not None:
                            results[(key, target.key, c)] = target.unavailable
                            continue
                        result = run_wrk(target, c, args.duration, tmp / "lua")
                        tally(target, result.requests)
                        rounds[target.key].append(result)
                        print(f"{key:>4} c={c:<3} {target.key:<9} {result.requests_per_s:>9,.0f} req/s  "
                              f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                              f"errors {result.errors}", flush=True)
                for target_key, found in rounds.items():
                    if found:
                        found.sort(key=lambda r: r.requests_per_s)
                        median = found[len(found) // 2]
                        median.errors = sum(r.errors for r in found)
                        results[(key, target_key, c)] = median
        finally:
            for pid in started_here:
                procs.stop(pid)
        labels = {t.key: t.label for t in per_model}
        results[(key, "_labels", 0)] = json.dumps(labels)

    rates = {key: in_process_rate(paths[key], MODELS[key].n_features, threads[key]) for key in models}
    print_table(results, models, connections, targets, rates, threads, batching, args)
    check_prediction_logs(answered)


def check_prediction_logs(answered: dict[str, int]) -> bool:
    """Every answered request must be in its instance's prediction log: print rows against answers.

    wrk counts the requests answered before its run ended; the server also answered those in flight
    then (up to one per connection per run), so the log may hold a few more, never fewer.
    """
    from sqlalchemy import func, select

    from shipyard_common.db import Database
    from shipyard_common.records import PredictionRecord

    complete = True
    for url, count in answered.items():
        if not count:
            continue
        database = Database(url)
        try:
            deadline = time.monotonic() + 120
            while True:
                with database.session() as session:
                    rows = session.scalar(select(func.count()).select_from(PredictionRecord)) or 0
                if rows >= count or time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            database.dispose()
        verdict = "every answered request logged" if rows >= count else f"**{count - rows:,} MISSING**"
        complete = complete and rows >= count
        print(f"- prediction log ({url.rsplit('/', 1)[-1]}): {rows:,} rows for {count:,} requests "
              f"wrk counted answered: {verdict}")
    return complete


def print_table(results: dict[tuple[str, str, int], Any], models: list[str], connections: list[int],
                targets: list[str], rates: dict[str, float], threads: dict[str, int], batching: list[str],
                args: argparse.Namespace) -> None:
    print("\n| model | target | conns | req/s | p50 ms | p99 ms | req/s ÷ ref1 | p50 ÷ ref1 | p99 ÷ ref1 "
          "| errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in models:
        labels = json.loads(results.get((key, "_labels", 0), "{}"))
        for c in connections:
            ref = results.get((key, "ref1", c))
            ref = ref if isinstance(ref, Result) else None
            for target in targets:
                result = results.get((key, target, c))
                label = labels.get(target, target)
                if result is None:
                    continue
                if isinstance(result, str):
                    print(f"| {key} | {label} | {c} | {result} | | | | | | |")
                    continue
                ratios = (None, None, None) if ref is None else (
                    result.requests_per_s / ref.requests_per_s, result.p50_ms / ref.p50_ms,
                    result.p99_ms / ref.p99_ms)
                print(f"| {key} | {label} | {c} | {result.requests_per_s:,.0f} | {result.p50_ms:.2f} | "
                      f"{result.p99_ms:.2f} | {fmt_ratio(ratios[0])} | {fmt_ratio(ratios[1])} | "
                      f"{fmt_ratio(ratios[2])} | {result.errors} |")
    print()
    for key in models:
        print(f"- in-process ONNX Runtime, one row per `session.run`, {threads[key]} intra-op threads: "
              f"{key} **{rates[key]:,.0f} rows/s**")

    print("\nGoals (issue 4), MLP at the largest connection count:")
    c = max(connections)
    mine, ml, r1, r2 = (results.get(("mlp", t, c)) for t in ("shipyard", "mlflow", "ref1", "ref2"))

    def check(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        shown = "not measured" if value is None else f"{value:.2f}"
        verdict = "" if ok is None else (" — met" if ok else " — **missed**")
        print(f"- {name}: {shown} (goal {goal}){verdict}")

    have = isinstance(mine, Result)
    ratio = mine.requests_per_s / ml.requests_per_s if have and isinstance(ml, Result) else None
    check(f"Shipyard ÷ mlflow serve, req/s at c={c}", ratio, f"≥ {GOAL_VS_MLFLOW:g}×",
          None if ratio is None else ratio >= GOAL_VS_MLFLOW)
    ratio = mine.requests_per_s / r1.requests_per_s if have and isinstance(r1, Result) else None
    check(f"Shipyard (1 worker) ÷ bare reference (1 worker), req/s at c={c}", ratio, f"≥ {GOAL_VS_REF:g}",
          None if ratio is None else ratio >= GOAL_VS_REF)
    mine2 = results.get(("mlp", "shipyard2", c))
    ratio = (mine2.requests_per_s / r2.requests_per_s
             if isinstance(mine2, Result) and isinstance(r2, Result) else None)
    check(f"Shipyard (2 workers) ÷ bare reference (2 workers), req/s at c={c}", ratio, f"≥ {GOAL_VS_REF:g}",
          None if ratio is None else ratio >= GOAL_VS_REF)
    ratio = mine2.requests_per_s / ml.requests_per_s if isinstance(mine2, Result) and isinstance(ml, Result) \
        else None
    check(f"Shipyard (2 workers) ÷ mlflow serve (its default 1 worker), req/s at c={c}", ratio, "information",
          None)
    p99 = mine.p99_ms if have else None
    check(f"Shipyard p99 at c={c}, ms", p99, f"< {GOAL_P99_MS:g} ms",
          None if p99 is None else p99 < GOAL_P99_MS)
    p99 = mine2.p99_ms if isinstance(mine2, Result) else None
    check(f"Shipyard (2 workers) p99 at c={c}, ms", p99, f"< {GOAL_P99_MS:g} ms",
          None if p99 is None else p99 < GOAL_P99_MS)
    on, off = results.get(("big", "shipyard", c)), results.get(("big", "nobatch", c))
    ratio = on.requests_per_s / off.requests_per_s if isinstance(on, Result) and isinstance(off, Result) \
        else None
    check(f"batching on ÷ off on `big`, req/s at c={c} (settings {batching})", ratio, f"≥ {GOAL_BATCHING:g}×",
          None if ratio is None else ratio >= GOAL_BATCHING)
    print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("command: .venv/bin/python bench/serving.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
