"""``batch_predict`` rows/s against ONNX Runtime called in a bare loop on the same chunks, in one run.

Run from the repository root:  .venv/bin/python bench/batch_predict.py [--help]

Builds, under a temporary folder: a DVC repository (local remote) holding a dataset of ``--rows``
rows × ``--features`` float columns; an MLflow registry (SQLite store, in process) with an ONNX MLP
(``--features`` → ``--hidden`` → ``--hidden`` → 4 classes, ReLU, softmax; random weights) as
``production``, tagged with its features; a SQLite platform database (the prediction log). Prefect
runs in its ephemeral mode (a local server the first flow starts). Then, after one warm-up each,
``--rounds`` rounds in alternating order of:

- **batch_predict**: the flow, whole: resolve the revision and the version, read the dataset from
  DVC, cut and hash the chunks, per chunk ONNX Runtime + the prediction log's rows + the Parquet
  file, the output's commit to git and DVC's remote, the MLflow run. Between rounds its chunks and
  log rows are deleted and it writes to an output of its own, so every round does all the work.
- **bare loop**: ``session.run`` on each chunk of the same float32 array, already in memory, with the
  same ONNX file and the same session options (``pipelines.batch.flow.session_options``: ONNX
  Runtime's default threads, not spinning).

Goal (issue 16): batch_predict rows/s ≥ 0.8 × the bare loop's (ratio of the medians). The flow's
parts are timed once more after the rounds (``--no-parts`` skips it) to say where the rest goes,
with the dataset read twice: its CSV parsed (a version whose frame is not kept yet), then its kept
frame (``shipyard_common/datasets/frames.py``; a version added now has it from the start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shipyard_common.settings import PlatformSettings, disable_telemetry  # noqa: E402

GOAL_RATIO = 0.8
MODEL = "bench-batch"
DATASET = "bench-batch-in"


def mlp_onnx(features: int, hidden: int, classes: int = 4, seed: int = 0) -> bytes:
    """softmax(relu(relu(x W1 + b1) W2 + b2) W3 + b3) as a serialized ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    shapes = [(features, hidden), (hidden, hidden), (hidden, classes)]
    weights = [(rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]
    nodes, inits, last = [], [], "input"
    for i, w in enumerate(weights):
        bias = np.zeros(w.shape[1], np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        last = f"a{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"]))
            last = f"r{i}"
    nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes, "bench_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what onnxruntime 1.31 reads (onnx 1.23 writes 14)
    return bytes(model.SerializeToString())


def register(uri: str, model_bytes: bytes, features: list[str], state: Path) -> None:
    """Log the ONNX file as a run's ``model/onnx/model.onnx``, register it, point production at it."""
    from mlflow.tracking import MlflowClient

    from shipyard_common.lineage import TAG_FEATURES, TAG_FORMAT, TAG_TASK

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("bench", artifact_location=(state / "artifacts").as_uri())
    run = client.create_run(experiment)
    folder = state / "upload" / "onnx"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model_bytes)
    client.log_artifacts(run.info.run_id, str(folder.parent), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL)
    version = client.create_model_version(
        MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags={TAG_FORMAT: "onnx", TAG_FEATURES: json.dumps(features), TAG_TASK: "classification"})
    client.set_registered_model_alias(MODEL, "production", version.version)


def build(state: Path, rows: int, features: int, hidden: int) -> tuple[PlatformSettings, np.ndarray, Path]:
    from shipyard_common.datasets import DataRepo

    platform = PlatformSettings(state_dir=state, env="test", log_json=False, tokens={"bench": "viewer"},
                                mlflow_tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    names = [f"x{i}" for i in range(features)]
    frame = pd.DataFrame(np.random.default_rng(1).normal(size=(rows, features)).round(5), columns=names)
    started = time.perf_counter()
    DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(DATASET, frame)
    print(f"dataset: {rows} rows × {features} columns versioned in {time.perf_counter() - started:.1f}s",
          flush=True)
    model = mlp_onnx(features, hidden)
    register(platform.mlflow_tracking_uri, model, names, state)
    onnx_path = state / "bare.onnx"
    onnx_path.write_bytes(model)
    array = pd.read_csv(platform.data_repo_path / "data" / f"{DATASET}.csv")[names].to_numpy(np.float32)
    return platform, array, onnx_path


def bare_loop(onnx_path: Path, array: np.ndarray, chunk_rows: int) -> Callable[[], float]:
    import onnxruntime as ort

    from pipelines.batch.flow import session_options

    session = ort.InferenceSession(str(onnx_path), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])

    def run() -> float:
        started = time.perf_counter()
        for start in range(0, len(array), chunk_rows):
            session.run(["probabilities"], {"input": array[start:start + chunk_rows]})
        return time.perf_counter() - started

    return run


