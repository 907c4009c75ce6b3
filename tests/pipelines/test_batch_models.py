"""``batch_predict`` scores every kind of ONNX model the trainer registers (issue 16), not only rows.

A table model (``data.columns``: one ONNX input per raw column, strings and NaN) and two sequence models
(``data.sequence``: an LSTM on a list column, one on long format; [batch, time, width], NaN padding) are
trained by the real trainer (its API and a Celery worker) and registered in the session's MLflow server.
``batch_predict`` then scores dataset versions of raw rows the training never saw (unseen categories,
nulls; ragged sequences, shuffled steps) in several chunks, and each written prediction must equal what
ONNX Runtime answers on the registered file for that row (that sequence) alone. What still cannot be
scored is refused with a sentence naming the column, row or id; a sequence longer than the version's
``sequence.max_length`` is refused before any is scored, as serving refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from pipelines.batch import BATCH_ROLE, batch_predict
from services.trainer.app import create_app
from shipyard_common.datasets import DataRepo
from shipyard_common.datasets.predictions import PredictionsRepo
from shipyard_common.db import Database
from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import TAG_SEQUENCE, TAG_SIGNATURE
from shipyard_common.records import PredictionRecord
from tests.services.registry.model_factory import unique_name
from tests.services.serving.support import train
from tests.services.trainer.sequence_data import list_column_frame, long_format_frame
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.services.trainer.table_data import table_frame, table_job_spec
from tests.support import running_app, test_platform

SPLIT = {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3}
LSTM = {"type": "lstm", "hidden_size": 16}


def raw_table() -> pd.DataFrame:
    """Rows as they arrive after training: an id, unseen categories, nulls in categorical and numeric
    columns (one row all nulls but one), a category only the test rows held, no target."""
    frame = table_frame().drop(columns=["target", "part"]).head(150).reset_index(drop=True)
    frame.insert(0, "id", [f"p{i:04d}" for i in range(len(frame))])
    frame.loc[0, "size"], frame.loc[1, "city"], frame.loc[2, "size"] = "enormous", "tokyo", None
    frame.loc[3, ["mean texture", "worst area", "mean radius"]] = np.nan
    frame.loc[4, "grade"], frame.loc[5, "city"] = "rare", None
    frame.loc[6, [c for c in frame.columns if c not in ("id", "grade")]] = None
    return frame


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str, prefect_url: str
) -> Iterator[dict[str, Any]]:
    """The three models trained through the trainer's API and a worker, each on a dataset version."""
    state = tmp_path_factory.mktemp("batch-models")
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server,
                             prefect_api_url=prefect_url)
    settings = trainer_settings(platform)
    repo = DataRepo.from_settings(platform)
    revs = {"tables": repo.add("tables", table_frame()).rev,
            "seq_list": repo.add("seq_list", list_column_frame(300, seed=1)).rev,
            "seq_long": repo.add("seq_long", long_format_frame(300, seed=2)).rev}
    sequence = {"data__target": "sign", "data__split": SPLIT, "training__epochs": 2,
                "training__learning_rate": 0.01, "model": LSTM}
    specs = {
        "table": table_job_spec(rev=revs["tables"], model_name=unique_name("batch-table"),
                                training__epochs=3),
        "list": job_spec(rev=revs["seq_list"], dataset="seq_list", model_name=unique_name("batch-seq"),
                         data__sequence={"column": "steps"}, **sequence),
        "long": job_spec(rev=revs["seq_long"], dataset="seq_long", model_name=unique_name("batch-long"),
                         data__sequence={"id": "id", "step": "t", "features": ["x", "noise"]}, **sequence),
    }
    worker = WorkerProcess(settings, state / "worker.log")
    try:
        with running_app(create_app(settings)) as base:
            jobs = {key: train(base, worker, spec) for key, spec in specs.items()}
        client = MlflowClient(tracking_uri=mlflow_server)
        files = {key: Path(client.download_artifacts(job["mlflow_run_id"], "model/onnx/model.onnx",
                                                     str(state / key))) for key, job in jobs.items()}
        yield {"platform": platform, "jobs": jobs, "files": files, "repo": repo}
    finally:
        worker.stop()


def score(
    trained: dict[str, Any], key: str, dataset: str, **options: Any
) -> tuple[dict[str, Any], pd.DataFrame]:
    job = trained["jobs"][key]
    result = batch_predict(dataset=dataset, model_name=job["model_name"], version=str(job["model_version"]),
                           platform=trained["platform"], **options)
    platform = trained["platform"]
    written, manifest = PredictionsRepo(platform.data_repo_path, platform.dvc_remote_path).read_predictions(
        result["output"], result["output_rev"])
    assert manifest["rows"] == result["rows"] == len(written)
    return result, written


