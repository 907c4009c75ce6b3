"""TF Serving's REST API: ``:predict`` in row and columnar form, ``:classify`` for classifiers, model status.

Row form: ``{"instances": [...]}``, one entry per row: the input's value for a one-input model,
``{input: value, ...}`` otherwise; answered ``{"predictions": [...]}``, one entry per row (an
object of outputs when the model has several). Columnar form: ``{"inputs": tensor}`` or
``{"inputs": {input: tensor, ...}}``, answered ``{"outputs": tensor}`` or ``{"outputs": {...}}``.
Classify (a version with class labels and feature names): ``{"examples": [{feature: value, ...}],
"context": {feature: value}}``, answered ``{"results": [[[label, score], ...], ...]}``, every class
of each example in the model's output order. A text classifier reads one feature, its text: the column
its signature's ``features`` names (``{"examples": [{"review": "..."}]}``; ``text`` where it names none),
tokenized as ``:predict``'s raw text, and ``truncated`` beside the results says which texts were cut.
Errors: ``{"error": "message"}`` with the error's status.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.serving.core.convert import table_columns
from services.serving.core.dataplane import TEXT_INPUT, DataPlane, model_state, resolve
from services.serving.core.requests import Inference, Input, JsonTensor
from services.serving.core.routing import version_status
from services.serving.protocols import dumps, loads
from services.serving.runtimes.base import Signature, TensorSpec
from services.serving.runtimes.loader import input_limits
from services.serving.runtimes.text import TextEncoder
from shipyard_common.errors import InvalidInput, NotFound, ShipyardError
from shipyard_common.lineage import PRODUCTION

JSON_TYPE = "application/json"
SIGNATURE_NAME = "serving_default"

Response = tuple[int, bytes, dict[str, str]]


def error_response(exc: ShipyardError) -> Response:
    """The protocol's error shape, the one place it is made."""
    return exc.status_code, dumps({"error": exc.message}), {"content-type": JSON_TYPE}


def json_response(value: Any, status: int = 200) -> Response:
    return status, dumps(value), {"content-type": JSON_TYPE}


def _rows(instances: Any, signature: Signature) -> dict[str, Input]:
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list, one entry per row")
    names = signature.input_names
    if len(names) == 1 and not all(isinstance(row, dict) for row in instances):
        return {names[0]: JsonTensor(instances)}
    columns: dict[str, list[Any]] = {}
    for index, row in enumerate(instances):
        if not isinstance(row, dict):
            raise InvalidInput(
                f"instances[{index}] is {type(row).__name__}; this model takes named inputs {names}, "
                "so each instance is an object {input: value}"
            )
        if set(row) != set(columns or row):
            raise InvalidInput(
                f"instances[{index}] names {sorted(row)}; instances[0] named {sorted(columns)}"
            )
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    return {key: JsonTensor(values) for key, values in columns.items()}


def _columns(inputs: Any, signature: Signature) -> dict[str, Input]:
    if isinstance(inputs, dict):
        return {key: JsonTensor(value) for key, value in inputs.items()}
    names = signature.input_names
    if len(names) != 1:
        raise InvalidInput(
            f"this model takes named inputs {list(names)}: send {{\"inputs\": {{name: tensor}}}}"
        )
    return {names[0]: JsonTensor(inputs)}


def decode_predict(body: bytes, signature: Signature) -> tuple[dict[str, Input], bool]:
    """Named inputs (JSON, converted by the data plane), and whether the request was in row form."""
    request = loads(body)
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object with 'instances' or 'inputs'")
    name = request.get("signature_name", SIGNATURE_NAME)
    if name != SIGNATURE_NAME:
        raise InvalidInput(f"signature_name {name!r} is not served; only {SIGNATURE_NAME!r} is")
    if ("instances" in request) == ("inputs" in request):
        raise InvalidInput("send exactly one of 'instances' (row form) and 'inputs' (columnar form)")
    if "instances" in request:
        return _rows(request["instances"], signature), True
    return _columns(request["inputs"], signature), False


def encode_predict(inference: Inference, row_format: bool) -> dict[str, Any]:
    """TF Serving's answer; for raw text, ``truncated`` beside it says which rows' texts were cut."""
    body = _predictions(inference.outputs, row_format)
    if inference.truncated is not None:
        body["truncated"] = inference.truncated
    return body


def _predictions(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    if row_format:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values())).tolist()}
        batch = len(next(iter(outputs.values())))
        return {
            "predictions": [{key: value[i].tolist() for key, value in outputs.items()} for i in range(batch)]
        }
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values())).tolist()}
    return {"outputs": {key: value.tolist() for key, value in outputs.items()}}


