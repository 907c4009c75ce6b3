"""Real-world tables (issue 16): categorical columns and missing values, encoded and filled with what the
training rows alone say, inside the exported graph, so that serving answers raw rows with strings and nulls.

The frame is breast_cancer with a binned string column (``size``, with holes), a random categorical column
(``city``, embedded), holes in two numeric columns, and a category (``grade`` ``"rare"``) that only the
test rows hold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.datasets import load_breast_cancer

from services.serving.core.convert import column_array, table_columns
from services.serving.core.requests import JsonTensor
from services.serving.runtimes.base import Signature
from services.serving.runtimes.loader import load_runtime
from services.serving.settings import ServingSettings
from services.trainer.app import create_app
from services.trainer.engines import crossval, engine, export, preprocess
from services.trainer.engines.tracking import COLUMN_PARAM_FIELDS, Tracking, column_params, flatten
from services.trainer.engines.types import FitContext, TabularData
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.errors import InvalidInput, ShipyardError
from shipyard_common.lineage import TAG_FORMAT
from tests.services.serving.support import serving
from tests.services.trainer.support import WorkerProcess, trainer_settings
from tests.services.trainer.table_data import DECLARED, table_frame, table_job_spec
from tests.support import auth, running_app, running_mlflow, wait_for


def spec(**data: Any) -> JobCreate:
    return JobCreate.model_validate({
        "model_name": "m", "training": {"epochs": 4, "seed": 0},
        "data": {"dataset": "t", "rev": "a" * 40, "task": "classification", "target": "target",
                 "split": {"column": "part"}, "columns": DECLARED, **data},
    })


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return table_frame()


def test_encodings_and_fill_values_are_fitted_on_the_training_rows_only(frame):
    data = engine.prepare_data(frame, spec())
    assert data.table is not None
    columns = {column.name: column for column in data.table.columns}
    train = frame[frame["part"] == "train"]
    assert columns["size"].inferred and columns["size"].categories == ("large", "medium", "small")
    assert columns["grade"].categories == ("a",)  # "rare" is in the test rows only: it is unknown
    assert not columns["city"].inferred and columns["city"].embedding_dim == 3
    assert columns["mean texture"].fill == pytest.approx(train["mean texture"].median())
    assert columns["worst area"].fill == pytest.approx(train["worst area"].mean())
    assert columns["mean radius"].fill == pytest.approx(train["mean radius"].mean())
    # One-hot slots: the categories, (unknown), (missing); the embedded column is one index.
    assert data.x_train.shape[1] == 30 + (3 + 2) + 1 + (1 + 2) and not np.isnan(data.x_train).any()
    grade = data.table.columns.index(columns["grade"])
    start = sum(column.width for column in data.table.columns[:grade])
    test_rows = frame[frame["part"] == "test"]
    unknown = data.x_test[:, start + 1]  # the slot after "a"
    np.testing.assert_array_equal(unknown, (test_rows["grade"] == "rare").to_numpy(dtype=np.float32))
    described = {c["name"]: c for c in data.table.describe()}
    assert described["size"]["slots"] == ["large", "medium", "small", "(unknown)", "(missing)"]


def test_the_exported_graph_takes_raw_columns_and_computes_what_pytorch_does(frame, tmp_path):
    import onnxruntime as ort

    job = spec()
    data = engine.prepare_data(frame, job)
    result = engine.train(data, job, device="cpu")
    assert result.metrics["val_accuracy"] >= 0.85
    assert data.val_frame is not None and data.table is not None
    done = export.export_onnx(result.model, task=data.task, example=export.example_input(data),
                              path=tmp_path / "model.onnx", check_rows=data.x_val, classes=data.classes,
                              table=data.table, check_frame=data.val_frame)
    assert done.max_abs_diff <= 1e-5
    inputs = {item["name"]: item for item in done.signature["inputs"]}
    assert inputs["size"] == {"name": "size", "shape": [None], "dtype": "string", "nullable": True}
    assert inputs["mean texture"]["dtype"] == "float32" and inputs["mean texture"]["nullable"] is True
    # Rows the training never saw: unseen categories, nulls everywhere a null can be.
    raw = frame[frame["part"] == "test"].head(20).drop(columns=["target", "part"]).reset_index(drop=True)
    raw.loc[0, "size"], raw.loc[1, "city"], raw.loc[2, "size"] = "enormous", "tokyo", None
    raw.loc[3, ["mean texture", "worst area", "mean radius"]] = np.nan
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, preprocess.raw_inputs(data.table, raw))
    encoded = preprocess.encode(data.table, raw)
    from_torch = engine.predict_rows(export.ServingModule(result.model, data.task), encoded, job)
    assert encoded.shape == (20, data.x_train.shape[1])
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)


def cv_spec(**changes: Any) -> JobCreate:
    """:func:`spec` with 3-fold cross-validation."""
    return JobCreate.model_validate({**spec().model_dump(mode="json"), "evaluation": {"kfold": 3}, **changes})


def with_a_category_one_fold_holds(frame: pd.DataFrame, job: JobCreate) -> tuple[pd.DataFrame, np.ndarray]:
    """``frame`` with a column ``batch``: ``"usual"``, but ``"solo"`` on five training rows that
    cross-validation's first fold holds out (so no fold trains on them but the other two); and those
    rows' positions in the dataset."""
    data = engine.prepare_data(frame, job)
    (_, held), *_ = crossval.cuts(data, job)
    solo = np.asarray(data.rows["train"])[held[:5]]
    batch = np.full(len(frame), "usual", dtype=object)
    batch[solo] = "solo"
    return frame.assign(batch=batch), solo


