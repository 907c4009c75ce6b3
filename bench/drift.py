"""The monitor's cost per window against Evidently alone on the same frames, in one run.

Run from the repository root:  .venv/bin/python bench/drift.py [--help]

Builds, under a temporary folder: a DVC repository holding a reference of ``--rows`` × ``--columns``
float features and a binary target; an MLflow registry (SQLite store, in process) with a version
whose lineage tags point at it; a SQLite platform database whose prediction log holds one window
of ``--rows`` rows (requests of ``--batch`` rows, 5 of the features shifted, class probabilities as
outputs). Then, after one warm-up each (the monitor's warm-up reads and describes the reference:
once per revision, by design), ``--rounds`` rounds in alternating order of:

- **monitor**: ``close_due_windows`` closing that window (``window = {"rows": N}``): finding the
  window, reading its rows from the database, quality checks, Evidently (features and
  predictions), storing the row and the gzipped snapshot. The window row is deleted between rounds.
- **Evidently alone**: ``Report([DataDriftPreset(columns=features)])`` run on the same two frames
  already in memory (the reference's features, the window's rows as a DataFrame).
- **same metrics alone** (a diagnostic): the very metrics the monitor asks of Evidently
  (``DriftedColumnsCount``, one ``ValueDrift`` per feature and one of the predictions) on frames in
  memory, so that monitor ÷ this is the monitor's own overhead.

Goal (issue 12): monitor ≤ 1.2 × Evidently alone (ratio of medians) and peak memory under 1 GB.
Peak memory: the peak RSS of a fresh process that closes the window once (``--no-memory`` skips
it), next to that of one that runs Evidently alone once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shipyard_common.auth import Role  # noqa: E402
from shipyard_common.settings import PlatformSettings, disable_telemetry  # noqa: E402

GOAL_RATIO = 1.2
GOAL_PEAK_MB = 1024.0
MODEL = "bench-drift"
SHIFTED = 5


def bench_platform(state: Path) -> PlatformSettings:
    """Everything under ``state``: SQLite database, MLflow's SQLite store, the DVC repository."""
    return PlatformSettings(env="test", state_dir=state, log_json=False, tokens={"bench-token": Role.VIEWER},
                            mlflow_tracking_uri=f"sqlite:///{state / 'mlflow.db'}",
                            data_repo=state / "data", dvc_remote=state / "remote")


