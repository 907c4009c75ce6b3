"""Serving soak: half its measured peak for minutes on end; errors, p99 and memory over time.

Run from the repository root:  .venv/bin/python bench/soak.py [--minutes 10] [--connections 32]

It starts MLflow and Shipyard serving on its defaults (auth, validation, metrics, the prediction log
on SQLite) with the MLP of ``bench/serving.py``, measures the peak with wrk at ``--connections``,
then drives serving at ``--fraction`` (0.5) of that peak for ``--minutes``, in slices of
``--slice`` seconds: wrk's ``delay()`` spaces each connection's requests, calibrated to the target
rate. After every slice it records the rate, p50/p99, wrk's errors and the resident memory of
serving's process and of its prediction-log shipper. At the end every request wrk saw answered
must be in the prediction log.

Verdict (printed, and the exit status): no errors; p99 stable (the median p99 of the last third of
the slices at most 1.5 times the first third's, or under 10 ms); resident memory flat (the last
slice's at most 10 % above the third slice's, once the warm-up has grown it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from serving import (  # noqa: E402
    REGISTERED_PREFIX,
    TOKEN,
    Processes,
    Result,
    Target,
    check_prediction_logs,
    json_body,
    register,
    row_for,
    run_wrk,
    wait_until,
)
from serving_models import export  # noqa: E402

#: Spaces each connection's requests by ``DELAY_MS`` (rewritten per run) after each answer.
DELAY_LUA = "\nfunction delay()\n  return {delay_ms}\nend\n"
#: Requests wrk saw answered over every run (each must be in the prediction log).
ANSWERED = [0]


def wrk(
    target: Target, connections: int, seconds: float, lua_dir: Path, delay_ms: float | None = None
) -> Result:
    """wrk at ``connections``; ``delay_ms``: the wait between a connection's answer and its next request."""
    import serving

    original = serving.LUA
    if delay_ms is not None:
        serving.LUA = original + DELAY_LUA.format(delay_ms=f"{delay_ms:.3f}")
    try:
        result = run_wrk(target, connections, seconds, lua_dir)
    finally:
        serving.LUA = original
    ANSWERED[0] += result.requests
    return result


def resident_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().split(")")[-1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def calibrate(target: Target, connections: int, rate: float, lua_dir: Path) -> float:
    """The per-connection delay (ms) that brings wrk near ``rate`` requests a second."""
    delay_ms = connections / rate * 1000
    for _ in range(3):
        got = wrk(target, connections, 5, lua_dir, delay_ms).requests_per_s
        delay_ms = max(0.0, delay_ms * got / rate)  # more requests than wanted: wait longer
    return delay_ms


def start_serving(tmp: Path, procs: Processes, redis_url: str) -> tuple[str, int, str]:
    """MLflow, the MLP registered as production, serving: (base URL, serving's pid, its database URL)."""
    import httpx
    from mlflow.tracking import MlflowClient

    from shipyard_cli.stack import Stack, free_port
    from shipyard_common.settings import PlatformSettings, disable_telemetry

    disable_telemetry()
    platform = PlatformSettings(
        env="test", state_dir=tmp / "state", redis_url=redis_url, tokens={TOKEN: "viewer"}, log_json=False,
        log_level="WARNING", mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        serving_url=f"http://127.0.0.1:{free_port()}", events_channel=f"bench-soak-{os.getpid()}",
    )
    stack = Stack(platform)
    record = stack.start_component(stack.mlflow_component())
    procs.adopt("mlflow", record.pid)
    stack.wait_ready(record, timeout=120)
    uri = platform.mlflow_tracking_uri
    name = f"{REGISTERED_PREFIX}-mlp"
    register(MlflowClient(tracking_uri=uri, registry_uri=uri), name, export("mlp", tmp / "mlp.onnx"))
    record = stack.start_component(stack.service_component("serving"))
    procs.adopt("serving", record.pid)
    base = platform.serving_url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wait_until(lambda: httpx.get(f"{base}/v1/models/{name}", headers=auth, timeout=5).json()["status"]
               == "serving", timeout=180, what="serving the MLP", procs=procs, pid=record.pid, name="serving")
    return base, record.pid, platform.database_url


def soak(args: argparse.Namespace, tmp: Path, procs: Processes) -> bool:
    base, pid, database_url = start_serving(tmp, procs, args.redis_url)
    target = Target("soak", "Shipyard /v1 predict", f"{base}/v1/models/{REGISTERED_PREFIX}-mlp/predict",
                    json_body({"inputs": [row_for(64)]}),
                    {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, 1)
    lua = tmp / "lua"
    wrk(target, args.connections, 3, lua)  # warm-up
    peak = wrk(target, args.connections, 10, lua)
    rate = peak.requests_per_s * args.fraction
    delay_ms = calibrate(target, args.connections, rate, lua)
    print(f"# serving soak — {time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"peak at {args.connections} connections: {peak.requests_per_s:,.0f} req/s (p99 "
          f"{peak.p99_ms:.2f} ms); target {rate:,.0f} req/s ({args.fraction:g} of it): {delay_ms:.2f} ms "
          "between a connection's requests\n")
    print("| slice | minutes | req/s | p50 ms | p99 ms | errors | serving RSS MB | shipper RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    slices = []
    started = time.monotonic()
    for index in range(max(1, int(args.minutes * 60 / args.slice))):
        result = wrk(target, args.connections, args.slice, lua, delay_ms)
        shipper = sum(resident_mb(child) for child in children(pid))
        slices.append((result, resident_mb(pid), shipper))
        print(f"| {index + 1} | {(time.monotonic() - started) / 60:.1f} | {result.requests_per_s:,.0f} | "
              f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | {slices[-1][1]:.0f} | "
              f"{shipper:.0f} |", flush=True)
    logged = check_prediction_logs({database_url: ANSWERED[0]})  # prints rows against requests answered
    return verdict(slices) and logged


def verdict(slices: list[tuple[Result, float, float]]) -> bool:
    third = max(1, len(slices) // 3)
    first = statistics.median(s[0].p99_ms for s in slices[:third])
    last = statistics.median(s[0].p99_ms for s in slices[-third:])
    errors = sum(s[0].errors for s in slices)
    settled = slices[min(2, len(slices) - 1)][1]
    growth = slices[-1][1] / settled - 1 if settled else 0.0
    checks: list[tuple[str, bool]] = [
        (f"errors: {errors}", errors == 0),
        (f"p99: first third's median {first:.2f} ms, last third's {last:.2f} ms",
         last <= 1.5 * first or last < 10),
        (f"serving's resident memory: {settled:.0f} MB after the warm-up slices, {slices[-1][1]:.0f} MB "
         f"at the end ({growth:+.1%})", growth <= 0.10),
    ]
    print()
    for text, passed in checks:
        print(f"- {text}: {'ok' if passed else '**FAILED**'}")
    return all(passed for _, passed in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured peak")
    parser.add_argument("--slice", type=float, default=30.0, help="seconds of wrk per recorded slice")
    parser.add_argument("--redis-url",
                        default=os.environ.get("SHIPYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt install wrk)")
    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so that the servers it started are stopped too

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-soak-"))
    procs = Processes(tmp / "logs", tmp / "state" / "logs")
    ok = False
    try:
        ok = soak(args, tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