def fit_context(job: JobCreate, frame: pd.DataFrame, workdir: Path) -> FitContext:
    """What the worker hands the engine, minus MLflow: callbacks that record nothing."""
    for name in ("checkpoints", "tensorboard"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    return FitContext(spec=job, frame=frame, device="cpu", workdir=workdir, observer=lambda *_: None,
                      checkpoint_dir=workdir / "checkpoints", checkpoint_saved=lambda: None, resume_dir=None,
                      tensorboard_dir=workdir / "tensorboard", plan=lambda _: None)


def record_folds(monkeypatch: pytest.MonkeyPatch) -> list[TabularData]:
    """The rows each fold trains on, as cross-validation hands them to the engine (which still trains)."""
    trained: list[TabularData] = []
    train = engine.train

    def recorded(fold: TabularData, *args: Any, **kwargs: Any) -> Any:
        trained.append(fold)
        return train(fold, *args, **kwargs)

    monkeypatch.setattr(crossval.engine, "train", recorded)
    return trained


def test_each_cross_validation_fold_fits_the_encoding_on_its_own_training_rows(frame, tmp_path, monkeypatch):
    job = cv_spec()
    table, solo = with_a_category_one_fold_holds(frame, job)
    data = engine.prepare_data(table, job)
    cuts = crossval.cuts(data, job)
    trained = record_folds(monkeypatch)
    folds = crossval.cross_validate(data, fit_context(job, table, tmp_path), cuts)

    assert len(folds) == len(trained) == 3 and all(f.metrics["val_accuracy"] > 0.5 for f in folds)
    first = trained[0]
    assert first.table is not None
    columns = {column.name: column for column in first.table.columns}
    assert columns["batch"].categories == ("usual",)  # "solo" is only in this fold's held-out rows
    start = sum(column.width for column in first.table.columns[:first.table.columns.index(columns["batch"])])
    held_out = np.asarray(data.rows["train"])[cuts[0][1]]
    unknown = first.x_val[:, start + 1]  # the slot after "usual": (unknown), as serving encodes it
    np.testing.assert_array_equal(unknown, np.isin(held_out, solo).astype(np.float32))
    assert unknown.sum() == len(solo) and first.x_train.shape[1] == first.x_val.shape[1] == first.table.width
    fold_rows = table.iloc[np.asarray(data.rows["train"])[cuts[0][0]]]
    assert columns["worst area"].fill == pytest.approx(fold_rows["worst area"].mean())
    assert columns["mean texture"].fill == pytest.approx(fold_rows["mean texture"].median())
    for other in trained[1:]:  # the folds that train on the "solo" rows know it
        assert other.table is not None
        assert next(c for c in other.table.columns if c.name == "batch").categories == ("solo", "usual")
    # The job's own encoding, the registered model's, is fitted on every training row.
    assert data.table is not None
    whole = {column.name: column for column in data.table.columns}
    assert whole["batch"].categories == ("solo", "usual")
    assert whole["worst area"].fill != pytest.approx(columns["worst area"].fill)


def test_fine_tuning_encodes_with_the_parents_table_in_the_job_and_every_fold(frame, tmp_path, monkeypatch):
    """The parent's weights mean its slots: a child whose rows hold other categories (as many, so that
    the widths agree and nothing would fail) or whose fold lacks one keeps the parent's encoding."""
    parent = engine.prepare_data(frame, spec()).table
    assert parent is not None
    described = json.loads(json.dumps(parent.describe()))  # as columns.json holds it
    assert preprocess.table_of(described, where="columns.json") == parent
    child_frame = frame.assign(size=frame["size"].replace({"small": "tiny"}))  # three categories still
    refitted = engine.prepare_data(child_frame, spec()).table
    assert refitted is not None and refitted != parent  # what a refit would train the parent's weights on
    child = engine.prepare_data(child_frame, spec(), parent_table=preprocess.table_of(described, where="x"))
    assert child.table == parent
    size = next(column for column in parent.columns if column.name == "size")
    start = sum(column.width for column in parent.columns[:parent.columns.index(size)])
    tiny = (child_frame["size"] == "tiny").to_numpy()[np.asarray(child.rows["train"])]
    unknown = child.x_train[:, start + len(size.categories)]  # "tiny" is no category of the parent's
    np.testing.assert_array_equal(unknown, tiny.astype(np.float32))
    assert tiny.any()

    job = cv_spec()
    solo_frame, _ = with_a_category_one_fold_holds(frame, job)
    with_solo = engine.prepare_data(solo_frame, job)  # the parent: fitted on rows that hold "solo"
    assert with_solo.table is not None
    context = dataclasses.replace(fit_context(job, solo_frame, tmp_path),
                                  initial_columns=with_solo.table.describe())
    trained = record_folds(monkeypatch)
    crossval.cross_validate(with_solo, context, crossval.cuts(with_solo, job))
    assert [fold.table for fold in trained] == [with_solo.table] * 3  # the first fold too, which lacks "solo"

    other_features = frame.drop(columns=["size"])
    lacks_size = r"init_from: .* differ \(this job lacks \['size'\] and adds \[\]\)"
    with pytest.raises(InvalidInput, match=lacks_size):
        engine.prepare_data(other_features, spec(), parent_table=parent)
    with pytest.raises(InvalidInput, match="does not describe a table's columns"):
        preprocess.table_of([{"name": "size", "type": "categorical"}], where="columns.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"columns": {"size": {"type": "numeric", "encoding": "onehot"}}}, "categorical columns only"),
        ({"columns": {"size": {"type": "categorical", "impute": "mean"}}}, "not available for a categorical"),
        ({"columns": {"size": {"type": "categorical", "impute": "constant"}}}, "needs a fill_value"),
        ({"columns": {"target": {"type": "numeric"}}}, "not feature columns"),
    ],
)
def test_bad_declarations_are_refused_by_the_schema(changes, message):
    with pytest.raises(ValidationError, match=message):
        spec(**changes)


