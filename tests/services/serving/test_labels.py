"""Class labels from training to every protocol's answer (issue 16: inputs and outputs people expect).

A classifier trained by the real trainer (its API and a Celery worker) on iris with the species
written as names, and a regressor on diabetes, both registered and served: the version's
``signature.json`` records the labels and feature names, and ours, OIP v2 (Triton's
classification extension, JSON and binary, read with tritonclient) and TF Serving REST
(``:classify``) answer with them; each model's GET lists them. The regressor answers without labels,
and a classification request for it is a clear 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as triton
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_diabetes, load_iris
from tritonclient.utils import InferenceServerException

from shipyard_common.datasets import DataRepo
from tests.services.registry.model_factory import unique_name
from tests.services.serving.support import serving, serving_platform, train_for_production
from tests.services.trainer.support import job_spec
from tests.support import auth, free_port, wait_for

VIEWER = auth("viewer")
GRPC_VIEWER = {key.lower(): value for key, value in VIEWER.items()}  # gRPC metadata keys are lower case
SPECIES = ["setosa", "versicolor", "virginica"]


def iris_with_names() -> pd.DataFrame:
    """Iris with its target written as the species' names, as a person would write them."""
    iris = load_iris(as_frame=True)
    frame = iris.frame.drop(columns="target")
    frame["species"] = np.asarray(iris.target_names)[iris.target]
    return frame


def iris_table() -> pd.DataFrame:
    """Iris with a categorical string column too: a table whose model takes one input per column."""
    frame = iris_with_names()
    frame.insert(0, "colour", np.asarray(["red", "blue", "green"])[np.arange(len(frame)) % 3])
    return frame


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """A classifier (iris, species names) and a regressor (diabetes) trained by the trainer's worker,
    given the production alias, and a serving app answering for both."""
    state = tmp_path_factory.mktemp("labels")
    platform = serving_platform(state, redis_url=redis_url, mlflow_server=mlflow_server)
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    iris, diabetes, table = iris_with_names(), load_diabetes(as_frame=True).frame, iris_table()
    iris_rev, diabetes_rev = repo.add("iris_names", iris).rev, repo.add("diabetes", diabetes).rev
    table_rev = repo.add("iris_table", table).rev
    names = {key: unique_name(f"{key}-labels") for key in ("iris", "diabetes", "table")}
    specs = {
        "iris": job_spec(rev=iris_rev, dataset="iris_names", model_name=names["iris"], data__target="species",
                         training__epochs=80, training__learning_rate=0.01),
        "table": job_spec(rev=table_rev, dataset="iris_table", model_name=names["table"],
                          data__target="species", training__epochs=80, training__learning_rate=0.01),
        "diabetes": job_spec(rev=diabetes_rev, dataset="diabetes", model_name=names["diabetes"],
                             data__task="regression", training__epochs=5),
    }
    jobs = train_for_production(platform, specs, state)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    grpc_port = free_port()
    with serving(platform, max_batch_rows=256, grpc_port=grpc_port) as base:
        wait_for(lambda: all(httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).json().get("status")
                             == "serving" for name in names.values()), timeout=60, what="both models served")
        yield {"base": base, "names": names, "jobs": jobs, "client": client, "iris": iris,
               "diabetes": diabetes, "table": table, "grpc": f"127.0.0.1:{grpc_port}"}


def features_of(frame: pd.DataFrame, target: str) -> list[str]:
    return [column for column in frame.columns if column != target]


def rows_of(stack: dict[str, Any], key: str) -> np.ndarray:
    target = "species" if key == "iris" else "target"
    return stack[key][features_of(stack[key], target)].to_numpy(dtype=np.float32)


def test_the_trainer_records_labels_in_output_order_and_feature_names(stack: dict[str, Any], tmp_path: Path):
    client: MlflowClient = stack["client"]
    for key, target in (("iris", "species"), ("diabetes", "target")):
        run_id = stack["jobs"][key]["mlflow_run_id"]
        folder = Path(client.download_artifacts(run_id, "model", str(tmp_path / key)))
        signature = json.loads((folder / "signature.json").read_text())
        assert signature["features"] == features_of(stack[key], target)
        if key == "iris":
            # The sorted classes the model's outputs stand for, as the table wrote them.
            assert signature["labels"] == SPECIES == signature["classes"]
        else:
            assert "labels" not in signature


