"""The flow ``batch_predict``: score a dataset version with a registered model version, in chunks.

1. ``plan_batch``: resolve the dataset revision (``DataRepo``) and the model version (an alias,
   default ``production``, or a version number) in MLflow; fetch its ONNX file; read the dataset's
   rows as the file takes them (rows of features, a table's columns or sequences:
   :mod:`pipelines.batch.inputs`), naming the columns or rows that do not fit.
2. ``score_chunk``, once per chunk of ``chunk_rows`` rows, retried by Prefect: ONNX Runtime on the
   chunk; its rows into the prediction log the monitor reads (``predictions``, role ``batch``), as
   serving's are; its Parquet file written under a temporary name and renamed, so that a file there
   is whole. A chunk whose file exists is skipped, and rows already logged are not logged again.
3. ``commit_predictions``, only once every chunk's file exists: the chunks and a manifest become a
   new version of the output dataset in the data repository, ``predictions/<output>/`` tracked by
   DVC and pushed to its remote, with its lineage (dataset revision, model version) in
   ``predictions/<output>.json`` and in an MLflow run (experiment ``shipyard-batch-predict``).

Resumable: the chunks live in ``<state_dir>/pipelines/batch/<key>/`` where ``key`` hashes the
inputs (dataset revision, model version, kind of inputs, chunk size, id column); a rerun with the same inputs
finds the chunks written and scores only the others. A chunk's id is its index range plus a hash
of its rows. Test-only hook: :func:`inject_fault` makes ``score_chunk`` fail where a test says.
No pickles and no user code: only the version's ``model.onnx`` runs, in ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, SecretStr
from sqlalchemy import func, select

from pipelines.batch.inputs import ROW, ModelInputs, read_inputs
from pipelines.batch.model import ModelInfo, mlflow_client, model_info
from pipelines.flows import prefect_api, report_result
from pipelines.tasks import PipelineConfig
from shipyard_common.datasets import DataRepo, validate_dataset_name
from shipyard_common.datasets.predictions import PredictionsRepo
from shipyard_common.db import Database
from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import PRODUCTION
from shipyard_common.records import PredictionRecord, insert_rows
from shipyard_common.settings import PlatformSettings

BATCH_ROLE = "batch"  # the prediction log's role column: these rows came from a batch, not a request
CHUNK_ROWS = 50_000
LOG_ROWS = 1_000  # rows per prediction log record (one "request" of the batch)
EXPERIMENT = "shipyard-batch-predict"
CHUNK_RETRY_DELAYS_S: list[float] = [1, 2]
# Chunks in flight at once: one is scored (ONNX Runtime, its own threads) while another's rows are
# logged and its file written (JSON, the database, Parquet: mostly one core).
SCORING_THREADS = 2

_fault: Callable[[Chunk, int], None] | None = None


@contextmanager
def inject_fault(hook: Callable[[Chunk, int], None]) -> Iterator[None]:
    """Test-only: ``hook(chunk, attempt)`` runs in ``score_chunk`` after the chunk's rows were logged
    and before its file is written (the worst moment to fail); whatever it raises fails that try."""
    global _fault
    _fault = hook
    try:
        yield
    finally:
        _fault = None


class BatchConfig(BaseModel):
    """What the batch's tasks need: the pipelines' config, the platform database (the prediction
    log) and where the chunks are kept until committed."""

    pipeline: PipelineConfig
    database_url: SecretStr
    work_dir: Path

    @classmethod
    def from_platform(cls, platform: PlatformSettings | None = None, token: str | None = None) -> BatchConfig:
        platform = platform or PlatformSettings()
        return cls(pipeline=PipelineConfig.from_platform(platform, token),
                   database_url=SecretStr(platform.database_url),
                   work_dir=platform.state_dir.resolve() / "pipelines" / "batch")

    def repo(self) -> DataRepo:
        return self.pipeline.repo()


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the dataset version; ``digest`` hashes their feature values."""

    index: int
    start: int
    stop: int
    digest: str

    @property
    def id(self) -> str:
        return f"{self.index:06d}-{self.start}-{self.stop}-{self.digest[:12]}"

    def log_ids(self, key: str) -> list[str]:
        """The prediction log's request ids of this chunk's records (``LOG_ROWS`` rows each)."""
        parts = range(0, self.stop - self.start, LOG_ROWS)
        return [f"batch-{key[:16]}-{self.index}-{part // LOG_ROWS}" for part in parts]