def test_formats_and_frameworks_that_cannot_take_strings_are_refused():
    base = {"model_name": "m", "data": {"dataset": "t", "rev": "a" * 40, "task": "classification",
                                        "target": "target", "columns": DECLARED}}
    refused = r"cannot be exported to \['torchscript'\]: .* a TorchScript model takes tensors of numbers"
    with pytest.raises(ValidationError, match=refused):
        JobCreate.model_validate({**base, "exports": ["onnx", "torchscript"]})
    assert JobCreate.model_validate({**base, "exports": ["onnx", "onnx_int8"]}).exports[-1] == "onnx_int8"
    with pytest.raises(ValidationError, match="need framework 'pytorch'"):
        JobCreate.model_validate({**base, "framework": "keras"})
    # Undeclared: the data calls for a table, and the engine refuses the same way.
    undeclared = JobCreate.model_validate({**base, "data": {**base["data"], "columns": None},
                                           "exports": ["onnx", "torchscript"]})
    with pytest.raises(InvalidInput, match="categorical columns or missing values"):
        engine.prepare_data(table_frame().drop(columns="part"), undeclared)


@pytest.mark.parametrize(
    ("mutate", "columns", "message"),
    [
        (lambda f: f.assign(**{"mean radius": f["mean radius"].astype(object).where(f.index != 3, "big")}),
         {"mean radius": {"type": "numeric"}}, "is numeric but holds 'big'"),
        (lambda f: f, {"worst area": {"type": "numeric", "impute": "none"}}, "impute 'none'"),
        (lambda f: f.assign(target=f["target"].where(f.index != 5, None)), {}, "target 'target' has missing"),
        (lambda f: f.assign(when=pd.Timestamp("2026-01-01")), {}, "dates or durations"),
    ],
)
def test_data_the_declarations_cannot_take_is_refused_with_a_reason(frame, mutate, columns, message):
    with pytest.raises(InvalidInput) as caught:
        engine.prepare_data(mutate(frame.copy()), spec(columns=columns or None))
    assert message in caught.value.message