def test_ours_answers_labels_once_and_a_label_per_row(stack: dict[str, Any]):
    base, names = stack["base"], stack["names"]
    rows = rows_of(stack, "iris")
    response = httpx.post(f"{base}/v1/models/{names['iris']}/predict", json={"inputs": rows.tolist()},
                          headers=VIEWER)
    assert response.status_code == 200, response.text
    body = response.json()
    probabilities = np.asarray(body["outputs"])
    assert probabilities.shape == (150, 3)
    assert body["labels"] == SPECIES
    assert body["label"] == [SPECIES[i] for i in probabilities.argmax(axis=1)]
    # The labels stand for the right columns: the model names most flowers' species right.
    assert np.mean(np.asarray(body["label"]) == stack["iris"]["species"].to_numpy()) >= 0.9
    assert set(body) == {"model", "model_version", "outputs", "labels", "label"}

    regression = httpx.post(f"{base}/v1/models/{names['diabetes']}/predict",
                            json={"inputs": rows_of(stack, "diabetes")[:3].tolist()}, headers=VIEWER)
    assert regression.status_code == 200, regression.text
    assert set(regression.json()) == {"model", "model_version", "outputs"}


def test_get_of_a_model_lists_its_labels_and_features_in_every_protocol(stack: dict[str, Any]):
    base, names = stack["base"], stack["names"]
    iris_features = features_of(stack["iris"], "species")
    diabetes_features = features_of(stack["diabetes"], "target")

    ours = httpx.get(f"{base}/v1/models/{names['iris']}", headers=VIEWER).json()
    assert ours["labels"] == SPECIES and ours["features"] == iris_features
    ours = httpx.get(f"{base}/v1/models/{names['diabetes']}", headers=VIEWER).json()
    assert ours["labels"] is None and ours["features"] == diabetes_features
    listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", headers=VIEWER).json()}
    assert listed[names["iris"]]["labels"] == SPECIES

    v2 = httpx.get(f"{base}/v2/models/{names['iris']}", headers=VIEWER).json()
    assert v2["parameters"] == {"labels": SPECIES, "features": iris_features}
    v2 = httpx.get(f"{base}/v2/models/{names['diabetes']}", headers=VIEWER).json()
    assert v2["parameters"] == {"features": diabetes_features}
    assert "classification" in httpx.get(f"{base}/v2").json()["extensions"]

    tf = httpx.get(f"{base}/v1/models/{names['iris']}/metadata", headers=VIEWER).json()["metadata"]
    assert tf["labels"] == SPECIES and tf["features"] == iris_features
    tf = httpx.get(f"{base}/v1/models/{names['diabetes']}/metadata", headers=VIEWER).json()["metadata"]
    assert "labels" not in tf and tf["features"] == diabetes_features


def parse_classification(entry: str | bytes) -> tuple[float, int, str]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    score, index, label = text.split(":", 2)
    return float(score), int(index), label


def check_top_k(found: np.ndarray, probabilities: np.ndarray, k: int) -> None:
    """Each row's k entries are its k best classes, best first, as ``score:index:label``."""
    assert found.shape == (len(probabilities), k)
    for row, entries in zip(probabilities, found, strict=True):
        parsed = [parse_classification(entry) for entry in entries]
        indices = [index for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:k])
        for score, index, label in parsed:
            assert label == SPECIES[index]
            assert score == pytest.approx(float(row[index]), abs=1e-6)


def test_v2_classification_extension_with_tritonclient_json_and_binary(stack: dict[str, Any]):
    base, name = stack["base"], stack["names"]["iris"]
    rows = rows_of(stack, "iris")[::10]
    client = triton.InferenceServerClient(url=base.removeprefix("http://"))
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    plain = client.infer(name, [infer_input], headers=dict(VIEWER))
    probabilities = plain.as_numpy("probabilities")
    for binary in (False, True):
        for k in (1, 2, 3, 5):  # more than there are classes: every class, as Triton answers
            wanted = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=k)
            result = client.infer(name, [infer_input], outputs=[wanted], headers=dict(VIEWER))
            output = result.get_output("probabilities")
            assert output["datatype"] == "BYTES"
            check_top_k(result.as_numpy("probabilities"), probabilities, min(k, 3))

    # By hand: Triton's exact strings ("%f" scores), JSON data flat in row-major order.
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": rows[0].tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    answer = httpx.post(f"{base}/v2/models/{name}/infer", json=body, headers=VIEWER)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["shape"] == [1, 2] and output["datatype"] == "BYTES"
    best = int(np.argmax(probabilities[0]))
    assert output["data"][0] == f"{probabilities[0][best]:f}:{best}:{SPECIES[best]}"


