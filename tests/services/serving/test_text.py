"""Raw text at serving: a text model's stored tokenizer turns strings into its token ids, in every protocol.

The version is laid out as the trainer lays out a text classifier: ``model/onnx/model.onnx`` taking
``input_ids`` int64 [batch, 16], ``model/signature.json`` (with the class labels and the text column
``review`` as its one feature), and ``model/tokenizer/`` written by the
trainer's own ``save_tokenizer`` from the packaged all-MiniLM-L6-v2 tokenizer, truncating and padding
to 16 tokens. The model (an embedding table averaged over the ids, then a linear layer and softmax)
is built with ``onnx.helper``, so the test knows what it must answer for any ids.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.serving.app import create_app
from services.serving.fastlane.uvicorn_protocol import FastLaneHttpProtocol
from services.serving.settings import ServingSettings
from services.trainer.engines.text import checkpoint_path, load_tokenizer, save_tokenizer
from shipyard_common.lineage import MODEL_ARTIFACT_PATH, SIGNATURE_FILE, TAG_FORMAT
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import IR_VERSION, ModelFactory, unique_name
from tests.services.serving.support import NO_RECONCILE, VIEWER
from tests.support import free_port, running_app, wait_for

MAX_LENGTH = 16
VOCAB = 30_522  # all-MiniLM-L6-v2's
WIDTH = 4
TEXTS = ["the film was wonderful", "dull",
         "a very long review that goes on and on about the plot, the actors, the music and the ending"]
SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "input_ids", "shape": [None, MAX_LENGTH], "dtype": "int64"}],
    "outputs": [{"name": "probabilities", "shape": [None, 2], "dtype": "float32"}],
}
# What the trainer writes beside a text classifier's signature: its id2label, and its one text column.
LABELS = ["negative", "positive"]
FEATURE = "review"


def weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    table = rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)
    return table, rng.normal(size=(WIDTH, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)


def text_model() -> bytes:
    """softmax(mean(embedding[input_ids]) @ W + b)."""
    table, w, b = weights()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["embedded"], axis=0),
         helper.make_node("ReduceMean", ["embedded", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "W"], ["logits_raw"]),
         helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "text_model",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", MAX_LENGTH])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
         numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(ids: np.ndarray) -> np.ndarray:
    table, w, b = weights()
    logits = table[ids].mean(axis=1) @ w + b
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def write_text_version(folder: Path) -> None:
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "model.onnx").write_bytes(text_model())
    checkpoint = checkpoint_path("all-MiniLM-L6-v2")
    tokenizer, _ = load_tokenizer(checkpoint, MAX_LENGTH)
    save_tokenizer(tokenizer, checkpoint, folder / "tokenizer", MAX_LENGTH)
    (folder / SIGNATURE_FILE).write_text(json.dumps({"primary": "onnx", **SIGNATURE, "labels": LABELS,
                                                     "features": [FEATURE], "formats": {"onnx": SIGNATURE}}))


def register_text_version(factory: ModelFactory, name: str) -> str:
    client = factory.client
    run_id = client.create_run(factory._experiment_id()).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        write_text_version(Path(tmp))
        client.log_artifacts(run_id, tmp, MODEL_ARTIFACT_PATH)
    client.set_terminated(run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}", run_id=run_id,
        tags={TAG_FORMAT: "onnx"})
    return str(version.version)


@pytest.fixture
def text_serving(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> Iterator[tuple[str, str, str]]:
    """(serving's base URL, the text model's name, serving's gRPC address)."""
    name = unique_name("text")
    model_factory.set_production(name, register_text_version(model_factory, name))
    grpc_port = free_port()
    app = create_app(ServingSettings(platform=isolated_platform, reconcile_interval_s=NO_RECONCILE,
                                     grpc_port=grpc_port))
    with running_app(app, http=FastLaneHttpProtocol) as base:
        wait_for(lambda: httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).status_code == 200
                 and httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).json().get("version") is not None,
                 timeout=120, what="the text model served")
        yield base, name, f"127.0.0.1:{grpc_port}"