def test_numbers_and_booleans_without_nulls_stay_one_float_input_and_booleans_in_a_table_are_categories():
    plain = load_breast_cancer(as_frame=True).frame.assign(flag=lambda f: f["mean radius"] > 14)
    undeclared = spec(columns=None, split=None)
    assert engine.prepare_data(plain, undeclared).table is None
    with_gap = plain.assign(**{"mean area": plain["mean area"].where(plain.index != 7)})
    table = engine.prepare_data(with_gap, undeclared).table
    assert table is not None
    flag = next(column for column in table.columns if column.name == "flag")
    assert flag.categorical and flag.categories == ("False", "True")


def test_too_many_categories_for_onehot_are_refused_and_embedding_takes_them(frame, monkeypatch):
    monkeypatch.setattr(preprocess, "ONEHOT_MAX_CATEGORIES", 50)
    coded = frame.assign(code=[f"c{i % 200}" for i in range(len(frame))])
    with pytest.raises(InvalidInput, match="more than onehot takes \\(50\\); declare encoding 'embedding'"):
        engine.prepare_data(coded, spec(columns={"code": {"type": "categorical"}}))
    embedded = {"code": {"type": "categorical", "encoding": "embedding"}}
    data = engine.prepare_data(coded, spec(columns=embedded))
    train_codes = set(coded.loc[coded["part"] == "train", "code"])
    assert data.table is not None and set(data.table.columns[-1].categories) == train_codes
    assert len(train_codes) == 120  # of 200: those of the training rows


def test_serving_turns_rows_of_strings_and_nulls_into_columns_and_names_what_is_wrong():
    signature = Signature.from_json({
        "inputs": [{"name": "size", "shape": [None], "dtype": "string", "nullable": True},
                   {"name": "age", "shape": [None], "dtype": "float32", "nullable": True}],
        "outputs": [{"name": "probabilities", "shape": [None, 2], "dtype": "float32"}],
    })
    columns = table_columns([["big", None], {"age": 3}, {"size": 7, "age": 1.5}], signature)
    assert columns is not None
    size, age = (column_array(columns[name], spec) for name, spec in
                 (("size", signature.inputs[0]), ("age", signature.inputs[1])))
    assert size.tolist() == ["big", "", "7"] and size.dtype == object
    np.testing.assert_array_equal(age, np.array([np.nan, 3.0, 1.5], dtype=np.float32))
    refusals = [
        (lambda: table_columns([{"sise": "big"}], signature), "unknown column(s) ['sise']"),
        (lambda: table_columns([["big"]], signature), "a list of 2 values"),
        (lambda: column_array(JsonTensor(["3 years"]), signature.inputs[1]), "row 0 is str '3 years'"),
        (lambda: column_array(JsonTensor([True]), signature.inputs[1]), "row 0 is bool"),
        (lambda: column_array(JsonTensor([["a", "b"]]), signature.inputs[0]), "row 0 is list"),
    ]
    for refused, message in refusals:
        with pytest.raises(ShipyardError) as caught:
            refused()
        assert message in caught.value.message