def clear(platform: PlatformSettings, config: Any) -> None:
    """No chunk file and no logged row left: the next run scores and logs every chunk."""
    from sqlalchemy import text

    from shipyard_common.db import Database

    for folder in config.work_dir.glob("*/chunks"):
        shutil.rmtree(folder)
    database = Database(platform.database_url)
    database.create_tables()
    with database.session() as session:
        session.execute(text("DELETE FROM predictions"))
    database.dispose()


def flow_round(platform: PlatformSettings, chunk_rows: int) -> Callable[[], float]:
    from pipelines.batch import BatchConfig, batch_predict_flow

    config = BatchConfig.from_platform(platform, token="bench")
    count = iter(range(1_000_000))

    def run() -> float:
        clear(platform, config)
        started = time.perf_counter()
        batch_predict_flow(dataset=DATASET, model_name=MODEL, output=f"bench-out-{next(count)}",
                           chunk_rows=chunk_rows, config=config)
        return time.perf_counter() - started

    return run


def parts(platform: PlatformSettings, chunk_rows: int) -> dict[str, float]:
    """The flow's parts, each timed alone on the same data (seconds for all the rows)."""
    from prefect.logging import disable_run_logger

    from pipelines.batch.flow import BatchConfig, log_chunk, output_frame, plan_batch
    from shipyard_common.datasets.frames import FOLDER as FRAMES

    config = BatchConfig.from_platform(platform, token="bench")
    clear(platform, config)
    timed: dict[str, float] = {}
    started = time.perf_counter()
    with disable_run_logger():
        batch = plan_batch.fn(DATASET, "latest", MODEL, "production", None, chunk_rows, None, config)
    timed["plan (resolve, read from DVC, hash chunks)"] = time.perf_counter() - started
    repo = config.repo()
    rev = repo.resolve(DATASET, "latest")
    for kept in (repo.path / ".dvc" / "cache" / FRAMES).glob("*.parquet"):
        kept.unlink()  # as for a version added before frames were kept: its CSV parsed, then kept
    started = time.perf_counter()
    repo.read(DATASET, rev)
    timed["read, its CSV parsed (and the frame kept)"] = time.perf_counter() - started
    started = time.perf_counter()
    repo.read(DATASET, rev)
    timed["read, its frame kept"] = time.perf_counter() - started
    timed["onnx"] = timed["log rows"] = timed["parquet"] = 0.0
    scratch = Path(tempfile.mkdtemp())
    for chunk in batch.chunks:
        feeds = batch.inputs.feeds(chunk.start, chunk.stop)
        t0 = time.perf_counter()
        outputs = batch.session.run([batch.output_name], feeds)[0]
        t1 = time.perf_counter()
        log_chunk(batch, chunk, feeds, outputs, 0.0)
        t2 = time.perf_counter()
        output_frame(batch, chunk, outputs).to_parquet(scratch / f"{chunk.index}.parquet", index=False)
        t3 = time.perf_counter()
        timed["onnx"] += t1 - t0
        timed["log rows"] += t2 - t1
        timed["parquet"] += t3 - t2
    shutil.rmtree(scratch)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-parts", action="store_true")
    args = parser.parse_args()
    disable_telemetry()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    state = Path(tempfile.mkdtemp(prefix="shipyard-bench-batch-"))
    try:
        platform, array, onnx_path = build(state, args.rows, args.features, args.hidden)
        sides = {"batch_predict": flow_round(platform, args.chunk_rows),
                 "bare loop": bare_loop(onnx_path, array, args.chunk_rows)}
        for name, run in sides.items():
            print(f"warm-up {name}: {run():.2f}s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.rounds):
            for name in (sides if i % 2 == 0 else reversed(list(sides))):
                times[name].append(sides[name]())
            print(f"round {i + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
        report(times, args)
        if not args.no_parts:
            for name, seconds in parts(platform, args.chunk_rows).items():
                print(f"  part {name}: {seconds:.2f}s")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def report(times: dict[str, list[float]], args: Any) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: args.rows / seconds for name, seconds in medians.items()}
    for name in times:
        print(f"{name}: median {medians[name]:.2f}s ({min(times[name]):.2f}-{max(times[name]):.2f}), "
              f"{rate[name]:,.0f} rows/s")
    ratio = rate["batch_predict"] / rate["bare loop"]
    per_round = [b / f for f, b in zip(times["batch_predict"], times["bare loop"], strict=True)]
    print(f"batch_predict ÷ bare loop (rows/s, medians): {ratio:.2f} (per round: "
          f"{', '.join(f'{r:.2f}' for r in per_round)}); goal ≥ {GOAL_RATIO}: "
          f"{'met' if ratio >= GOAL_RATIO else 'not met'}")


if __name__ == "__main__":
    main()