class Batch:
    """One batch in the flow's process: the rows as the version takes them, the session, where its
    chunks go. A plain class, not a dataclass: Prefect walks a task's dataclass parameters, and this
    holds every row."""

    def __init__(self, *, key: str, model: ModelInfo, dataset: str, dataset_rev: str, session: Any,
                 inputs: ModelInputs, chunk_rows: int, config: BatchConfig) -> None:
        self.key, self.model, self.dataset, self.dataset_rev = key, model, dataset, dataset_rev
        self.session, self.inputs = session, inputs
        self.folder = config.work_dir / key / "chunks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.output_name = session.get_outputs()[0].name
        self.database = Database(config.database_url.get_secret_value())
        self.database.create_tables()
        self.chunks = make_chunks(inputs, chunk_rows)

    @property
    def id_column(self) -> str | None:
        return self.inputs.id_column

    def path(self, chunk: Chunk) -> Path:
        return self.folder / f"{chunk.id}.parquet"


def make_chunks(inputs: ModelInputs, chunk_rows: int) -> list[Chunk]:
    """Rows ``[i * chunk_rows, (i + 1) * chunk_rows)``, each with a hash of its values."""
    if chunk_rows < 1:
        raise InvalidInput(f"chunk_rows must be at least 1, not {chunk_rows}")
    chunks = []
    for index, start in enumerate(range(0, inputs.rows, chunk_rows)):
        stop = min(start + chunk_rows, inputs.rows)
        chunks.append(Chunk(index=index, start=start, stop=stop, digest=inputs.digest(start, stop)))
    return chunks


def session_options() -> Any:
    """ONNX Runtime's options for a batch (``bench/batch_predict.py``'s bare loop takes the same): its
    default threads, which do not spin while they wait for work. A spinning pool keeps its cores busy
    between runs, which the other chunk in flight (its rows logged, its file written) and whatever
    else runs on the machine then wait for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def batch_key(
    *, dataset: str, dataset_rev: str, model: ModelInfo, kind: str, chunk_rows: int, id_column: str | None
) -> str:
    """The batch's name: the same inputs give the same key, hence the same chunks to resume."""
    described = json.dumps([dataset, dataset_rev, model.name, model.version, model.features, kind,
                            model.sequence and model.sequence.tag(), chunk_rows, id_column])
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def default_output(dataset: str, model_name: str) -> str:
    """``<dataset>.<model>.predictions``, with what a dataset name may not hold replaced by ``_``."""
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{dataset}.{model_name}.predictions")
    return name[:128]


# -- the tasks -----------------------------------------------------------------------------------