def model_status(
    *, dataplane: DataPlane, name: str, version: str | None = None, label: str | None = None
) -> Response:
    """``GET /v1/models/{name}/versions/{v}`` or ``/labels/{l}``: TF Serving's GetModelStatus."""
    try:
        state = model_state(dataplane, name)
        statuses = version_status(state)
        if label is not None:
            served = resolve(dataplane, name, label=label)
            statuses = [s for s in statuses if s["version"] == served.version]
        elif version is not None:
            statuses = [s for s in statuses if s["version"] == version]
            if not statuses:
                raise NotFound(
                    f"model {name!r} version {version} is not loaded; serving loads the '{PRODUCTION}' "
                    f"alias (version {state.target_version})"
                )
        return json_response({"model_version_status": statuses})
    except ShipyardError as exc:
        return error_response(exc)


#: TF Serving's DataType names for the dtypes a signature may hold.
_DT_NAMES = {
    "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF", "int8": "DT_INT8",
    "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64", "uint8": "DT_UINT8",
    "uint16": "DT_UINT16", "uint32": "DT_UINT32", "uint64": "DT_UINT64", "bool": "DT_BOOL",
}
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": _DT_NAMES.get(spec.dtype.name, "DT_STRING" if spec.dtype.kind in "OSU" else "DT_INVALID"),
        "tensor_shape": {"dim": [{"size": str(-1 if size is None else size), "name": ""}
                                 for size in spec.shape], "unknown_rank": False},
        "name": spec.name,
    }


def model_metadata(
    *, dataplane: DataPlane, name: str, version: str | None = None, label: str | None = None
) -> Response:
    """``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata``: TF Serving's GetModelMetadata,
    the answering version's ``serving_default`` signature."""
    try:
        served = resolve(dataplane, name, version=version, label=label)
        signature = served.signature
        definition = {
            "inputs": {spec.name: _tensor_info(spec) for spec in signature.inputs},
            "outputs": {spec.name: _tensor_info(spec) for spec in signature.outputs},
            "method_name": PREDICT_METHOD,
        }
        metadata: dict[str, Any] = {"signature_def": {"signature_def": {SIGNATURE_NAME: definition}}}
        for key, names in (("labels", signature.labels), ("features", signature.features)):
            if names:
                metadata[key] = list(names)
        metadata.update(input_limits(signature, served.text))
        return json_response({
            "model_spec": {"name": name, "signature_name": "", "version": served.version},
            "metadata": metadata,
        })
    except ShipyardError as exc:
        return error_response(exc)


def _classifier_input(
    signature: Signature, name: str, version: str, *, text: TextEncoder | None
) -> TensorSpec | None:
    """The one input of a version that :classify answers (None: a table's, one input per column), or
    the 400 saying why it cannot."""
    refusal = f"model {name!r} version {version} has no classify signature: "
    if signature.labels is None:
        raise InvalidInput(
            f"{refusal}it has no class labels (it is not a classifier) and its {SIGNATURE_NAME!r} "
            f"signature's method is {PREDICT_METHOD}; send the request to :predict"
        )
    if text is not None:  # its token ids, which the data plane makes of the example's text
        return signature.inputs[0]
    features = signature.features
    if features is not None and _is_table(signature, features):
        return None
    spec = signature.inputs[0]
    if (features is None or len(signature.inputs) != 1 or len(spec.shape) != 2 or spec.dtype.kind != "f"
            or spec.shape[1] not in (None, len(features))):
        raise InvalidInput(
            f"{refusal}classify reads examples of named numeric features, and its inputs "
            f"{[s.describe() for s in signature.inputs]} are not its feature columns {list(features or [])}; "
            "send the request to :predict"
        )
    return spec


def _is_table(signature: Signature, features: tuple[str, ...]) -> bool:
    """A table's model: one input per feature column (strings and nulls taken as :predict takes them)."""
    return (all(len(spec.shape) == 1 for spec in signature.inputs)
            and set(signature.input_names) <= set(features))