def test_v2_classification_over_grpc_with_tritonclient(stack: dict[str, Any]):
    names = stack["names"]
    rows = rows_of(stack, "iris")[::10]
    client = tgrpc.InferenceServerClient(url=stack["grpc"])
    infer_input = tgrpc.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    probabilities = client.infer(names["iris"], [infer_input], headers=GRPC_VIEWER).as_numpy("probabilities")
    for k in (1, 3, 4):
        wanted = tgrpc.InferRequestedOutput("probabilities", class_count=k)
        result = client.infer(names["iris"], [infer_input], outputs=[wanted], headers=GRPC_VIEWER)
        assert result.get_output("probabilities").datatype == "BYTES"
        check_top_k(result.as_numpy("probabilities"), probabilities, min(k, 3))

    regression_rows = rows_of(stack, "diabetes")[:2]
    regression_input = tgrpc.InferInput("input", list(regression_rows.shape), "FP32")
    regression_input.set_data_from_numpy(regression_rows)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(names["diabetes"], [regression_input], headers=GRPC_VIEWER,
                     outputs=[tgrpc.InferRequestedOutput("prediction", class_count=1)])
    assert "StatusCode.INVALID_ARGUMENT" in str(refused.value.status())
    assert "not a classifier" in refused.value.message()


@pytest.mark.parametrize(("count", "wanted"), [(0, "1 or more"), (-1, "1 or more"), ("2", "whole number"),
                                               (True, "whole number"), (1.5, "whole number")])
def test_a_bad_classification_count_is_a_400_naming_it(stack: dict[str, Any], count: Any, wanted: str):
    base, name = stack["base"], stack["names"]["iris"]
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": count}}]}
    answer = httpx.post(f"{base}/v2/models/{name}/infer", json=body, headers=VIEWER)
    assert answer.status_code == 400, answer.text
    assert "parameters.classification" in answer.json()["error"] and wanted in answer.json()["error"]


def test_a_regression_model_answers_without_labels_and_refuses_classification(stack: dict[str, Any]):
    base, name = stack["base"], stack["names"]["diabetes"]
    rows = rows_of(stack, "diabetes")[:2]
    client = triton.InferenceServerClient(url=base.removeprefix("http://"))
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    plain = client.infer(name, [infer_input], headers=dict(VIEWER))
    assert plain.as_numpy("prediction").shape == (2, 1)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(name, [infer_input], headers=dict(VIEWER),
                     outputs=[triton.InferRequestedOutput("prediction", class_count=1)])
    assert refused.value.status() == "400"
    assert "'prediction' has no class labels" in refused.value.message()
    assert "not a classifier" in refused.value.message()

    example = dict(zip(features_of(stack["diabetes"], "target"), rows[0].tolist(), strict=True))
    for route in (":classify", "/labels/production:classify"):
        answer = httpx.post(f"{base}/v1/models/{name}{route}", json={"examples": [example]}, headers=VIEWER)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert "no classify signature" in error and "not a classifier" in error and ":predict" in error


def test_tf_serving_classify_answers_each_example_with_every_label_and_score(stack: dict[str, Any]):
    base, name = stack["base"], stack["names"]["iris"]
    features = features_of(stack["iris"], "species")
    rows = rows_of(stack, "iris")[::25]
    predicted = httpx.post(f"{base}/v1/models/{name}:predict", json={"instances": rows.tolist()},
                           headers=VIEWER).json()["predictions"]
    examples = [dict(zip(features, row.tolist(), strict=True)) for row in rows]
    version = stack["jobs"]["iris"]["model_version"]
    for route in (":classify", f"/versions/{version}:classify", "/labels/production:classify"):
        answer = httpx.post(f"{base}/v1/models/{name}{route}", json={"examples": examples}, headers=VIEWER)
        assert answer.status_code == 200, (route, answer.text)
        results = answer.json()["results"]
        assert len(results) == len(rows)
        for result, probabilities in zip(results, predicted, strict=True):
            assert [label for label, _ in result] == SPECIES
            assert [score for _, score in result] == pytest.approx(probabilities, abs=1e-6)

    # A feature shared by every example goes in the context; a tf.Example's one-value lists are taken.
    shared = {features[0]: rows[0][0]}
    rest = [{f: [row[i]] for i, f in enumerate(features) if i} for row in rows[:1].tolist()]
    with_context = httpx.post(f"{base}/v1/models/{name}:classify",
                              json={"context": {k: float(v) for k, v in shared.items()}, "examples": rest},
                              headers=VIEWER)
    assert with_context.status_code == 200, with_context.text
    assert [s for _, s in with_context.json()["results"][0]] == pytest.approx(predicted[0], abs=1e-6)


