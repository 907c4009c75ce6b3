"""Trainer soak: ``--jobs`` tiny jobs queued at once, worked off by ``--workers`` workers; every job done
once, the API's latency and everyone's memory over time.

Run from the repository root:  .venv/bin/python bench/trainer_soak.py [--jobs 1000] [--workers 2]

Real parts, as ``bench/job_latency.py`` starts them: the Redis server at ``--redis-url`` (a queue prefix
of this run's own), an MLflow server, the trainer API (``python -m services.trainer``) and ``--workers``
worker processes (``python -m services.trainer.worker``, concurrency 1), a SQLite database and DVC data
under a temporary folder. The jobs are one-epoch MLPs on breast_cancer, all registering versions of one
model, posted as fast as the API takes them. Every ``--slice`` seconds, while they run, it records the
jobs by state, the API's p50/p99 for ``GET /jobs/{id}`` and ``GET /jobs`` (a client polling, as the
CLI's ``jobs watch`` does) and the resident memory of the API and of each worker (with its pool child).

Verdict (printed, and the exit status): every job succeeded, once (one attempt each, no job without a
version, each version registered once: MLflow holds exactly ``--jobs`` versions of the model); the API's
p99 stable (the median p99 of the last third of the slices at most 1.5 times the first third's, or under
50 ms); its resident memory flat (the last slice at most 10 % above the third's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from soak import children, resident_mb  # noqa: E402

MODEL = "soak"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slice", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--redis-url", default=os.environ.get("SHIPYARD_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/12"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    return parser.parse_args()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def sample_api(http: Any, job_ids: list[str], rounds: int = 20) -> list[float]:
    """``rounds`` GETs of one job and of the job list, timed (seconds)."""
    times = []
    for i in range(rounds):
        for path in (f"/jobs/{job_ids[i * 7919 % len(job_ids)]}", "/jobs?limit=50"):
            started = time.perf_counter()
            http.get(path).raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def memory(pid: int) -> float:
    """Resident MB of ``pid`` and its children (a worker's pool process)."""
    return resident_mb(pid) + sum(resident_mb(child) for child in children(pid))


def submit(http: Any, rev: str, jobs: int) -> tuple[list[str], list[float]]:
    spec = {"model_name": MODEL, "model": {"type": "mlp", "hidden": [8]},
            "data": {"dataset": "breast_cancer", "rev": rev, "task": "classification", "target": "target"},
            "training": {"epochs": 1, "batch_size": 64}}
    ids, times = [], []
    for _ in range(jobs):
        started = time.perf_counter()
        answer = http.post("/jobs", json=spec)
        times.append(time.perf_counter() - started)
        answer.raise_for_status()
        ids.append(answer.json()["id"])
    return ids, times


def states(http: Any) -> Counter[str]:
    counted: Counter[str] = Counter()
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        counted[state] = len(http.get("/jobs", params={"state": state, "limit": 1000}).json())
    return counted


def attempts(database_url: str, job_ids: list[str]) -> Counter[int]:
    """How many times each job was started (the job table's ``attempts``; the API does not show it)."""
    from sqlalchemy import select

    from services.trainer.jobs.tables import JobRecord
    from shipyard_common.db import Database

    database = Database(database_url)
    try:
        with database.session() as session:
            found = session.execute(select(JobRecord.id, JobRecord.attempts)).all()
    finally:
        database.dispose()
    wanted = set(job_ids)
    return Counter(count for job_id, count in found if job_id in wanted)


def verdict(
    slices: list[dict[str, Any]], jobs: list[dict[str, Any]], started: Counter[int], versions: int,
    expected: int,
) -> bool:
    done = Counter(job["state"] for job in jobs)
    once = started == Counter({1: expected})
    distinct = len({job["model_version"] for job in jobs if job["model_version"]})
    print(f"jobs by final state: {dict(done)}; attempts: {dict(started)}; distinct versions: {distinct}; "
          f"versions in MLflow: {versions} (expected {expected})")
    third = max(1, len(slices) // 3)
    first = statistics.median(s["p99_ms"] for s in slices[:third])
    last = statistics.median(s["p99_ms"] for s in slices[-third:])
    stable = last <= max(1.5 * first, 50.0)
    base = slices[min(2, len(slices) - 1)]["api_mb"]
    flat = slices[-1]["api_mb"] <= 1.10 * base
    print(f"API p99: first third {first:.1f} ms, last third {last:.1f} ms -> "
          f"{'stable' if stable else 'NOT stable'}; API memory {base:.0f} -> {slices[-1]['api_mb']:.0f} MB "
          f"-> {'flat' if flat else 'NOT flat'}")
    ok = done["succeeded"] == expected and once and distinct == expected == versions and stable and flat
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    args = parse()
    import httpx
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_breast_cancer

    from shipyard_cli.processes import Component, redis_answers
    from shipyard_cli.stack import Stack
    from shipyard_common.datasets import DataRepo
    from shipyard_common.processes import free_port, stop_process_group
    from shipyard_common.settings import PlatformSettings, disable_telemetry

    disable_telemetry()
    if not redis_answers(args.redis_url):
        sys.exit(f"no Redis answers at {args.redis_url} (--redis-url)")
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-trainer-soak-"))
    token = "bench-trainer-token"
    platform = PlatformSettings(
        env="test", state_dir=tmp, redis_url=args.redis_url, tokens={token: "trainer"}, log_json=False,
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}", trainer_url=f"http://127.0.0.1:{free_port()}",
    )
    prefix = f"soak-{uuid.uuid4().hex[:8]}-"
    stack = Stack(platform, extra_env={"SHIPYARD_TRAINER_QUEUE_PREFIX": prefix})
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "breast_cancer", load_breast_cancer(as_frame=True).frame).rev
    worker = [sys.executable, "-m", "services.trainer.worker", "--queues", "cpu", "--concurrency", "1"]
    records = []
    ok = False
    try:
        for component in (stack.mlflow_component(), stack.service_component("trainer"),
                          *(Component(f"worker-{i}", worker) for i in range(args.workers))):
            records.append(stack.start_component(component))
        for record in records:
            stack.wait_ready(record, timeout=180)
        api_pid, worker_pids = records[1].pid, [r.pid for r in records[2:]]
        http = httpx.Client(base_url=platform.trainer_url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})
        started = time.monotonic()
        ids, posts = submit(http, rev, args.jobs)
        print(f"{args.jobs} jobs posted in {time.monotonic() - started:.1f}s: POST p50 "
              f"{percentile(posts, 0.5) * 1000:.1f} ms, p99 {percentile(posts, 0.99) * 1000:.1f} ms",
              flush=True)
        slices: list[dict[str, Any]] = []
        while time.monotonic() - started < args.timeout:
            counted = states(http)
            times = sample_api(http, ids)
            slices.append({"t": time.monotonic() - started, "p50_ms": percentile(times, 0.5) * 1000,
                           "p99_ms": percentile(times, 0.99) * 1000, "api_mb": memory(api_pid),
                           "workers_mb": [round(memory(pid)) for pid in worker_pids], **counted})
            s = slices[-1]
            print(f"{s['t']:7.0f}s queued {s['queued']:5d} running {s['running']:2d} succeeded "
                  f"{s['succeeded']:5d} failed {s['failed']:3d} | GET p50 {s['p50_ms']:6.1f} ms p99 "
                  f"{s['p99_ms']:6.1f} ms | API {s['api_mb']:.0f} MB, workers {s['workers_mb']} MB",
                  flush=True)
            if counted["queued"] + counted["running"] == 0:
                break
            time.sleep(args.slice)
        jobs = [http.get(f"/jobs/{job_id}").json() for job_id in ids]
        uri = platform.mlflow_tracking_uri
        versions = len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
            f"name='{MODEL}'", max_results=100_000))
        print(f"wall {time.monotonic() - started:.0f}s for {args.jobs} jobs on {args.workers} workers")
        ok = verdict(slices, jobs, attempts(platform.database_url, ids), versions, args.jobs)
        http.close()
    finally:
        for record in reversed(records):
            stop_process_group(record.pid, timeout=10)
        if args.keep:
            print(f"logs: {stack.log_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
