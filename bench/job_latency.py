"""Job start latency: from ``POST /jobs`` to the job's state being ``running``, on an idle worker.

Run from the repository root:  .venv/bin/python bench/job_latency.py [--help]

Real parts: the Redis server at ``--redis-url`` (a queue prefix of this run's own, nothing is
flushed), the trainer API as ``python -m services.trainer`` (uvicorn) on a free port, one
Celery worker process (prefork, concurrency 1, the trainer's own ``make_celery`` settings),
an MLflow server and a SQLite database under a temporary folder.

For each of ``--jobs`` jobs, one after another: wait until the worker is idle (no message of
ours held unacknowledged, the previous job ended), POST a tiny MLP job, then poll
``GET /jobs/{id}`` every ``--poll-ms`` until it reads ``running``. The figure is the client's
time from sending the POST to reading ``running`` (so it includes up to one poll interval and
one GET). With ``--cancel`` (default) the job is cancelled once running, so that the worker is
free again sooner; the latency measured is the same.

Baseline, measured in the same run and interleaved with the jobs: a bare Celery round-trip,
``send_task`` of a no-op task to the same worker process and ``AsyncResult.get()`` of its
result (Redis result backend). The ratio job/baseline is the platform's overhead over raw
Celery. The worker is started by this script (``worker`` sub-command) because the stock
``python -m services.trainer.worker`` has no no-op task and no result backend; apart from
those two additions it is the same app and the same worker arguments.

The first job and the first round-trip are a warm-up and are reported apart: the worker's
prefork child imports the training stack (torch, ...) on its first job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOOP_TASK = "shipyard.bench.noop"
TERMINAL = ("succeeded", "failed", "cancelled")


def bench_celery(settings: Any) -> Any:
    """The trainer's Celery app plus a no-op task whose result is kept (the baseline)."""
    from services.trainer.worker.celery_app import make_celery

    app = make_celery(settings)
    app.conf.update(result_backend=settings.platform.redis_url, result_expires=600)

    @app.task(name=NOOP_TASK, ignore_result=False, acks_late=True)
    def noop() -> str:
        return "ok"

    return app


