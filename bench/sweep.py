"""Sweep bench: a 20-trial sweep on digits, with and without pruning: wall time, epochs trained and the
best objective of each.

Run from the repository root:  .venv/bin/python bench/sweep.py [--trials 20] [--workers 2]

Real parts, as ``bench/trainer_soak.py`` starts them: the Redis server at ``--redis-url`` (a queue prefix
of this run's own), an MLflow server, the trainer API (``python -m services.trainer``) and ``--workers``
worker processes (concurrency 1), a SQLite database and DVC data under a temporary folder. The same sweep
(TPE, seed 0, ``--trials`` trials, ``--workers`` at a time, a space over the learning rate, the layer
widths and the batch size, objective val_accuracy) runs twice: without pruning, then with the median
pruner (2 startup trials, 2 warm-up epochs), or the other way round with ``--pruned-first``.
``--rounds`` repeats the pair, flipping the order each round, and ``--warmup-trials`` runs an uncounted
sweep first (the first sweep of a fresh stack pays its workers' warm-up). Each is timed from POST
/sweeps to the sweep's end; the epochs its trials trained are the figure the machine's load does not
move.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "digits-sweep"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on a sweep after this")
    parser.add_argument("--redis-url", default=os.environ.get("SHIPYARD_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/12"))
    parser.add_argument("--pruned-first", action="store_true",
                        help="run the pruned sweep first (on a shared machine, alternate the order)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="pairs of sweeps; the order flips each round; medians reported")
    parser.add_argument("--warmup-trials", type=int, default=0,
                        help="an unpruned sweep of this many trials first, not counted (warms the workers)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    return parser.parse_args()


def sweep_spec(rev: str, args: argparse.Namespace, pruning: dict[str, Any] | None) -> dict[str, Any]:
    base = {"model_name": MODEL, "model": {"type": "mlp", "hidden": [64]},
            "data": {"dataset": "digits", "rev": rev, "task": "classification", "target": "target"},
            "training": {"epochs": args.epochs, "batch_size": 64, "seed": 0}}
    return {"base": base, "strategy": "tpe", "seed": 0, "trials": args.trials, "parallelism": args.workers,
            "objective": {"metric": "val_accuracy"}, "pruning": pruning,
            "space": {"training.learning_rate": {"type": "float", "low": 1e-6, "high": 0.3, "log": True},
                      "model.hidden": {"type": "choice", "values": [[32], [64], [128, 64]]},
                      "training.batch_size": {"type": "choice", "values": [32, 64, 128]}}}


def run_sweep(http: Any, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Post the sweep and wait for its end; the final sweep, its wall time and its trials' epochs."""
    started = time.monotonic()
    answer = http.post("/sweeps", json=spec)
    answer.raise_for_status()
    sweep_id = answer.json()["id"]
    while time.monotonic() - started < timeout:
        sweep = http.get(f"/sweeps/{sweep_id}").json()
        if sweep["state"] != "running":
            break
        time.sleep(0.5)
    else:
        sys.exit(f"sweep {sweep_id} did not end within {timeout:.0f}s")
    wall = time.monotonic() - started
    epochs = sum(http.get(f"/jobs/{t['job_id']}").json()["progress"]["epoch"]
                 for t in sweep["trials"] if t["job_id"])
    return {"sweep": sweep, "wall_s": wall, "epochs": epochs}


def report(name: str, result: dict[str, Any], total_epochs: int) -> str:
    sweep = result["sweep"]
    states: dict[str, int] = {}
    for trial in sweep["trials"]:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    best = sweep["best"]
    return (f"| {name} | {result['wall_s']:.0f} s | {result['epochs']} of {total_epochs} | "
            f"{', '.join(f'{n} {s}' for s, n in sorted(states.items()))} | "
            f"{best['value']:.4f} (trial {best['number']}) | {sweep['state']} |")


def main() -> None:
    args = parse()
    import httpx
    from sklearn.datasets import load_digits

    from shipyard_cli.processes import Component, redis_answers
    from shipyard_cli.stack import Stack
    from shipyard_common.datasets import DataRepo
    from shipyard_common.processes import free_port, stop_process_group
    from shipyard_common.settings import PlatformSettings, disable_telemetry

    disable_telemetry()
    if not redis_answers(args.redis_url):
        sys.exit(f"no Redis answers at {args.redis_url} (--redis-url)")
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-sweep-bench-"))
    token = "bench-trainer-token"
    platform = PlatformSettings(
        env="test", state_dir=tmp, redis_url=args.redis_url, tokens={token: "trainer"}, log_json=False,
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}", trainer_url=f"http://127.0.0.1:{free_port()}",
    )
    stack = Stack(platform, extra_env={"SHIPYARD_TRAINER_QUEUE_PREFIX": f"sweep-{uuid.uuid4().hex[:8]}-",
                                       "SHIPYARD_TRAINER_RECONCILE_INTERVAL_S": "2"})
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "digits", load_digits(as_frame=True).frame).rev
    worker = [sys.executable, "-m", "services.trainer.worker", "--queues", "cpu", "--concurrency", "1"]
    records = []
    try:
        for component in (stack.mlflow_component(), stack.service_component("trainer"),
                          *(Component(f"worker-{i}", worker) for i in range(args.workers))):
            records.append(stack.start_component(component))
        for record in records:
            stack.wait_ready(record, timeout=180)
        http = httpx.Client(base_url=platform.trainer_url, timeout=120,
                            headers={"Authorization": f"Bearer {token}"})
        total = args.trials * args.epochs
        rows = []
        median = {"pruner": "median", "startup_trials": 2, "warmup_epochs": 2}
        order: list[tuple[str, dict[str, Any] | None]] = [("no pruning", None), ("median pruner", median)]
        if args.pruned_first:
            order.reverse()
        if args.warmup_trials:
            warm = argparse.Namespace(**{**vars(args), "trials": args.warmup_trials})
            print(report("warm-up (not counted)", run_sweep(http, sweep_spec(rev, warm, None), args.timeout),
                         args.warmup_trials * args.epochs), flush=True)
        walls: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            for name, pruning in order if round_index % 2 == 0 else reversed(order):
                result = run_sweep(http, sweep_spec(rev, args, pruning), args.timeout)
                walls.setdefault(name, []).append(result["wall_s"])
                rows.append(report(f"{name} (round {round_index + 1})", result, total))
                print(rows[-1], flush=True)
        for name, values in walls.items():
            print(f"- {name}: median wall {statistics.median(values):.0f} s of {values}")
        print(f"\n{args.trials} trials of up to {args.epochs} epochs on digits, TPE seed 0, "
              f"{args.workers} workers, parallelism {args.workers}\n")
        print("| sweep | wall | epochs trained | trials | best val_accuracy | state |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        for record in reversed(records):
            stop_process_group(record.pid)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