def logged(trained: dict[str, Any], model: str) -> list[tuple[str, Any]]:
    """The prediction log's records of ``model``: (request id, inputs as JSON values), by id."""
    database = Database(trained["platform"].database_url)
    with database.session() as session:
        found = session.execute(select(PredictionRecord.request_id, PredictionRecord.role,
                                       PredictionRecord.inputs).where(PredictionRecord.model == model)).all()
    database.dispose()
    assert {role for _, role, _ in found} == {BATCH_ROLE}
    return sorted(((r[0], r[2]) for r in found), key=lambda r: tuple(int(p) for p in r[0].rsplit("-", 2)[1:]))


def test_a_table_with_strings_nulls_and_unseen_categories_is_scored_as_onnxruntime_answers(trained):
    frame = raw_table()
    trained["repo"].add("tables-raw", frame)
    session = ort.InferenceSession(str(trained["files"]["table"]), providers=["CPUExecutionProvider"])
    strings = {arg.name for arg in session.get_inputs() if arg.type == "tensor(string)"}
    assert strings == {"size", "city", "grade"} and len(session.get_inputs()) == 33

    result, written = score(trained, "table", "tables-raw", chunk_rows=40, id_column="id")

    assert (result["rows"], result["chunks"]) == (150, 4)
    assert written["id"].tolist() == frame["id"].tolist() and written["row"].tolist() == list(range(150))

    def feeds(row: pd.Series) -> dict[str, np.ndarray]:  # one row as the exported file takes it
        return {arg.name: np.array(["" if pd.isna(row[arg.name]) else str(row[arg.name])], dtype=object)
                if arg.name in strings else np.array([row[arg.name]], dtype=np.float32)
                for arg in session.get_inputs()}

    expected = np.vstack([session.run(None, feeds(row))[0] for _, row in frame.iterrows()])
    scores = written[["probabilities_0", "probabilities_1"]].to_numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert written["prediction"].tolist() == expected.argmax(axis=1).tolist()  # classes 0 and 1

    records = logged(trained, trained["jobs"]["table"]["model_name"])  # as serving logs a table's rows
    assert len(records) == 4
    first = orjson.loads(records[0][1]) if isinstance(records[0][1], str) else records[0][1]
    assert set(first) == {arg.name for arg in session.get_inputs()} and len(first["size"]) == 40
    assert first["size"][:3] == ["enormous", "" if pd.isna(frame["size"][1]) else frame["size"][1], ""]
    assert first["city"][1] == "tokyo" and first["mean texture"][3] is None
    assert first["mean radius"][0] == pytest.approx(frame["mean radius"][0])