def worker_main() -> None:
    """``python bench/job_latency.py worker``: the trainer worker, plus the no-op task."""
    from services.trainer.settings import TrainerSettings
    from services.trainer.worker.celery_app import worker_argv
    from shipyard_common.logging import configure_logging
    from shipyard_common.settings import disable_telemetry

    disable_telemetry()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = TrainerSettings()
    configure_logging("trainer-worker", level=settings.platform.log_level, json_lines=False)
    app = bench_celery(settings)
    app.worker_main(worker_argv(queues=[settings.queue_name("cpu")], concurrency=1, pool="prefork",
                                loglevel=settings.platform.log_level))


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {"median": statistics.median(ordered), "p90": p90, "max": ordered[-1], "min": ordered[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs (after one warm-up)")
    parser.add_argument("--redis-url", default=os.environ.get("SHIPYARD_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/12"))
    parser.add_argument("--poll-ms", type=float, default=5.0, help="GET /jobs/{id} interval")
    parser.add_argument("--no-cancel", dest="cancel", action="store_false",
                        help="let every job train to the end instead of cancelling it once running")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()

    import httpx
    from sklearn.datasets import load_breast_cancer

    from services.trainer.settings import TrainerSettings
    from services.trainer.worker.broker import on_broker_for
    from shipyard_cli.processes import Component, redis_answers
    from shipyard_cli.stack import Stack
    from shipyard_common.datasets import DataRepo
    from shipyard_common.processes import free_port, stop_process_group
    from shipyard_common.settings import PlatformSettings, disable_telemetry

    disable_telemetry()
    if not redis_answers(args.redis_url):
        sys.exit(f"no Redis answers at {args.redis_url} (--redis-url)")
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-job-latency-"))
    token = "bench-trainer-token"
    trainer_port = free_port()
    platform = PlatformSettings(
        env="test", state_dir=tmp, redis_url=args.redis_url, tokens={token: "trainer"}, log_json=False,
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}", trainer_url=f"http://127.0.0.1:{trainer_port}",
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    settings = TrainerSettings(platform=platform, queue_prefix=prefix)
    stack = Stack(platform, extra_env={"SHIPYARD_TRAINER_QUEUE_PREFIX": prefix})
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "breast_cancer", load_breast_cancer(as_frame=True).frame).rev

    records = []
    celery = bench_celery(settings)
    try:
        started = time.monotonic()
        for component in (
            stack.mlflow_component(),
            stack.service_component("trainer"),
            Component("worker", [sys.executable, str(Path(__file__).resolve()), "worker"]),
        ):
            records.append(stack.start_component(component))
        for record in records:
            stack.wait_ready(record, timeout=180)
        print(f"stack up in {time.monotonic() - started:.1f}s (state {tmp})", flush=True)
        on_broker = on_broker_for(settings)
        queue = settings.queue_name("cpu")
        http = httpx.Client(base_url=platform.trainer_url, timeout=30,
                            headers={"Authorization": f"Bearer {token}"})

        def wait_idle(job_id: str | None) -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                ended = job_id is None or http.get(f"/jobs/{job_id}").json()["state"] in TERMINAL
                if ended and not on_broker():  # acks_late: the message goes once the task returns
                    time.sleep(0.3)  # let the worker go back to waiting on the queue
                    return
                time.sleep(0.05)
            raise SystemExit(f"the worker did not become idle; see {stack.log_dir}")

        def one_job() -> tuple[float, float]:
            spec = {
                "model_name": f"latency-{uuid.uuid4().hex[:8]}",
                "model": {"type": "mlp", "hidden": [8]},
                "data": {"dataset": "breast_cancer", "rev": rev, "task": "classification",
                         "target": "target"},
                "training": {"epochs": 1, "batch_size": 64},
            }
            t0 = time.perf_counter()
            created = http.post("/jobs", json=spec)
            posted = time.perf_counter() - t0
            created.raise_for_status()
            job_id = created.json()["id"]
            while True:
                state = http.get(f"/jobs/{job_id}").json()["state"]
                if state != "queued":
                    break
                time.sleep(args.poll_ms / 1000)
            latency = time.perf_counter() - t0
            if state != "running" and state not in TERMINAL:
                raise SystemExit(f"job {job_id} went {state!r}")
            if args.cancel and state == "running":
                http.post(f"/jobs/{job_id}/cancel")
            wait_idle(job_id)
            return latency, posted

        def one_round_trip() -> float:
            t0 = time.perf_counter()
            result = celery.send_task(NOOP_TASK, queue=queue)
            assert result.get(timeout=60) == "ok"
            elapsed = time.perf_counter() - t0
            result.forget()
            wait_idle(None)
            return elapsed

        wait_idle(None)
        cold_job, _ = one_job()
        cold_trip = one_round_trip()
        latencies: list[float] = []
        posts: list[float] = []
        trips: list[float] = []
        for i in range(args.jobs):
            latency, posted = one_job()
            latencies.append(latency)
            posts.append(posted)
            trips.append(one_round_trip())
            print(f"  job {i + 1:2d}: POST→running {latency:.3f}s (POST answered in {posted:.3f}s); "
                  f"bare Celery round-trip {trips[-1]:.3f}s", flush=True)
        http.close()
    finally:
        celery.close()
        for record in reversed(records):
            stop_process_group(record.pid, timeout=10)

    job_s, post_s, trip_s = summary(latencies), summary(posts), summary(trips)
    print()
    print(f"warm-up (excluded): first job {cold_job:.3f}s, first round-trip {cold_trip:.3f}s")
    print(f"{'':32s} {'median':>8s} {'p90':>8s} {'max':>8s} {'min':>8s}")
    for name, row in (("POST /jobs → running (s)", job_s), ("  of which POST answered (s)", post_s),
                      ("bare Celery round-trip (s)", trip_s)):
        print(f"{name:32s} {row['median']:8.3f} {row['p90']:8.3f} {row['max']:8.3f} {row['min']:8.3f}")
    print(f"ratio job/baseline (median): {job_s['median'] / trip_s['median']:.1f}x; "
          f"goal: median < 1 s -> {'met' if job_s['median'] < 1 else 'NOT met'}")
    print(f"jobs={args.jobs} poll={args.poll_ms}ms cancel={args.cancel} redis={args.redis_url}")
    if args.keep:
        print(f"logs: {stack.log_dir}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main()
    else:
        main()