def test_tf_classify_takes_a_tables_examples_with_strings_and_absent_values(stack: dict[str, Any]):
    base, name = stack["base"], stack["names"]["table"]
    status = httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).json()
    assert status["labels"] == SPECIES and status["features"] == features_of(stack["table"], "species")
    rows = stack["table"].drop(columns="species").iloc[::30].to_dict(orient="records")
    rows[0].pop("colour")  # absent: a missing value, in :predict's rows as in :classify's examples
    examples = [dict(row) for row in rows]
    examples[1]["colour"] = [rows[1]["colour"]]  # a tf.Example's feature: a list of one value
    predicted = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": rows}, headers=VIEWER)
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["labels"] == SPECIES
    answer = httpx.post(f"{base}/v1/models/{name}:classify", json={"examples": examples}, headers=VIEWER)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    for result, probabilities in zip(results, predicted.json()["outputs"], strict=True):
        assert [label for label, _ in result] == SPECIES
        assert [score for _, score in result] == pytest.approx(probabilities, abs=1e-6)
    # Over 0.9 of these flowers named right: the table's columns reached the right inputs.
    truth = stack["table"]["species"].iloc[::30].tolist()
    named = [max(result, key=lambda pair: pair[1])[0] for result in results]
    assert sum(a == b for a, b in zip(named, truth, strict=True)) >= 4

    unknown = httpx.post(f"{base}/v1/models/{name}:classify", json={"examples": [{"size": 1.0}]},
                         headers=VIEWER)
    assert unknown.status_code == 400 and "names unknown feature(s) ['size']" in unknown.json()["error"]


@pytest.mark.parametrize(("body", "wanted"), [
    ({"examples": []}, "'examples' must be a non-empty list"),
    ({"examples": [[5.1, 3.5, 1.4, 0.2]]}, "examples[0] is list"),
    ({"examples": [{"sepal length (cm)": 5.1}]}, "examples[0] lacks feature(s) ['sepal width (cm)'"),
    ({"examples": [{"colour": 1.0}]}, "lacks feature(s)"),
    ({"examples": "x"}, "'examples' must be a non-empty list"),
    ({"signature_name": "other", "examples": [{}]}, "signature_name 'other' is not served"),
    ({"context": [], "examples": [{}]}, "'context' must be an object"),
])
def test_a_bad_classify_request_is_a_400_saying_what_is_wrong(stack: dict[str, Any], body: Any, wanted: str):
    base, name = stack["base"], stack["names"]["iris"]
    answer = httpx.post(f"{base}/v1/models/{name}:classify", json=body, headers=VIEWER)
    assert answer.status_code == 400, answer.text
    assert wanted in answer.json()["error"], answer.json()


def test_classify_refuses_values_that_are_not_one_number_and_unknown_or_repeated_features(
    stack: dict[str, Any],
):
    base, name = stack["base"], stack["names"]["iris"]
    features = features_of(stack["iris"], "species")
    good = dict.fromkeys(features, 1.0)
    cases = [
        ({"examples": [{**good, features[1]: "wide"}]}, f"feature {features[1]!r} is 'wide'"),
        ({"examples": [{**good, features[1]: [1.0, 2.0]}]}, "one number per feature"),
        ({"examples": [{**good, features[1]: True}]}, "one number per feature"),
        ({"examples": [{**good, "colour": 2.0}]}, "names unknown feature(s) ['colour']"),
        ({"context": {features[0]: 1.0}, "examples": [good]}, "repeats context feature(s)"),
    ]
    for body, wanted in cases:
        answer = httpx.post(f"{base}/v1/models/{name}:classify", json=body, headers=VIEWER)
        assert answer.status_code == 400, answer.text
        assert wanted in answer.json()["error"], (wanted, answer.json())
    assert httpx.post(f"{base}/v1/models/{name}:classify", json={"examples": [good]}).status_code == 401