def one_by_one(path: Path, sequences: list[np.ndarray]) -> np.ndarray:
    """ONNX Runtime's answer for each sequence alone, [1, its steps, width], unpadded: the trainer's
    export keeps the time axis free (1aee3b5), which this asserts."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    time = session.get_inputs()[0].shape[1]
    assert not isinstance(time, int), f"the exported sequence model's time axis is fixed at {time}"
    return np.vstack([session.run(None, {"input": s[None].astype(np.float32)})[0] for s in sequences])


def test_ragged_sequences_of_a_list_column_are_scored_as_each_alone(trained):
    frame = list_column_frame(130, seed=5)  # 3 to 20 steps each; stored as JSON text in the CSV
    trained["repo"].add("seq-list-raw", frame)

    result, written = score(trained, "list", "seq-list-raw", chunk_rows=50)

    assert (result["rows"], result["chunks"]) == (130, 3)
    expected = one_by_one(trained["files"]["list"], [np.asarray(s).reshape(-1, 1) for s in frame["steps"]])
    np.testing.assert_allclose(written[["probabilities_0", "probabilities_1"]].to_numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    assert written["prediction"].tolist() == [["negative", "positive"][i] for i in expected.argmax(axis=1)]
    records = logged(trained, trained["jobs"]["list"]["model_name"])
    padded = [np.asarray(orjson.loads(r) if isinstance(r, str) else r, dtype=object) for _, r in records]
    assert [len(p) for p in padded] == [50, 50, 30]  # each record: its sequences padded to its longest
    steps = padded[0][0]
    assert [v[0] for v in steps[:len(frame["steps"][0])]] == pytest.approx(frame["steps"][0])
    assert all(v == [None] for v in steps[len(frame["steps"][0]):])


def test_long_format_is_scored_one_sequence_per_id_in_step_order(trained):
    frame = long_format_frame(60, seed=6)  # one row per step, shuffled
    trained["repo"].add("seq-long-raw", frame)

    result, written = score(trained, "long", "seq-long-raw", chunk_rows=25)

    ids = sorted(frame["id"].unique())
    assert (result["rows"], result["chunks"]) == (60, 3)
    assert written["id"].tolist() == ids and written["row"].tolist() == list(range(60))
    sequences = [frame[frame["id"] == i].sort_values("t")[["x", "noise"]].to_numpy() for i in ids]
    expected = one_by_one(trained["files"]["long"], sequences)
    np.testing.assert_allclose(written[["probabilities_0", "probabilities_1"]].to_numpy(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "frame", "options", "message"),
    [
        ("table", lambda: raw_table().drop(columns=["city"]), {}, "lacks column(s) ['city']"),
        ("table", lambda: raw_table().assign(**{"mean radius": ["big", *raw_table()["mean radius"][1:]]}), {},
         "column 'mean radius' of dataset 'refused' at"),
        ("list", lambda: list_column_frame(10, seed=7).assign(
            steps=lambda f: [*f["steps"][:2], [], *f["steps"][3:]]), {}, "row 2 of column 'steps'"),
        ("list", lambda: list_column_frame(10, seed=7).assign(
            steps=lambda f: [*f["steps"][:4], [0.5, "x"], *f["steps"][5:]]), {}, "row 4 of column 'steps'"),
        ("long", lambda: long_format_frame(10, seed=8).drop(columns=["t"]), {}, "lacks column(s) ['t']"),
        ("long", lambda: pd.concat([long_format_frame(10, seed=8)] * 2), {}, "more than once"),
        ("long", lambda: long_format_frame(10, seed=8), {"id_column": "sign"},
         "can only be 'id', not 'sign'"),
    ],
)
def test_what_cannot_be_scored_is_refused_naming_what_is_wrong(trained, key, frame, options, message):
    trained["repo"].add("refused", frame(), allow_schema_change=True)
    with pytest.raises(InvalidInput) as refused:
        score(trained, key, "refused", **options)
    assert message in refused.value.message, refused.value.message


def longer_than(frame: pd.DataFrame, key: str, longest: int) -> tuple[pd.DataFrame, str]:
    """``frame`` with one sequence of exactly ``longest`` steps, then two longer ones (``longest`` + 1
    and + 5), and how the refusal names the first longer one: its row and id (a list column, scored with
    ``id_column="key"``), or its id (long format)."""
    if key == "list":
        steps = frame["steps"].tolist()
        steps[1], steps[3], steps[5] = [0.25] * longest, [0.5] * (longest + 1), [-0.5] * (longest + 5)
        return frame.assign(steps=steps, key=[f"k{i}" for i in range(len(frame))]), "row 3 (id 'k3')"
    extra = [{"id": id_, "t": step, "x": 0.5, "noise": 0.0, "sign": "positive"}
             for id_, total in (("s00001", longest), ("s00003", longest + 1), ("s00005", longest + 5))
             for step in range(int((frame["id"] == id_).sum()), total)]
    return pd.concat([frame, pd.DataFrame(extra)], ignore_index=True), "id 's00003'"


@pytest.mark.parametrize("key", ["list", "long"])
def test_a_sequence_longer_than_the_model_reads_is_refused_before_any_is_scored(trained, key):
    job = trained["jobs"][key]
    version = MlflowClient(tracking_uri=trained["platform"].mlflow_tracking_uri).get_model_version(
        job["model_name"], str(job["model_version"]))
    longest = json.loads(version.tags[TAG_SEQUENCE])["max_length"]
    assert longest == json.loads(version.tags[TAG_SIGNATURE])["sequence"]["max_length"]  # what serving reads
    frame = list_column_frame(10, seed=9) if key == "list" else long_format_frame(10, seed=10)
    frame, named = longer_than(frame, key, longest)
    trained["repo"].add(f"too-long-{key}", frame)

    def records() -> int:
        database = Database(trained["platform"].database_url)
        with database.session() as session:
            found = session.execute(select(PredictionRecord.request_id)
                                    .where(PredictionRecord.model == job["model_name"])).all()
        database.dispose()
        return len(found)

    before = records()
    with pytest.raises(InvalidInput) as refused:
        score(trained, key, f"too-long-{key}", **({"id_column": "key"} if key == "list" else {}))
    assert (f"the sequence of {named} has {longest + 1} steps; {job['model_name']} "
            f"v{job['model_version']} reads at most {longest} (its sequence.max_length), and 2 sequence(s) "
            "are longer") in refused.value.message, refused.value.message
    assert records() == before  # nothing scored, nothing logged
