"""Serving variable-length sequences (issue 16): ragged rows in, each sequence's own answer out.

Three sequence models trained by the real trainer (its API and a Celery worker) on sequences generated
here (tests/services/trainer/sequence_data.py): an LSTM on a list column (steps of width 1), the
transformer encoder on long format (steps of width 2), and a bidirectional GRU exported to TorchScript
only (served by torch.jit), registered and served. Ours and TF Serving's
REST take ragged rows, which serving pads with NaN (the models mask it); OIP v2 takes rectangular
tensors padded with null (JSON) or NaN (binary, tritonclient). Every answer equals the registered ONNX
file's on that sequence alone, also when concurrent requests of different lengths meet in the batcher;
a wrong step width, an empty sequence, misplaced padding or a sequence longer than the version's
``sequence.max_length`` (which every protocol's GET shows) is a clear 4xx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from mlflow.tracking import MlflowClient
from tritonclient.utils import InferenceServerException

from services.serving.runtimes.base import ModelLoadError, Signature
from shipyard_common.datasets import DataRepo
from tests.services.registry.model_factory import unique_name
from tests.services.serving.support import serving, serving_platform, train_for_production
from tests.services.trainer.sequence_data import list_column_frame, long_format_frame, random_sequences
from tests.services.trainer.support import job_spec
from tests.support import auth, wait_for

VIEWER = auth("viewer")
MODELS = {
    "lstm": ({"type": "lstm", "hidden_size": 16}, {"column": "steps"}, 1),
    "transformer": ({"type": "transformer_encoder", "d_model": 16, "nhead": 2, "num_layers": 1,
                     "dim_feedforward": 32, "dropout": 0.0}, {"id": "id", "step": "t"}, 2),
    # Exported to TorchScript only, so serving runs it with torch.jit (a bidirectional GRU).
    "torchscript": ({"type": "gru", "hidden_size": 8, "bidirectional": True}, {"column": "steps"}, 1),
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """Both models trained by the trainer's worker, given the production alias and served; each
    registered ONNX file, to compare serving's answers with."""
    state = tmp_path_factory.mktemp("sequences")
    platform = serving_platform(state, redis_url=redis_url, mlflow_server=mlflow_server)
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    revs = {"lstm": repo.add("seq_list", list_column_frame(300, seed=11)).rev,
            "transformer": repo.add("seq_long", long_format_frame(300, seed=12)).rev}
    revs["torchscript"] = revs["lstm"]
    names = {key: unique_name(f"seq-{key}") for key in MODELS}
    jobs = train_for_production(platform, {key: job_spec(
        rev=revs[key], dataset="seq_long" if key == "transformer" else "seq_list",
        model_name=names[key], model=dict(model), data__target="sign", data__sequence=dict(sequence),
        training__epochs=4, training__learning_rate=0.01,
        exports=["torchscript"] if key == "torchscript" else ["onnx"])
        for key, (model, sequence, _) in MODELS.items()}, state)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    sessions: dict[str, Any] = {}
    max_lengths: dict[str, int] = {}
    for key, job in jobs.items():
        folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(state / key)))
        max_lengths[key] = json.loads((folder / "signature.json").read_text())["sequence"]["max_length"]
        if key == "torchscript":
            sessions[key] = torch.jit.load(str(folder / "torchscript" / "model.pt"))
        else:
            sessions[key] = ort.InferenceSession(str(folder / "onnx" / "model.onnx"),
                                                 providers=["CPUExecutionProvider"])
    with serving(platform, max_batch_rows=256) as base:
        wait_for(lambda: all(httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).json().get("status")
                             == "serving" for name in names.values()), timeout=60, what="both models served")
        yield {"base": base, "names": names, "sessions": sessions, "max_lengths": max_lengths}


@pytest.mark.parametrize("key", list(MODELS))
def test_every_protocols_get_shows_the_most_steps_a_sequence_may_have(stack, key):
    """The version's signature.json records sequence.max_length (the longest training sequence); ours,
    OIP v2's model metadata and TF Serving's metadata show it, with the input it applies to."""
    name = stack["names"][key]
    wanted = {"input": "input", "max_length": stack["max_lengths"][key]}
    assert wanted["max_length"] == 20  # the data's longest (3 to 20 steps)
    ours = httpx.get(f"{stack['base']}/v1/models/{name}", headers=VIEWER).json()
    assert ours["sequence"] == wanted and ours["text"] is None
    v2 = httpx.get(f"{stack['base']}/v2/models/{name}", headers=VIEWER).json()
    assert v2["parameters"]["sequence"] == wanted
    tf = httpx.get(f"{stack['base']}/v1/models/{name}/metadata", headers=VIEWER).json()
    assert tf["metadata"]["sequence"] == wanted