def decode_classify(
    body: bytes, signature: Signature, *, name: str, version: str, text: TextEncoder | None
) -> dict[str, Input]:
    """A classify request's examples as the classifier's inputs: the rows of its one input in feature
    order, a table's columns, or a text classifier's texts (``text``: its tokenizer)."""
    spec = _classifier_input(signature, name, version, text=text)
    request = loads(body)
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object with 'examples'")
    signature_name = request.get("signature_name", SIGNATURE_NAME)
    if signature_name not in (SIGNATURE_NAME, CLASSIFY_METHOD):
        raise InvalidInput(f"signature_name {signature_name!r} is not served; only {SIGNATURE_NAME!r} is")
    examples, context = request.get("examples"), request.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise InvalidInput("'examples' must be a non-empty list, one object {feature: value} per example")
    if not isinstance(context, dict):
        raise InvalidInput("'context' must be an object {feature: value} shared by every example")
    features = _classify_features(signature, text=text)
    merged = [_example(example, context, features, index, complete=spec is not None)
              for index, example in enumerate(examples)]
    if text is not None:  # raw text: the data plane tokenizes it as it does :predict's
        (feature,) = features
        return {text.input: JsonTensor([_text(example[feature], feature, index)
                                        for index, example in enumerate(merged)])}
    if spec is None:  # a table: an absent feature is a missing value, as in :predict's rows
        columns = table_columns(merged, signature)
        assert columns is not None
        return columns
    rows = [[_number(example[f], f, index) for f in features] for index, example in enumerate(merged)]
    return {spec.name: np.asarray(rows, dtype=spec.dtype)}


def _example(
    example: Any, context: dict[str, Any], features: tuple[str, ...], index: int, *, complete: bool
) -> dict[str, Any]:
    """One example with the context's features, one-value lists (a tf.Example's) as their value; every
    feature there when ``complete``, none unknown."""
    if not isinstance(example, dict):
        raise InvalidInput(f"examples[{index}] is {type(example).__name__}; each example is an object "
                           "{feature: value}")
    if context:
        repeated = sorted(set(example) & set(context))
        if repeated:
            raise InvalidInput(f"examples[{index}] repeats context feature(s) {repeated[:20]}; give a "
                               "feature in the context or in the examples, not both")
        example = {**context, **example}
    missing = [feature for feature in features if feature not in example] if complete else []
    unknown = sorted(set(example) - set(features))
    if missing or unknown:
        raise InvalidInput(
            f"examples[{index}] " + (f"lacks feature(s) {missing[:20]}" if missing else
                                     f"names unknown feature(s) {unknown[:20]}")
            + f"; this model reads {list(features)}"
        )
    return {key: value[0] if type(value) is list and len(value) == 1 else value
            for key, value in example.items()}


def _classify_features(signature: Signature, *, text: TextEncoder | None) -> tuple[str, ...]:
    """The features a classify example names: the signature's (a classifier refused without them
    first); a text classifier's one text column, or ``text`` where its signature names no single one."""
    if text is not None:
        features = signature.features
        return features if features is not None and len(features) == 1 else (TEXT_INPUT,)
    assert signature.features is not None
    return signature.features


def _text(value: Any, feature: str, index: int) -> str:
    """A text feature's one text."""
    if type(value) is not str:
        raise InvalidInput(f"examples[{index}] feature {feature!r} is {value!r:.50}; this model reads one "
                           "text (a string) per example")
    return value


def _number(value: Any, feature: str, index: int) -> Any:
    """A feature's one number."""
    if type(value) not in (int, float):
        raise InvalidInput(f"examples[{index}] feature {feature!r} is {value!r:.50}; this model reads one "
                           "number per feature")
    return value


def encode_classify(inference: Inference) -> dict[str, Any]:
    """Every class's ``[label, score]`` per example, in the model's output order; for raw text,
    ``truncated`` beside it says which examples' texts were cut."""
    labels = inference.signature.labels
    assert labels is not None
    scores = next(iter(inference.outputs.values())).tolist()
    body: dict[str, Any] = {
        "results": [[[label, score] for label, score in zip(labels, row, strict=True)] for row in scores]}
    if inference.truncated is not None:
        body["truncated"] = inference.truncated
    return body


def unsupported_method(
    *, dataplane: DataPlane, name: str, method: str, version: str | None = None, label: str | None = None
) -> Response:
    """``:regress``: every version serves its signature with the predict method (classifiers classify
    too), as TF Serving says of a SavedModel without a regression signature."""
    try:
        served = resolve(dataplane, name, version=version, label=label)
        raise InvalidInput(
            f"model {name!r} version {served.version} has no {method} signature: its "
            f"{SIGNATURE_NAME!r} signature's method is {PREDICT_METHOD}; send the request to :predict"
        )
    except ShipyardError as exc:
        return error_response(exc)