def stored_ids(texts: list[str]) -> tuple[np.ndarray, list[bool]]:
    """The ids the version's own tokenizer makes (as a client with the ``tokenizers`` library would)."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_text_version(Path(tmp) / "model")
        tokenizer = Tokenizer.from_file(str(Path(tmp) / "model" / "tokenizer" / "tokenizer.json"))
    encodings = tokenizer.encode_batch(texts)
    return np.array([e.ids for e in encodings], dtype=np.int64), [bool(e.overflowing) for e in encodings]


def test_raw_text_in_every_protocol_equals_the_stored_tokenizers_ids(
    text_serving: tuple[str, str, str]
) -> None:
    base, name, _ = text_serving
    ids, cut = stored_ids(TEXTS)
    assert cut == [False, False, True]  # the long review does not fit in 16 tokens
    want = expected(ids)

    status = httpx.get(f"{base}/v1/models/{name}", headers=VIEWER).json()
    assert status["text"] == {"input": "input_ids", "max_length": MAX_LENGTH}
    by_ids = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": ids.tolist()}, headers=VIEWER)
    assert by_ids.status_code == 200, by_ids.text
    assert "truncated" not in by_ids.json()  # ids in: nothing was tokenized
    np.testing.assert_allclose(by_ids.json()["outputs"], want, rtol=1e-5, atol=1e-6)

    ours = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": TEXTS}, headers=VIEWER)
    assert ours.status_code == 200, ours.text
    assert ours.json()["outputs"] == by_ids.json()["outputs"]
    assert ours.json()["truncated"] == cut

    v2 = httpx.post(f"{base}/v2/models/{name}/infer", headers=VIEWER, json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]})
    assert v2.status_code == 200, v2.text
    [output] = v2.json()["outputs"]
    np.testing.assert_array_equal(np.asarray(output["data"], dtype=np.float32).reshape(output["shape"]),
                                  np.asarray(by_ids.json()["outputs"], dtype=np.float32))
    assert v2.json()["parameters"] == {"truncated": True, "truncated_rows": "2"}

    for body in ({"instances": TEXTS}, {"instances": [{"text": t} for t in TEXTS]}):
        tf = httpx.post(f"{base}/v1/models/{name}:predict", json=body, headers=VIEWER)
        assert tf.status_code == 200, tf.text
        assert tf.json()["predictions"] == by_ids.json()["outputs"] and tf.json()["truncated"] == cut


def test_v2_binary_bytes_over_http_and_grpc_through_tritonclient(text_serving: tuple[str, str, str]) -> None:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as triton

    base, name, grpc_address = text_serving
    ids, _ = stored_ids(TEXTS)
    client = triton.InferenceServerClient(base.removeprefix("http://"), verbose=False)
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=np.object_), binary_data=True)
    answer = client.infer(name, [text], headers=dict(VIEWER),  # tritonclient adds to the dict it is given
                          outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)])
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected(ids), rtol=1e-5, atol=1e-6)
    assert answer.get_response()["parameters"]["truncated_rows"] == "2"

    over_grpc = tgrpc.InferenceServerClient(url=grpc_address)
    text = tgrpc.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=np.object_))
    answer = over_grpc.infer(name, [text], headers={k.lower(): v for k, v in VIEWER.items()})
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected(ids), rtol=1e-5, atol=1e-6)
    parameters = answer.get_response().parameters
    assert parameters["truncated"].bool_param and parameters["truncated_rows"].string_param == "2"


def test_texts_mixed_with_numbers_and_text_for_a_numeric_model_are_refused(
    text_serving: tuple[str, str, str]
) -> None:
    base, name, _ = text_serving
    mixed = httpx.post(f"{base}/v1/models/{name}/predict", json={"inputs": ["fine", 3]}, headers=VIEWER)
    assert mixed.status_code == 422, mixed.text
    assert "mixes texts with other values" in mixed.json()["error"]["message"]
    v2 = httpx.post(f"{base}/v2/models/{name}/infer", headers=VIEWER, json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["fine", None]}]})
    assert v2.status_code == 400 and "mixes texts" in v2.json()["error"], v2.text


def test_tf_classify_takes_a_text_classifiers_examples_by_its_text_feature(
    text_serving: tuple[str, str, str]
) -> None:
    """:classify reads the text column the signature's features name (as a tf.Example's one-value list
    too, or from the context), tokenized as :predict's raw text: every label with :predict's scores, and
    which texts were cut. Each protocol's metadata shows the feature and the tokens a text is cut to."""
    base, name, _ = text_serving
    ids, cut = stored_ids(TEXTS)
    metadata = httpx.get(f"{base}/v1/models/{name}/metadata", headers=VIEWER).json()["metadata"]
    assert metadata["features"] == [FEATURE] and metadata["labels"] == LABELS
    assert metadata["text"] == {"input": "input_ids", "max_length": MAX_LENGTH} and "sequence" not in metadata
    v2 = httpx.get(f"{base}/v2/models/{name}", headers=VIEWER).json()["parameters"]
    assert v2["text"] == {"input": "input_ids", "max_length": MAX_LENGTH} and v2["features"] == [FEATURE]

    examples = [{FEATURE: TEXTS[0]}, {FEATURE: [TEXTS[1]]}, {FEATURE: TEXTS[2]}]
    classified = httpx.post(f"{base}/v1/models/{name}:classify", json={"examples": examples}, headers=VIEWER)
    assert classified.status_code == 200, classified.text
    predicted = httpx.post(f"{base}/v1/models/{name}:predict", json={"instances": TEXTS}, headers=VIEWER)
    assert predicted.status_code == 200, predicted.text
    assert classified.json() == {
        "results": [[[label, score] for label, score in zip(LABELS, row, strict=True)]
                    for row in predicted.json()["predictions"]],
        "truncated": cut,
    }
    scores = [[score for _, score in row] for row in classified.json()["results"]]
    np.testing.assert_allclose(scores, expected(ids), rtol=1e-5, atol=1e-6)

    shared = httpx.post(f"{base}/v1/models/{name}/labels/production:classify", headers=VIEWER,
                        json={"examples": [{}], "context": {FEATURE: TEXTS[1]}})
    assert shared.status_code == 200, shared.text
    assert shared.json()["results"] == classified.json()["results"][1:2]
    assert shared.json()["truncated"] == [False]


def test_tf_classify_refuses_a_text_example_without_one_text_naming_it(
    text_serving: tuple[str, str, str]
) -> None:
    base, name, _ = text_serving
    for examples, wanted in (
        ([{"text": "fine"}], "examples[0] lacks feature(s) ['review']; this model reads ['review']"),
        ([{FEATURE: "fine", "stars": 4}], "examples[0] names unknown feature(s) ['stars']"),
        ([{FEATURE: "fine"}, {FEATURE: 3}], "examples[1] feature 'review' is 3; this model reads one text"),
        ([{FEATURE: ["two", "texts"]}], "examples[0] feature 'review' is ['two', 'texts']; this model reads"),
    ):
        refused = httpx.post(f"{base}/v1/models/{name}:classify", json={"examples": examples}, headers=VIEWER)
        assert refused.status_code == 400, refused.text
        assert wanted in refused.json()["error"], refused.text