@task(name="plan_batch", cache_policy=NO_CACHE, persist_result=False)
def plan_batch(dataset: str, rev: str, model_name: str, alias: str | None, version: str | None,
               chunk_rows: int, id_column: str | None, config: BatchConfig) -> Batch:
    """Resolve the dataset revision and the model version, read the rows as it takes them, cut the chunks."""
    import onnxruntime as ort

    validate_dataset_name(dataset)
    repo = config.repo()
    full_rev = repo.resolve(dataset, rev)
    model = model_info(tracking_uri=config.pipeline.mlflow_tracking_uri, work_dir=config.work_dir,
                       model_name=model_name, alias=alias, version=version)
    frame = repo.read(dataset, full_rev)
    where = f"dataset {dataset!r} at {full_rev[:12]}"
    session = ort.InferenceSession(str(model.onnx_path), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    inputs = read_inputs(frame, model, session.get_inputs(), where, id_column)
    del frame
    key = batch_key(dataset=dataset, dataset_rev=full_rev, model=model, kind=inputs.kind,
                    chunk_rows=chunk_rows, id_column=inputs.id_column)
    batch = Batch(key=key, model=model, dataset=dataset, dataset_rev=full_rev, session=session,
                  inputs=inputs, chunk_rows=chunk_rows, config=config)
    get_run_logger().info("batch %s: %s (%d %s, %d chunks) with %s", key[:12], where, inputs.rows,
                          "sequences" if inputs.kind == "sequences" else "rows", len(batch.chunks),
                          model.describe())
    return batch


@task(name="score_chunk", cache_policy=NO_CACHE, persist_result=False,
      retries=len(CHUNK_RETRY_DELAYS_S), retry_delay_seconds=CHUNK_RETRY_DELAYS_S)
def score_chunk(batch: Batch, chunk: Chunk) -> dict[str, Any]:
    """Score one chunk, log its rows for the monitor, write its file; skip it if its file exists."""
    from prefect.context import TaskRunContext

    target = batch.path(chunk)
    if target.exists():
        return {"chunk": chunk.id, "rows": chunk.stop - chunk.start, "skipped": True, "logged": 0}
    feeds = batch.inputs.feeds(chunk.start, chunk.stop)
    began = time.perf_counter()
    outputs = np.asarray(batch.session.run([batch.output_name], feeds)[0])
    latency_ms = (time.perf_counter() - began) * 1000.0
    logged = log_chunk(batch, chunk, feeds, outputs, latency_ms)
    if _fault is not None:
        context = TaskRunContext.get()
        _fault(chunk, context.task_run.run_count if context is not None else 1)
    write_chunk(batch, chunk, outputs, target)
    return {"chunk": chunk.id, "rows": chunk.stop - chunk.start, "skipped": False, "logged": logged}


def output_frame(batch: Batch, chunk: Chunk, outputs: np.ndarray) -> pd.DataFrame:
    """The chunk's rows in the output: ``row``, the id column if any, each output value, and
    ``prediction`` (a classifier's class, its label where the signature names it; a regressor's value)."""
    values = outputs.reshape(len(outputs), -1)
    columns: dict[str, Any] = {ROW: np.arange(chunk.start, chunk.stop, dtype=np.int64)}
    ids, id_column = batch.inputs.ids, batch.inputs.id_column
    if ids is not None and id_column is not None:
        columns[id_column] = ids[chunk.start:chunk.stop]
    for j in range(values.shape[1]):
        columns[f"{batch.output_name}_{j}"] = values[:, j]
    if values.shape[1] == 1:
        columns["prediction"] = values[:, 0]
    else:
        index = values.argmax(axis=1)
        classes = batch.model.classes
        columns["prediction"] = (np.asarray(classes, dtype=object)[index]
                                 if classes and len(classes) == values.shape[1] else index)
    return pd.DataFrame(columns)


def write_chunk(batch: Batch, chunk: Chunk, outputs: np.ndarray, target: Path) -> None:
    """Write under a temporary name, then rename: a file named as the chunk is always whole."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    output_frame(batch, chunk, outputs).to_parquet(partial, index=False)
    os.replace(partial, target)


def log_chunk(batch: Batch, chunk: Chunk, feeds: dict[str, np.ndarray], outputs: np.ndarray,
              latency_ms: float) -> int:
    """The chunk's rows into the prediction log, ``LOG_ROWS`` per record, role ``batch``, all in one
    transaction through the writer serving's shipper uses; none if an earlier try logged them
    already. Returns how many rows it logged. A record's inputs are what serving logs for a request
    of those rows (:meth:`ModelInputs.logged`)."""
    ids, rows = chunk.log_ids(batch.key), chunk.stop - chunk.start
    with batch.database.session() as session:
        present = session.scalar(select(func.count()).select_from(PredictionRecord)
                                 .where(PredictionRecord.request_id.in_(ids)))
        if present:
            return 0
        created, per_record = time.time(), latency_ms * LOG_ROWS / max(1, rows)
        insert_rows(session, [
            (request_id, batch.model.name, batch.model.version, BATCH_ROLE,
             batch.inputs.logged(feeds, at, at + LOG_ROWS).decode(), _json(outputs[at:at + LOG_ROWS]),
             per_record, created)
            for request_id, at in zip(ids, range(0, rows, LOG_ROWS), strict=True)
        ])
    return rows


def _json(values: np.ndarray) -> str:
    return orjson.dumps(np.ascontiguousarray(values), option=orjson.OPT_SERIALIZE_NUMPY).decode()


# -- the output dataset --------------------------------------------------------------------------


def manifest_of(batch: Batch, results: list[dict[str, Any]], run_id: str | None) -> dict[str, Any]:
    """The output's record of what it is: lineage (dataset revision, model version, MLflow run) and
    each chunk's id, rows and file."""
    return {
        "dataset": batch.dataset, "dataset_rev": batch.dataset_rev, "model": batch.model.name,
        "model_version": batch.model.version, "alias": batch.model.alias, "batch": batch.key,
        "rows": int(sum(r["rows"] for r in results)), "id_column": batch.id_column, "mlflow_run_id": run_id,
        "model_trained_on": {"dataset": batch.model.dataset, "rev": batch.model.dataset_rev},
        "chunks": [{"id": c.id, "start": c.start, "stop": c.stop, "file": batch.path(c).name}
                   for c in batch.chunks],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@task(name="commit_predictions", cache_policy=NO_CACHE, persist_result=False)
def commit_predictions(batch: Batch, results: list[dict[str, Any]], output: str, config: BatchConfig,
                       run_id: str | None) -> str:
    """Every chunk's file, and the manifest, as a new version of ``output``; refused while a chunk's
    file is missing (nothing is committed then)."""
    missing = [c.id for c in batch.chunks if not batch.path(c).exists()]
    if missing:
        raise RuntimeError(f"batch {batch.key[:12]}: chunk(s) {missing} not written; nothing committed")
    pipeline = config.pipeline
    repo = PredictionsRepo(pipeline.data_repo, pipeline.dvc_remote, s3=pipeline.s3)
    files = [batch.path(c) for c in batch.chunks]
    rev = repo.add_predictions(output, files, manifest_of(batch, results, run_id))
    get_run_logger().info("predictions %s: %d rows at revision %s", output, batch.inputs.rows, rev)
    return rev


# -- tracking ------------------------------------------------------------------------------------


def start_tracking(batch: Batch, config: BatchConfig, output: str) -> str:
    """An MLflow run for the batch (experiment ``shipyard-batch-predict``), tagged with its lineage."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(config.pipeline.mlflow_tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        try:
            experiment = str(client.create_experiment(EXPERIMENT))
        except MlflowException:  # created meanwhile by another run
            experiment = str(client.get_experiment_by_name(EXPERIMENT).experiment_id)
    else:
        experiment = str(found.experiment_id)
    tags = {"shipyard.dataset": batch.dataset, "shipyard.dataset_rev": batch.dataset_rev,
            "shipyard.model": batch.model.name, "shipyard.model_version": batch.model.version,
            "shipyard.output": output, "shipyard.batch": batch.key}
    run = client.create_run(experiment, tags=tags, run_name=f"batch_predict {output}")
    client.log_param(run.info.run_id, "chunks", len(batch.chunks))
    return str(run.info.run_id)


def end_tracking(config: BatchConfig, run_id: str, output_rev: str, rows: int, seconds: float) -> None:
    client = mlflow_client(config.pipeline.mlflow_tracking_uri)
    client.set_tag(run_id, "shipyard.output_rev", output_rev)
    client.log_metric(run_id, "rows", rows)
    client.log_metric(run_id, "rows_per_s", rows / max(seconds, 1e-9))
    client.set_terminated(run_id)


# -- the flow ------------------------------------------------------------------------------------


# Typed as Any: Prefect's flow decorator is annotated for a runner of its base future type.
_CHUNK_RUNNER: Any = ThreadPoolTaskRunner(max_workers=SCORING_THREADS)


@flow(name="batch_predict", persist_result=False, task_runner=_CHUNK_RUNNER)
def batch_predict_flow(
    dataset: str,
    model_name: str,
    rev: str = "latest",
    alias: str = PRODUCTION,
    version: str | None = None,
    output: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    id_column: str | None = None,
    config: BatchConfig | None = None,
) -> dict[str, Any]:
    """Score dataset ``dataset`` at ``rev`` with ``model_name`` at ``alias`` (or ``version``) in chunks
    of ``chunk_rows``; write the predictions as a new version of ``output`` (default
    ``<dataset>.<model>.predictions``) and log them for the monitor (role ``batch``).

    A rerun with the same inputs scores only the chunks not written yet. ``config`` is for
    in-process callers; a deployed run builds it from its process's environment.
    """
    if config is None:  # a deployed run: the platform as the deployments process's environment says
        from shipyard_common.mlflow_client import apply_mlflow_client_limits

        platform = PlatformSettings()
        apply_mlflow_client_limits(platform)
        config = BatchConfig.from_platform(platform)
    output = validate_dataset_name(output or default_output(dataset, model_name))
    began = time.perf_counter()
    batch = plan_batch(dataset, rev, model_name, alias, version, chunk_rows, id_column, config)
    run_id = start_tracking(batch, config, output)
    try:
        futures = [score_chunk.submit(batch, chunk) for chunk in batch.chunks]
        wait(futures)  # every chunk gets its tries before a failed one fails the flow
        results = [future.result() for future in futures]
        output_rev = commit_predictions(batch, results, output, config, run_id)
    except BaseException:
        # A rerun resumes, in a run of its own.
        mlflow_client(config.pipeline.mlflow_tracking_uri).set_terminated(run_id, status="FAILED")
        raise
    finally:
        batch.database.dispose()
    seconds = time.perf_counter() - began
    rows = batch.inputs.rows
    end_tracking(config, run_id, output_rev, rows, seconds)
    skipped = sum(1 for r in results if r["skipped"])
    get_run_logger().info("%d rows in %.1fs (%d chunks scored, %d already written)", rows, seconds,
                          len(results) - skipped, skipped)
    return report_result({
        "dataset": dataset, "dataset_rev": batch.dataset_rev, "model_name": batch.model.name,
        "model_version": batch.model.version, "alias": batch.model.alias, "output": output,
        "output_rev": output_rev, "rows": rows, "chunks": len(results), "skipped_chunks": skipped,
        "logged_rows": sum(r["logged"] for r in results), "mlflow_run_id": run_id, "batch": batch.key,
        "seconds": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1),
    })


def batch_predict(
    *, dataset: str, model_name: str, rev: str = "latest", alias: str = PRODUCTION,
    version: str | None = None, output: str | None = None, chunk_rows: int = CHUNK_ROWS,
    id_column: str | None = None,
    platform: PlatformSettings | None = None, token: str | None = None,
) -> dict[str, Any]:
    """Run the flow ``batch_predict`` in this process, recorded by the platform's Prefect server
    (``shipyard predict-batch``). Raises :class:`~shipyard_common.errors.NotFound` for an unknown
    dataset, revision, model, version or alias, and ``InvalidInput`` for columns that do not fit."""
    from shipyard_common.mlflow_client import apply_mlflow_client_limits

    platform = platform or PlatformSettings()
    apply_mlflow_client_limits(platform)
    config = BatchConfig.from_platform(platform, token)
    with prefect_api(platform):
        result: dict[str, Any] = batch_predict_flow(
            dataset=dataset, model_name=model_name, rev=rev, alias=alias, version=version, output=output,
            chunk_rows=chunk_rows, id_column=id_column, config=config,
        )
    return result
