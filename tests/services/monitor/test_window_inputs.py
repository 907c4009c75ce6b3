"""Drift of the versions that take more than rows of numbers (issue 16): a table with categorical
(string) columns and nulls, and variable-length sequences, against real components (an MLflow
server, a DVC repository, SQLite and PostgreSQL).

Each version carries the tags the trainer writes (lineage and signature; a sequence version's run
has the job's params, flattened by the trainer's own ``flatten``). Requests are logged as serving
logs them: each body decoded by serving's codec for our protocol (``ours.decode``, ``to_array``),
its arrays made loggable by the data plane (``loggable``), written as a journal line and read back
into the predictions table as the shipper does (``records.dumps``, ``records.row``, ``insert_rows``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from services.monitor.loop import run_pass
from services.monitor.tables import WindowRecord
from services.monitor.windows.frames import WindowRows
from services.serving.core.convert import to_array
from services.serving.core.dataplane import loggable
from services.serving.predlog import records
from services.serving.protocols import ours
from services.serving.runtimes.base import Signature
from services.trainer.engines.tracking import flatten
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.datasets import DataRepo
from shipyard_common.datasets.sequences import SequenceLayout
from shipyard_common.db import Database
from shipyard_common.lineage import (
    PRODUCTION,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_SEQUENCE,
    TAG_SIGNATURE,
    TAG_TARGET,
    TAG_TASK,
)
from shipyard_common.records import insert_rows
from shipyard_common.settings import PlatformSettings
from tests.services.monitor.input_data import (
    list_column,
    long_format,
    sequence_bodies,
    sequences,
    shifted_table,
    table_bodies,
    table_frame,
)
from tests.services.monitor.support import gauge, monitor_maker, windows

PROBABILITIES = {"name": "probabilities", "shape": [None, 2], "dtype": "float32"}


@dataclass(frozen=True)
class Data:
    repo: Path
    remote: Path
    revs: dict[str, str]
    frames: dict[str, pd.DataFrame]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("monitor-inputs")
    repo = DataRepo(root / "data", root / "remote")
    listed = sequences(400, seed=1)
    frames = {
        "table": table_frame(600, seed=0),
        "seq_list": list_column(listed),
        "seq_long": long_format(sequences(400, seed=2, width=2)),
    }
    revs = {name: repo.add(name, frame).rev for name, frame in frames.items()}
    return Data(repo.path, repo.remote, revs, frames)


@pytest.fixture
def make_monitor(platform: PlatformSettings, data: Data) -> Iterator[Any]:
    with monitor_maker(platform, data_repo=data.repo, dvc_remote=data.remote) as make:
        yield make


def register(platform: PlatformSettings, *, dataset: str, data: Data, features: list[str], target: str,
             signature: dict[str, Any], job: dict[str, Any] | None = None,
             sequence: SequenceLayout | None = None) -> str:
    """A production version with the trainer's tags; ``job``: the data of a job spec whose params
    its run holds, as the trainer logs them; ``sequence``: its shipyard.sequence tag."""
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    name = f"inputs-{uuid.uuid4().hex[:10]}"
    client.create_registered_model(name)
    run = client.create_run(experiment_id="0")
    if job is not None:
        spec = JobCreate.model_validate({
            "model_name": name, "framework": "pytorch", "model": {"type": "lstm", "hidden_size": 8},
            "data": {"dataset": dataset, "rev": data.revs[dataset], "task": "classification",
                     "target": target, **job},
            "training": {"epochs": 1}, "exports": ["onnx"],
        })
        for key, value in flatten(spec.model_dump(mode="json")).items():
            client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    tags = {TAG_DATASET: dataset, TAG_DATASET_REV: data.revs[dataset], TAG_FEATURES: json.dumps(features),
            TAG_TARGET: target, TAG_TASK: "classification",
            TAG_SIGNATURE: json.dumps(signature, sort_keys=True),
            **({TAG_SEQUENCE: sequence.tag()} if sequence is not None else {})}
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(name, PRODUCTION, version.version)
    return name


def serve_log(db_url: str, model: str, signature: dict[str, Any], bodies: list[Any],
              answers: list[np.ndarray]) -> None:
    """Each request body's ``inputs`` logged as serving logs it (see the module's docstring)."""
    parsed = Signature.from_json(signature)
    specs = {spec.name: spec for spec in parsed.inputs}
    lines = []
    for body, answer in zip(bodies, answers, strict=True):
        arrays = {name: to_array(tensor, specs[name], max_rows=10_000, allow_non_finite=False)  # type: ignore[arg-type]
                  for name, tensor in ours.decode(body, parsed).items()}
        single = next(iter(arrays.values())) if len(arrays) == 1 else None
        logged = loggable(single) if single is not None else {n: loggable(a) for n, a in arrays.items()}
        lines.append(records.dumps({
            "request_id": uuid.uuid4().hex, "model": model, "version": "1", "role": PRODUCTION,
            "inputs": logged, "outputs": loggable(answer.astype(np.float32)), "latency_ms": 1.0,
            "created_at": time.time() - 60,
        }))
    database = Database(db_url)
    database.create_tables()
    with database.session() as session:
        insert_rows(session, [records.row(line.rstrip(b"\n")) for line in lines])
    database.dispose()


def answers_of(count: int, *, seed: int, per_request: int) -> list[np.ndarray]:
    """Two-class probabilities, a batch per request."""
    rng = np.random.default_rng(seed)
    first = rng.random(count)
    probabilities = np.stack([first, 1 - first], axis=1)
    return [probabilities[start:start + per_request] for start in range(0, count, per_request)]


def by_name(window: WindowRecord) -> dict[str, dict[str, Any]]:
    return {feature["name"]: feature for feature in window.features}


# -- a table with strings and nulls ---------------------------------------------------------------

TABLE_SIGNATURE = {
    "inputs": [{"name": "colour", "shape": [None], "dtype": "string", "nullable": True},
               {"name": "size", "shape": [None], "dtype": "float32", "nullable": True},
               {"name": "code", "shape": [None], "dtype": "string", "nullable": True}],
    "outputs": [PROBABILITIES], "classes": ["no", "yes"],
}


def test_a_tables_categories_drift_as_categories_and_its_nulls_are_counted(make_monitor, db_url, data):
    monitor = make_monitor(db_url)
    model = register(monitor.settings.platform, dataset="table", data=data,
                     features=["colour", "size", "code"], target="y", signature=TABLE_SIGNATURE)
    calm = data.frames["table"].sample(200, random_state=5).reset_index(drop=True)
    shifted = shifted_table(data.frames["table"])
    for frame, seed in ((calm, 1), (shifted, 2)):
        serve_log(db_url, model, TABLE_SIGNATURE, table_bodies(frame),
                  answers_of(200, seed=seed, per_request=10))

    run_pass(monitor=monitor)
    first, second = windows(monitor, model)
    for window in (first, second):
        assert (window.status, window.rows) == ("ok", 200), window.message
        assert window.quality["checked_rows"] == 200 and window.quality["schema_mismatch_share"] == 0
        kinds = {name: feature["kind"] for name, feature in by_name(window).items()}
        assert kinds == {"colour": "categorical", "size": "numerical", "code": "categorical"}
    # Evidently's own choice for categories on 600 reference rows: chi-square; K-S for the numbers.
    assert {f["name"]: f["method"] for f in first.features} == {
        "colour": "chi-square p_value", "size": "K-S p_value", "code": "chi-square p_value"}
    assert first.dataset_drift is False and not any(f["drifted"] for f in first.features)
    # Nulls are counted per column: a client's null colour was logged as "" by serving.
    assert first.quality["missing"] == {"colour": calm["colour"].isna().mean(),
                                        "size": calm["size"].isna().mean()}
    assert first.quality["unseen_category_share"] == 0 and first.quality["out_of_range_share"] == 0

    drifted = {f["name"] for f in second.features if f["drifted"]}
    assert drifted == {"colour", "code"} and second.dataset_drift is True
    assert second.quality["missing"]["size"] == pytest.approx(0.3)
    present = int(shifted["colour"].notna().sum())  # the share is of the values present
    assert second.quality["unseen_categories"] == {"colour": {"share": 10 / present, "values": ["purple"]}}
    assert gauge(monitor, "shipyard_feature_drifted", model=model, version="1", feature="colour") == 1.0
    assert gauge(monitor, "shipyard_window_schema_mismatch_share", model=model, version="1") == 0.0
    assert gauge(monitor, "shipyard_window_missing_share", model=model, version="1") == pytest.approx(
        second.quality["missing_share"])


def test_a_tables_request_is_read_by_column_and_a_table_of_one_column_as_its_values():
    answer = [0.1, 0.9]
    one = WindowRows(expected=1)
    one.add_columns(["red", "", None], [answer] * 3, features=("colour",))
    assert one.rows == [["red"], [""], [None]] and one.fitting == one.total == 3
    two = WindowRows(expected=2)
    two.add_columns({"size": [1.0, None], "colour": ["blue", ""]}, [answer] * 2, features=("colour", "size"))
    two.add_columns({"colour": ["blue"]}, [answer], features=("colour", "size"))  # a column short
    two.add_columns({"colour": ["a", "b"], "size": [1.0]}, [answer] * 2, features=("colour", "size"))
    assert two.rows == [["blue", 1.0], ["", None]] and two.outputs == [answer] * 2
    # Requests that are not the table's columns count their first column's rows, as the cutting does.
    assert (two.total, two.fitting, two.not_rows, two.mismatched) == (5, 2, 3, 3)


# -- variable-length sequences --------------------------------------------------------------------

def sequence_signature(width: int) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [None, None, width], "dtype": "float32", "nullable": True}],
            "outputs": [PROBABILITIES], "classes": ["negative", "positive"],
            "sequence": {"padding": "nan", "max_length": 20}}


def test_sequences_drift_on_their_lengths_and_means_and_none_is_a_width_mismatch(make_monitor, db_url, data):
    monitor = make_monitor(db_url, window={"rows": 100})
    platform = monitor.settings.platform
    listed = register(platform, dataset="seq_list", data=data, features=["steps"], target="sign",
                      signature=sequence_signature(1), job={"sequence": {"column": "steps"}})
    long = register(platform, dataset="seq_long", data=data, features=["x", "noise"], target="sign",
                    signature=sequence_signature(2), job={"sequence": {"id": "id", "step": "t"}})
    # Windows of 100 sequences: like the training ones (3 to 20 steps); then longer ones (14 to 20,
    # serving refuses more than the model reads); for long format, like them, then with x shifted.
    windows_of = {
        listed: [sequences(100, seed=11), sequences(100, seed=12, lengths=(14, 20))],
        long: [sequences(100, seed=13, width=2), sequences(100, seed=14, width=2, shift=1.0)],
    }
    for model, signature, flat in ((listed, sequence_signature(1), True),
                                   (long, sequence_signature(2), False)):
        for index, found in enumerate(windows_of[model]):
            serve_log(db_url, model, signature, sequence_bodies(found, flat=flat),
                      answers_of(100, seed=index, per_request=10))

    run_pass(monitor=monitor)
    for model, names in ((listed, ["mean(steps)", "length"]), (long, ["mean(x)", "mean(noise)", "length"])):
        calm, shifted = windows(monitor, model)
        for window in (calm, shifted):
            assert (window.status, window.rows) == ("ok", 100), window.message
            assert [f["name"] for f in window.features] == names
            assert all(f["kind"] == "numerical" for f in window.features)
            # Every sequence fits: none counts as a row of another width.
            assert window.quality["widths"] == {} and window.quality["schema_mismatch_share"] == 0
            assert window.quality["checked_rows"] == 100 and window.quality["missing_share"] == 0
            assert window.quality["reference_rows"] == 400  # one summary per training sequence
            assert window.prediction_drift is not None  # against the training sequences' target
        assert calm.dataset_drift is False and not any(f["drifted"] for f in calm.features)
        assert gauge(monitor, "shipyard_window_schema_mismatch_share", model=model, version="1") == 0.0
    _, longer = windows(monitor, listed)
    assert by_name(longer)["length"]["drifted"] is True
    _, moved = windows(monitor, long)
    assert {f["name"] for f in moved.features if f["drifted"]} == {"mean(x)"}


def test_sequences_of_another_step_width_and_versions_without_sequence_params(make_monitor, db_url, data):
    monitor = make_monitor(db_url, window={"rows": 50})
    platform = monitor.settings.platform
    model = register(platform, dataset="seq_long", data=data, features=["x", "noise"], target="sign",
                     signature=sequence_signature(2), job={"sequence": {"id": "id", "step": "t"}})
    wide = sequence_bodies(sequences(40, seed=21, width=3), flat=False)  # a client's third column
    serve_log(db_url, model, sequence_signature(3), wide, answers_of(40, seed=0, per_request=10))
    narrow = sequence_bodies(sequences(10, seed=22, width=2), flat=False)
    serve_log(db_url, model, sequence_signature(2), narrow, answers_of(10, seed=1, per_request=10))
    # Without its run's params: a list column its features name is read as such; long format is not.
    unsaid = register(platform, dataset="seq_list", data=data, features=["steps"], target="sign",
                      signature=sequence_signature(1))
    serve_log(db_url, unsaid, sequence_signature(1), sequence_bodies(sequences(50, seed=23), flat=True),
              answers_of(50, seed=2, per_request=10))
    orphan = register(platform, dataset="seq_long", data=data, features=["x", "noise"], target="sign",
                      signature=sequence_signature(2))
    long_rows = sequence_bodies(sequences(50, seed=24, width=2), flat=False)
    serve_log(db_url, orphan, sequence_signature(2), long_rows, answers_of(50, seed=3, per_request=10))
    # The trainer's shipyard.sequence tag says where they are without the run's params.
    tagged = register(platform, dataset="seq_long", data=data, features=["x", "noise"], target="sign",
                      signature=sequence_signature(2),
                      sequence=SequenceLayout(id="id", step="t", features=("x", "noise"), max_length=20))
    serve_log(db_url, tagged, sequence_signature(2), long_rows, answers_of(50, seed=3, per_request=10))
    misplaced = register(platform, dataset="seq_long", data=data, features=["x", "noise"], target="sign",
                         signature=sequence_signature(2), sequence=SequenceLayout(id="id", step="when"))
    serve_log(db_url, misplaced, sequence_signature(2), long_rows, answers_of(50, seed=3, per_request=10))

    run_pass(monitor=monitor)
    [window] = windows(monitor, model)
    assert window.status == "schema_change" and window.quality["widths"] == {"3": 40}
    assert window.quality["expected_width"] == 2 and window.quality["schema_mismatch_share"] == 0.8
    assert "40 of 50 rows do not have steps of 2 values (40 of width 3)" in window.message
    [read] = windows(monitor, unsaid)
    assert read.status == "ok" and [f["name"] for f in read.features] == ["mean(steps)", "length"]
    [error] = windows(monitor, orphan)
    assert error.status == "error" and "no data.sequence params" in error.message
    [by_tag] = windows(monitor, tagged)
    assert by_tag.status == "ok", by_tag.message
    assert [f["name"] for f in by_tag.features] == ["mean(x)", "mean(noise)", "length"]
    [wrong] = windows(monitor, misplaced)
    assert wrong.status == "error" and "there is no column(s) ['when']" in wrong.message, wrong.message