def test_oip_v2_takes_bytes_columns_as_json_or_binary_and_refuses_broken_elements():
    from services.serving.protocols.v2 import decode_infer_request

    texts = ["big", "", "\u00e9t\u00e9"]
    binary = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    header = json.dumps({"inputs": [
        {"name": "size", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(binary)}},
        {"name": "age", "shape": [3], "datatype": "FP32", "data": [1.5, None, 3]},
        {"name": "city", "shape": [3], "datatype": "BYTES", "data": ["paris", None, "lyon"]},
    ]}).encode()
    decoded = decode_infer_request(header + binary, str(len(header))).inputs
    assert isinstance(decoded["size"], np.ndarray) and decoded["size"].tolist() == texts
    assert isinstance(decoded["city"], JsonTensor) and decoded["city"].dtype == np.dtype(object)
    broken = json.dumps({"inputs": [{"name": "size", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    with pytest.raises(InvalidInput, match="runs past its data"):
        decode_infer_request(broken + (9).to_bytes(4, "little") + b"ab", str(len(broken)))


# -- end to end: the trainer's API and worker, MLflow's registry, serving over HTTP --------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, Any]]:
    """A private MLflow (so that serving loads this module's model alone), the trainer's API and a worker,
    and the table as a versioned dataset."""
    state = tmp_path_factory.mktemp("tables")
    with running_mlflow(state, redis_url=redis_url) as platform:
        settings = trainer_settings(platform)
        frame = table_frame()
        rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("tables", frame).rev
        worker = WorkerProcess(settings, state / "worker.log")
        try:
            with running_app(create_app(settings)) as base:
                yield {"platform": platform, "base": base, "rev": rev, "frame": frame, "worker": worker}
        finally:
            worker.stop()


def table_job(stack: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return table_job_spec(rev=stack["rev"], model_name="tables", **{"training__epochs": 8, **changes})


def mlflow(stack: dict[str, Any]) -> Any:
    from mlflow.tracking import MlflowClient

    uri = stack["platform"].mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_job(stack: dict[str, Any], body: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Submit ``body`` to the trainer's API, wait for the worker to succeed, and download the run's
    ``model/`` folder (the registered version's files) into ``folder``."""
    created = httpx.post(f"{stack['base']}/jobs", json=body, headers=auth(Role.TRAINER))
    assert created.status_code == 201, created.text

    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{stack['base']}/jobs/{created.json()['id']}", headers=auth(Role.VIEWER)).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    job: dict[str, Any] = wait_for(ended, timeout=240, interval=0.5, what="the table job to end")
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    downloaded = mlflow(stack).download_artifacts(job["mlflow_run_id"], "model", str(folder))
    return {**job, "folder": Path(downloaded)}


@pytest.fixture(scope="module")
def trained(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    job = run_job(stack, table_job(stack), tmp_path_factory.mktemp("table-model"))
    mlflow(stack).set_registered_model_alias("tables", "production", job["model_version"])
    return job


@pytest.fixture(scope="module")
def cross_validated(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A second table job, cross-validated in 3 folds and exported to onnx and onnx_int8, on the table
    with a category (``batch`` ``"solo"``) that only the first fold's held-out rows hold."""
    body = table_job_spec(rev="0" * 40, dataset="tables-cv", model_name="tables-cv", training__epochs=8,
                          exports=["onnx", "onnx_int8"])
    body["evaluation"] = {"kfold": 3}
    frame, solo = with_a_category_one_fold_holds(stack["frame"], JobCreate.model_validate(body))
    platform = stack["platform"]
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    body["data"]["rev"] = repo.add("tables-cv", frame).rev
    job = run_job(stack, body, tmp_path_factory.mktemp("cv-model"))
    return {**job, "frame": frame, "solo": solo, "dataset_rev": body["data"]["rev"]}


def unseen_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Test rows as a client sends them: JSON objects, an unseen category, nulls, a category only the
    test rows hold."""
    rows = frame[frame["part"] == "test"].head(6).drop(columns=["target", "part"]).astype(object)
    found = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
             for row in rows.to_dict(orient="records")]
    found[0]["size"], found[1]["city"], found[2]["size"] = "enormous", "tokyo", None
    found[3]["mean texture"] = found[3]["worst area"] = None
    found[4]["grade"] = "rare"
    del found[5]["city"]  # an absent column is a null too
    return found


def onnx_answer(folder: Path, rows: list[dict[str, Any]], fmt: str = "onnx") -> np.ndarray:
    """The exported file's own answer, from onnxruntime directly, for the rows the client sent."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / fmt / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for arg in session.get_inputs():
        values = [row.get(arg.name) for row in rows]
        feeds[arg.name] = (np.array(["" if v is None else str(v) for v in values], dtype=object)
                           if arg.type == "tensor(string)" else
                           np.array([np.nan if v is None else v for v in values], dtype=np.float32))
    (answer,) = session.run(None, feeds)
    return answer  # type: ignore[no-any-return]


def client_columns(rows: list[dict[str, Any]], frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The rows' columns as serving hands them to the runtime: a column of strings as text (``""`` for
    null), a column of numbers as float32 (NaN for null)."""
    names = [name for name in frame.columns if name not in ("target", "part")]
    return {name: np.array(["" if row.get(name) is None else str(row[name]) for row in rows], dtype=object)
            if frame[name].dtype == object else
            np.array([np.nan if row.get(name) is None else row[name] for row in rows], dtype=np.float32)
            for name in names}


def test_a_table_trains_through_the_worker_and_records_its_columns(trained, stack):
    assert trained["metrics"]["val_accuracy"] >= 0.85 and trained["metrics"]["onnx_max_abs_diff"] <= 1e-5
    columns = {c["name"]: c for c in json.loads((trained["folder"] / "columns.json").read_text())["columns"]}
    assert columns["size"]["inferred"] and columns["size"]["type"] == "categorical"
    assert columns["size"]["categories"] == ["large", "medium", "small"]
    assert columns["grade"]["categories"] == ["a"]  # fitted on the training rows only
    assert columns["city"]["encoding"] == "embedding" and not columns["city"]["inferred"]
    assert columns["mean texture"]["impute"] == "median" and columns["worst area"]["impute"] == "mean"
    signature = json.loads((trained["folder"] / "signature.json").read_text())
    by_name = {item["name"]: item for item in signature["inputs"]}
    assert by_name["size"]["dtype"] == "string" and by_name["worst area"]["nullable"] is True


def test_the_runs_params_carry_each_column_as_declared_or_inferred(trained, stack):
    params = mlflow(stack).get_run(trained["mlflow_run_id"]).data.params
    assert params["columns.size.type"] == "categorical" and params["columns.size.inferred"] == "True"
    assert params["columns.size.encoding"] == "onehot" and params["columns.size.impute"] == "missing_category"
    assert params["columns.city.encoding"] == "embedding" and params["columns.city.embedding_dim"] == "3"
    assert params["columns.mean texture.impute"] == "median"
    assert params["columns.mean texture.inferred"] == "False"
    assert params["columns.worst area.type"] == "numeric" and params["columns.worst area.impute"] == "mean"
    assert "columns.worst area.encoding" not in params
    # Every column of the version's columns.json, field for field; the spec's declaration as it was.
    columns = json.loads((trained["folder"] / "columns.json").read_text())["columns"]
    assert len(columns) == len(stack["frame"].columns) - 2
    for column in columns:
        for field in COLUMN_PARAM_FIELDS:
            if column.get(field) is not None:
                assert params[f"columns.{column['name']}.{field}"] == str(column[field])
    assert params["data.columns.city.impute"] == "null"  # left to inference: what it gave is columns.*
    assert params["columns.city.impute"] == "missing_category"


def test_column_names_mlflow_refuses_as_keys_are_logged_under_keys_it_takes(stack):
    from mlflow.exceptions import MlflowException

    client = mlflow(stack)
    tracking = Tracking(stack["platform"].mlflow_tracking_uri)
    run_id = tracking.start_run(experiment="tables-params", run_name="column names", tags={})
    with pytest.raises(MlflowException, match="Invalid value"):  # what a column named so did to a job
        client.log_param(run_id, "columns.weight (kg).type", "numeric")
    names = ["plain", "weight (kg)", "a/b", "a_b", "../up", "x" * 256, "prix\u20ac"]
    declared = flatten({"data": {"columns": {name: {"type": "numeric"} for name in names}}})
    fitted = column_params([{"name": name, "type": "numeric", "impute": "mean", "fill_value": float(i),
                             "inferred": False} for i, name in enumerate(names)])
    tracking.log_params(run_id, {**declared, **fitted})
    tracking.log_params(run_id, fitted)  # a worker taking the job over logs the same again
    logged = client.get_run(run_id).data.params
    assert logged == {**declared, **fitted}
    fills = {key: value for key, value in logged.items() if key.endswith(".fill_value")}
    assert sorted(fills.values()) == [str(float(i)) for i in range(len(names))]  # one key per column
    assert logged["columns.plain.fill_value"] == "0.0" and logged["data.columns.plain.type"] == "numeric"
    assert all(len(key) <= 250 for key in logged)


def test_a_cross_validated_table_registers_the_encoding_fitted_on_every_training_row(cross_validated):
    metrics = cross_validated["metrics"]
    assert metrics["cv_accuracy_mean"] >= 0.8 and metrics["val_accuracy"] >= 0.85
    columns = {c["name"]: c for c in json.loads((cross_validated["folder"] / "columns.json").read_text())[
        "columns"]}
    assert columns["batch"]["categories"] == ["solo", "usual"]  # the first fold alone did not know "solo"


def test_a_cross_validated_table_fine_tunes_from_its_version_though_a_fold_lacks_a_category(
    cross_validated, stack, tmp_path
):
    parent = {"model_name": "tables-cv", "version": str(cross_validated["model_version"])}
    body = table_job_spec(rev=cross_validated["dataset_rev"], dataset="tables-cv", model_name="tables-cv",
                          training__epochs=2, init_from=parent)
    body["evaluation"] = {"kfold": 3}  # the first fold's training rows hold no "solo"
    child = run_job(stack, body, tmp_path)
    parent_columns = json.loads((cross_validated["folder"] / "columns.json").read_text())
    assert json.loads((child["folder"] / "columns.json").read_text()) == parent_columns
    assert child["metrics"]["cv_accuracy_mean"] >= 0.8 and child["metrics"]["val_accuracy"] >= 0.85


def test_a_table_model_registers_an_int8_file_that_takes_raw_rows_within_tolerance(cross_validated, stack):
    folder, metrics, frame = cross_validated["folder"], cross_validated["metrics"], cross_validated["frame"]
    assert metrics["int8_kept"] == 1.0 and (folder / "onnx_int8" / "model.onnx").is_file()
    assert metrics["fp32_accuracy"] - metrics["int8_accuracy"] <= 0.01  # training.quantization_tolerance
    tags = mlflow(stack).get_model_version("tables-cv", cross_validated["model_version"]).tags
    assert tags[TAG_FORMAT] == "onnx_int8"
    # The network's weights are int8; the encoding in front of it is left as it was (exact).
    import onnx

    nodes = onnx.load(str(folder / "onnx_int8" / "model.onnx")).graph.node
    assert sum(node.op_type == "MatMulInteger" for node in nodes) == 3  # the MLP's three Linear layers
    encoding = [node for node in nodes if node.name.startswith(preprocess.GRAPH_PREFIX)]
    assert {node.op_type for node in encoding} >= {"LabelEncoder", "Gather", "IsNaN", "Where", "Concat"}
    assert not any("Quantize" in node.op_type for node in encoding)  # its onehot Gather was, untold
    # Every test row as a client sends it (strings, nulls): both files score what the job recorded.
    test = frame[frame["part"] == "test"]
    rows = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in test.drop(columns=["target", "part"]).astype(object).to_dict(orient="records")]
    for fmt, recorded in (("onnx", "fp32_accuracy"), ("onnx_int8", "int8_accuracy")):
        answers = onnx_answer(folder, rows, fmt)
        assert float(np.mean(answers.argmax(axis=1) == test["target"].to_numpy())) == pytest.approx(
            metrics[recorded], abs=1e-9)
    # Serving's loader opens the int8 file (the version's format) and answers unseen categories and nulls.
    unseen = unseen_rows(frame)
    loaded = load_runtime(folder.parent, name="tables-cv", version=cross_validated["model_version"],
                          tags=tags, settings=ServingSettings())
    try:
        assert loaded.runtime.format == "onnx_int8"
        served = loaded.runtime.predict(client_columns(unseen, frame))["probabilities"]
    finally:
        loaded.runtime.close()
    np.testing.assert_allclose(served, onnx_answer(folder, unseen, "onnx_int8"), atol=1e-6)
    np.testing.assert_allclose(served, onnx_answer(folder, unseen), atol=0.05)


def test_serving_answers_raw_rows_with_unseen_categories_and_nulls_as_the_model_does(trained, stack):
    rows = unseen_rows(stack["frame"])
    expected = onnx_answer(trained["folder"], rows)
    names = [c for c in stack["frame"].columns if c not in ("target", "part")]
    with serving(stack["platform"]) as base:
        status = httpx.get(f"{base}/v1/models/tables", headers=auth(Role.VIEWER)).json()
        shown = {item["name"]: item for item in status["inputs"]}
        assert shown["size"] == {"name": "size", "dtype": "string", "shape": [None]}
        assert shown["mean radius"]["dtype"] == "float32" and len(shown) == len(stack["frame"].columns) - 2
        described = {column["name"]: column for column in status["columns"]}  # the version's columns.json
        assert described["size"]["categories"] == ["large", "medium", "small"]
        assert described["size"]["type"] == "categorical" and described["mean texture"]["impute"] == "median"
        url = f"{base}/v1/models/tables/predict"
        as_objects = httpx.post(url, json={"inputs": rows}, headers=auth(Role.VIEWER))
        assert as_objects.status_code == 200, as_objects.text
        np.testing.assert_allclose(np.array(as_objects.json()["outputs"]), expected, atol=1e-6)
        as_lists = httpx.post(url, json={"inputs": [[row.get(n) for n in names] for row in rows]},
                              headers=auth(Role.VIEWER))
        np.testing.assert_allclose(np.array(as_lists.json()["outputs"]), expected, atol=1e-6)

        kinds = {n: "BYTES" if stack["frame"][n].dtype == object else "FP32" for n in names}
        v2 = httpx.post(f"{base}/v2/models/tables/infer", headers=auth(Role.VIEWER), json={"inputs": [
            {"name": n, "shape": [len(rows)], "datatype": kinds[n], "data": [row.get(n) for row in rows]}
            for n in names]})
        assert v2.status_code == 200, v2.text
        [output] = v2.json()["outputs"]
        np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]), expected, atol=1e-6)

        tf = httpx.post(f"{base}/v1/models/tables:predict", json={"instances": rows[:5]},
                        headers=auth(Role.VIEWER))
        assert tf.status_code == 200, tf.text
        np.testing.assert_allclose(np.array(tf.json()["predictions"]), expected[:5], atol=1e-6)

        refused = httpx.post(url, json={"inputs": [{**rows[0], "mean radius": "large"}]},
                             headers=auth(Role.VIEWER))
        assert refused.status_code == 422 and "'mean radius' row 0 is str" in refused.text, refused.text
        infinite = httpx.post(f"{base}/v2/models/tables/infer", headers=auth(Role.VIEWER), json={"inputs": [
            {"name": n, "shape": [1], "datatype": kinds[n],
             "data": [1e39 if n == "mean radius" else rows[0].get(n)]} for n in names]})
        assert infinite.status_code == 400 and "beyond the model's float32 range" in infinite.text


def test_a_bad_declaration_is_a_422_that_says_what_is_wrong(stack):
    bad = table_job(stack, data__columns={"size": {"type": "categorical", "impute": "median"}})
    refused = httpx.post(f"{stack['base']}/jobs", json=bad, headers=auth(Role.TRAINER))
    assert refused.status_code == 422
    assert "impute 'median' is not available for a categorical column" in refused.text