def frames(rows: int, columns: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The reference (features and target), the window's rows, and the model's answers to them."""
    rng = np.random.default_rng(seed)
    names = [f"f{i:02d}" for i in range(columns)]
    scale = rng.uniform(0.5, 20.0, columns)
    reference = pd.DataFrame(rng.normal(size=(rows, columns)) * scale, columns=names)
    reference["target"] = (reference[names[0]] + rng.normal(size=rows) * scale[0] > 0).astype(int)
    current = pd.DataFrame(rng.normal(size=(rows, columns)) * scale, columns=names)
    current.iloc[:, :SHIFTED] += 0.1 * scale[:SHIFTED]
    p = 1 / (1 + np.exp(-current[names[0]].to_numpy() / scale[0]))
    return reference, current, np.column_stack([1 - p, p])


def setup(state: Path, args: argparse.Namespace) -> PlatformSettings:
    """The DVC reference, the registered version and the logged window; the platform settings."""
    from mlflow.tracking import MlflowClient
    from sqlalchemy import insert

    from shipyard_common.datasets import DataRepo
    from shipyard_common.db import Database, utcnow
    from shipyard_common.lineage import TAG_DATASET, TAG_DATASET_REV, TAG_FEATURES, TAG_TARGET, TAG_TASK
    from shipyard_common.records import PredictionRecord

    reference, current, outputs = frames(args.rows, args.columns)
    features = [c for c in reference.columns if c != "target"]
    platform = bench_platform(state)
    rev = DataRepo(state / "data", state / "remote").add("bench", reference).rev
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    client.create_registered_model(MODEL)
    run = client.create_run(client.create_experiment("bench-drift")).info.run_id
    tags = {TAG_DATASET: "bench", TAG_DATASET_REV: rev, TAG_FEATURES: json.dumps(features),
            TAG_TARGET: "target", TAG_TASK: "classification"}
    version = client.create_model_version(MODEL, source="file:///dev/null", run_id=run, tags=tags)
    client.set_registered_model_alias(MODEL, "production", version.version)
    database = Database(platform.database_url)
    database.create_tables()
    values, answers, created = current.to_numpy(), outputs, utcnow() - timedelta(minutes=1)
    records = [
        {"request_id": uuid.uuid4().hex, "model": MODEL, "version": str(version.version),
         "role": "production", "inputs": values[i:i + args.batch].tolist(),
         "outputs": answers[i:i + args.batch].tolist(), "latency_ms": 1.0, "created_at": created}
        for i in range(0, args.rows, args.batch)
    ]
    with database.session() as session:
        session.execute(insert(PredictionRecord), records)
    database.dispose()
    return platform


def make_monitor(platform: PlatformSettings, rows: int) -> Any:
    from prometheus_client import CollectorRegistry

    from services.monitor import tables  # noqa: F401  (registers the monitor's tables)
    from services.monitor.context import create_monitor
    from services.monitor.settings import MonitorSettings, WindowSpec
    from shipyard_common.db import Database

    settings = MonitorSettings(platform=platform, window=WindowSpec(rows=rows), window_grace_s=0,
                               max_windows_per_pass=1)
    database = Database(platform.database_url)
    database.create_tables()
    return create_monitor(settings=settings, database=database, registry=CollectorRegistry())


def monitor_round(monitor: Any) -> Callable[[], None]:
    from sqlalchemy import delete

    from services.monitor.tables import WindowRecord
    from services.monitor.windows.service import close_due_windows

    def once() -> None:
        with monitor.database.session() as session:
            session.execute(delete(WindowRecord))
        shutil.rmtree(monitor.settings.report_path, ignore_errors=True)
        started, cpu = time.perf_counter(), time.process_time()
        closed = close_due_windows(monitor=monitor)
        once.seconds = (time.perf_counter() - started, time.process_time() - cpu)  # type: ignore[attr-defined]
        if closed != 1:
            raise RuntimeError(f"the monitor closed {closed} windows, not 1")
        with monitor.database.session() as session:
            status = session.query(WindowRecord.status, WindowRecord.message).one()
        if status[0] != "ok":
            raise RuntimeError(f"the window is {status[0]}: {status[1]}")

    return once


def evidently_preset(
    reference: pd.DataFrame, current: pd.DataFrame, drift_share: float
) -> Callable[[], None]:
    """Evidently alone: its DataDriftPreset on the two frames in memory."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    features = list(current.columns)
    definition = DataDefinition(numerical_columns=features)

    def once() -> None:
        report = Report([DataDriftPreset(columns=features, drift_share=drift_share)], include_tests=True)
        report.run(current_data=Dataset.from_pandas(current, data_definition=definition),
                   reference_data=Dataset.from_pandas(reference[features], data_definition=definition))

    return once


def same_metrics(reference: pd.DataFrame, current: pd.DataFrame, outputs: np.ndarray,
                 drift_share: float) -> Callable[[], None]:
    """The metrics the monitor asks of Evidently, alone on frames in memory."""
    from services.monitor.windows.drift import Columns, DriftOptions, compute_drift

    features = list(current.columns)
    kinds = {**{f: "numerical" for f in features}, "prediction": "categorical"}
    ref = reference[features].assign(prediction=reference["target"].astype(str).astype(object))
    cur = current.assign(prediction=pd.Series(outputs.argmax(axis=1).astype(str), dtype=object))
    columns = Columns(kinds=kinds, features=features, prediction="prediction")
    options = DriftOptions(drift_share=drift_share)

    def once() -> None:
        compute_drift(reference=ref, current=cur, columns=columns, options=options)

    return once


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn`` (the monitor's side times its own call, not the reset)."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    measured = getattr(fn, "seconds", None)
    return measured or (time.perf_counter() - started, time.process_time() - cpu)


def peak_mb(state: Path, side: str, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process that does ``side`` once."""
    argv = [sys.executable, __file__, "child", side, str(state), "--rows", str(args.rows),
            "--columns", str(args.columns)]
    found = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT)
    return float(found.stdout.strip().splitlines()[-1])


def child(side: str, state: Path, args: argparse.Namespace) -> None:
    if side == "monitor":
        monitor_round(make_monitor(bench_platform(state), args.rows))()
    else:
        reference, current, _ = frames(args.rows, args.columns)
        evidently_preset(reference, current, 0.25)()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    status = Path("/proc/self/status").read_text()
    print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the window and of the reference")
    parser.add_argument("--columns", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10, help="rows per logged request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        side, state = sys.argv[2], Path(sys.argv[3])
        child(side, state, parser.parse_args(sys.argv[4:]))
        return
    args = parser.parse_args()
    disable_telemetry()
    state = Path(tempfile.mkdtemp(prefix="shipyard-bench-drift-"))
    try:
        run(state, args)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def run(state: Path, args: argparse.Namespace) -> None:
    print(f"setting up a window of {args.rows:,} rows × {args.columns} columns …", flush=True)
    platform = setup(state, args)
    monitor = make_monitor(platform, args.rows)
    reference, current, outputs = frames(args.rows, args.columns)
    current = current.astype(np.float64)
    sides = {
        "monitor": monitor_round(monitor),
        "evidently": evidently_preset(reference, current, monitor.settings.drift_share),
        "same_metrics": same_metrics(reference, current, outputs, monitor.settings.drift_share),
    }
    memory = None if args.no_memory else (peak_mb(state, "monitor", args), peak_mb(state, "evidently", args))
    first = timed(sides["monitor"])[0]
    print(f"warm-up: monitor {first:.2f} s (reference read and described: {monitor.references.loads}×)")
    for side in ("evidently", "same_metrics"):
        print(f"warm-up: {side} {timed(sides[side])[0]:.2f} s", flush=True)
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            wall, used = timed(sides[side])
            times[side].append(wall)
            cpu[side].append(used)
        print(f"round {round_ + 1}: " + ", ".join(f"{s} {times[s][-1]:.2f} s (CPU {cpu[s][-1]:.2f})"
                                                  for s in sides), flush=True)
    report(times, cpu, memory, args, first, monitor.references.loads)
    monitor.close()


def report(times: dict[str, list[float]], cpu: dict[str, list[float]], memory: tuple[float, float] | None,
           args: argparse.Namespace, first: float, loads: int) -> None:
    mid = {side: statistics.median(found) for side, found in times.items()}
    mid_cpu = {side: statistics.median(found) for side, found in cpu.items()}
    ratio = mid["monitor"] / mid["evidently"]
    paired = [m / e for m, e in zip(times["monitor"], times["evidently"], strict=True)]
    print(f"\none window of {args.rows:,} rows × {args.columns} columns ({args.batch} rows per request), "
          f"{args.rounds} rounds, medians; load average {os.getloadavg()[0]:.1f}")
    print("| side | median s | min s | max s | median CPU s |")
    print("|---|---:|---:|---:|---:|")
    for side, found in times.items():
        print(f"| {side} | {mid[side]:.2f} | {min(found):.2f} | {max(found):.2f} | {mid_cpu[side]:.2f} |")
    print(f"monitor ÷ Evidently alone (DataDriftPreset): **{ratio:.2f}** (goal ≤ {GOAL_RATIO}); per round "
          + ", ".join(f"{r:.2f}" for r in paired))
    print(f"CPU time, monitor ÷ Evidently alone: {mid_cpu['monitor'] / mid_cpu['evidently']:.2f}")
    print(f"monitor ÷ the same metrics alone: {mid['monitor'] / mid['same_metrics']:.2f} "
          f"(CPU time {mid_cpu['monitor'] / mid_cpu['same_metrics']:.2f})")
    print(f"first window (reads the reference from DVC, {loads} read in all): {first:.2f} s")
    if memory is not None:
        print(f"peak RSS: monitor process {memory[0]:.0f} MB, Evidently-alone process {memory[1]:.0f} MB "
              f"(goal < {GOAL_PEAK_MB:.0f} MB)")
    met = ratio <= GOAL_RATIO and (memory is None or memory[0] < GOAL_PEAK_MB)
    print("goal " + ("met" if met else "MISSED"))


if __name__ == "__main__":
    main()