def test_the_torchscript_version_is_served_by_torch_and_takes_ragged_rows_too(stack):
    status = httpx.get(f"{stack['base']}/v1/models/{stack['names']['torchscript']}", headers=VIEWER).json()
    assert status["format"] == "torchscript"
    assert status["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, None, 1]}]


def sequences_of(key: str, count: int, seed: int) -> list[np.ndarray]:
    return [s.astype(np.float32) for s in random_sequences(count, seed=seed, width=MODELS[key][2])]


def alone(stack: dict[str, Any], key: str, sequences: list[np.ndarray]) -> np.ndarray:
    """The registered file's answer for each sequence (ONNX Runtime, or torch.jit for the TorchScript
    version), scored on its own (no padding at all)."""
    session = stack["sessions"][key]
    if key == "torchscript":
        with torch.no_grad():
            return np.concatenate([session(torch.from_numpy(s[None])).numpy() for s in sequences])
    return np.concatenate([session.run(None, {"input": s[None]})[0] for s in sequences])


def post(stack: dict[str, Any], key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack['base']}/{path.format(name=stack['names'][key])}", json=body, headers=VIEWER)


OURS, TF, V2 = "v1/models/{name}/predict", "v1/models/{name}:predict", "v2/models/{name}/infer"


@pytest.mark.parametrize("key", list(MODELS))
def test_ours_answers_ragged_rows_as_each_sequence_alone(stack, key):
    sequences = sequences_of(key, 12, seed=21)
    assert len({len(s) for s in sequences}) > 3
    answer = post(stack, key, OURS, {"inputs": [s.tolist() for s in sequences]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    np.testing.assert_allclose(np.asarray(body["outputs"]), alone(stack, key, sequences), atol=1e-5)
    assert body["labels"] == ["negative", "positive"] and len(body["label"]) == 12


def test_width_one_steps_may_be_plain_numbers(stack):
    sequences = sequences_of("lstm", 5, seed=22)
    flat = post(stack, "lstm", OURS, {"inputs": [s[:, 0].tolist() for s in sequences]})
    assert flat.status_code == 200, flat.text
    np.testing.assert_allclose(np.asarray(flat.json()["outputs"]), alone(stack, "lstm", sequences), atol=1e-5)


@pytest.mark.parametrize("key", list(MODELS))
def test_tf_serving_instances_take_ragged_rows(stack, key):
    sequences = sequences_of(key, 7, seed=23)
    answer = post(stack, key, TF, {"instances": [s.tolist() for s in sequences]})
    assert answer.status_code == 200, answer.text
    predictions = np.asarray(answer.json()["predictions"])
    np.testing.assert_allclose(predictions, alone(stack, key, sequences), atol=1e-5)


def test_v2_takes_one_sequence_or_a_batch_padded_with_null_or_nan(stack):
    sequences = sequences_of("transformer", 4, seed=24)
    expected = alone(stack, "transformer", sequences)
    one = post(stack, "transformer", V2, {"inputs": [{"name": "input", "datatype": "FP32",
               "shape": [1, *sequences[0].shape], "data": sequences[0].ravel().tolist()}]})
    assert one.status_code == 200, one.text
    np.testing.assert_allclose(np.asarray(one.json()["outputs"][0]["data"]), expected[0], atol=1e-5)
    batch = padded(sequences)
    data = [None if np.isnan(v) else float(v) for v in batch.ravel()]
    nulls = post(stack, "transformer", V2, {"inputs": [{"name": "input", "datatype": "FP32",
                 "shape": list(batch.shape), "data": data}]})
    assert nulls.status_code == 200, nulls.text
    np.testing.assert_allclose(np.asarray(nulls.json()["outputs"][0]["data"]).reshape(4, 2), expected,
                               atol=1e-5)
    client = triton.InferenceServerClient(url=stack["base"].removeprefix("http://"))
    binary = triton.InferInput("input", list(batch.shape), "FP32")
    binary.set_data_from_numpy(batch, binary_data=True)
    result = client.infer(stack["names"]["transformer"], [binary], headers=dict(VIEWER))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def padded(sequences: list[np.ndarray]) -> np.ndarray:
    batch = np.full((len(sequences), max(map(len, sequences)), sequences[0].shape[1]), np.nan, np.float32)
    for index, sequence in enumerate(sequences):
        batch[index, : len(sequence)] = sequence
    return batch


def test_concurrent_requests_of_different_lengths_each_get_their_own_answer(stack):
    """The batcher meets requests of many lengths at once: merged or not, each answer is its own."""
    sequences = sequences_of("lstm", 48, seed=25)
    expected = alone(stack, "lstm", sequences)

    def ask(index: int) -> np.ndarray:
        pair = sequences[index: index + 2] if index % 3 else sequences[index: index + 1]
        answer = post(stack, "lstm", OURS, {"inputs": [s.tolist() for s in pair]})
        assert answer.status_code == 200, answer.text
        return np.asarray(answer.json()["outputs"])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(47)))
    for index, found in enumerate(answers):
        count = 2 if index % 3 else 1
        np.testing.assert_allclose(found, expected[index: index + count], atol=1e-5)


def test_a_sequence_longer_than_the_models_max_length_is_refused_in_every_protocol(stack):
    """The graph reads a sequence's first max_length steps only, so a longer one would be answered as if
    its end were not there: every protocol refuses it, naming the row and both lengths. A sequence of
    max_length steps is answered, and so is a v2 tensor whose null padding runs past max_length."""
    most = stack["max_lengths"]["transformer"]
    rng = np.random.default_rng(26)
    short, fits, longer = (rng.normal(size=(length, 2)).round(5).astype(np.float32)
                           for length in (4, most, most + 3))
    answered = post(stack, "transformer", OURS, {"inputs": [short.tolist(), fits.tolist()]})
    assert answered.status_code == 200, answered.text
    np.testing.assert_allclose(np.asarray(answered.json()["outputs"]),
                               alone(stack, "transformer", [short, fits]), atol=1e-5)
    message = f"row 1 has {most + 3} steps; the model reads at most {most} (its sequence.max_length)"
    for path, body, status in (
        (OURS, {"inputs": [short.tolist(), longer.tolist()]}, 422),
        (TF, {"instances": [short.tolist(), longer.tolist()]}, 400),
        (V2, v2_tensor([2, most + 3, 2], [None if np.isnan(v) else float(v)
                                          for v in padded([short, longer]).ravel()]), 400),
    ):
        refused = post(stack, "transformer", path, body)
        assert refused.status_code == status, refused.text
        assert message in json.dumps(refused.json()), refused.text
    client = triton.InferenceServerClient(url=stack["base"].removeprefix("http://"))
    binary = triton.InferInput("input", [2, most + 3, 2], "FP32")
    binary.set_data_from_numpy(padded([short, longer]), binary_data=True)
    with pytest.raises(InferenceServerException) as refused_binary:
        client.infer(stack["names"]["transformer"], [binary], headers=dict(VIEWER))
    assert message in refused_binary.value.message()
    past = np.full((1, most + 4, 2), np.nan, np.float32)
    past[0, :most] = fits
    padding = post(stack, "transformer", V2, v2_tensor(list(past.shape), [
        None if np.isnan(v) else float(v) for v in past.ravel()]))
    assert padding.status_code == 200, padding.text
    np.testing.assert_allclose(np.asarray(padding.json()["outputs"][0]["data"]),
                               alone(stack, "transformer", [fits])[0], atol=1e-5)


def v2_tensor(shape: list[int], data: list[float | None]) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    (OURS, {"inputs": [[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6, 0.7]]]}, 422,
     "row 1, step 0 has 3 values; the model takes steps of 2 numbers"),
    (OURS, {"inputs": [[[0.1, 0.2]], []]}, 422, "row 1 is an empty sequence: send at least one step"),
    (OURS, {"inputs": [[[0.1, "a"]]]}, 422, "row 0, step 0 holds str 'a'; steps hold numbers"),
    (OURS, {"inputs": [[0.1, 0.2]]}, 422, "row 0, step 0 has float; the model takes steps of 2 numbers"),
    (OURS, {"inputs": []}, 422, "inputs must be a non-empty list of sequences"),
    (TF, {"instances": [[[0.1, 0.2]], [[1.0]]]}, 400,
     "row 1, step 0 has 1 value; the model takes steps of 2 numbers"),
    (V2, v2_tensor([1, 2, 2], [None, None, 0.1, 0.2]), 400,
     "row 0 has padding (NaN steps) before a real step"),
    (V2, v2_tensor([1, 2, 2], [0.1, None, 0.1, 0.2]), 400, "row 0, step 0 mixes NaN and numbers"),
    (V2, v2_tensor([1, 1, 2], [None, None]), 400, "row 0 is all padding"),
    (V2, v2_tensor([1, 0, 2], []), 400, "has no steps"),
])
def test_bad_sequences_are_a_clear_4xx(stack, path, body, status, message):
    refused = post(stack, "transformer", path, body)
    assert refused.status_code == status, refused.text
    assert message in json.dumps(refused.json()), refused.text


@pytest.mark.parametrize("sequence", [{"padding": "nan"}, {"max_length": 0}, {"max_length": "20"}, [20]])
def test_a_malformed_sequence_max_length_fails_the_load_saying_so(sequence):
    signature = {
        "inputs": [{"name": "input", "shape": [None, None, 1], "dtype": "float32", "nullable": True}],
        "outputs": [{"name": "probabilities", "shape": [None, 2], "dtype": "float32"}]}
    assert Signature.from_json(signature).sequence_max_length is None
    assert Signature.from_json({**signature, "sequence": {"padding": "nan", "max_length": 7}}
                               ).sequence_max_length == 7
    with pytest.raises(ModelLoadError, match="sequence must hold max_length, a whole number of steps >= 1"):
        Signature.from_json({**signature, "sequence": sequence})
