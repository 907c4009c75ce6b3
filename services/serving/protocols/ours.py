"""Our JSON protocol's codec: ``{"inputs": [[...], ...]}`` rows to the inputs a version takes, and its
answer body ``{"model", "model_version", "outputs"}`` (a classifier's adds ``labels`` and ``label``).

The rows stay JSON until the data plane converts them (core/convert.py), once per merged group when
they are plain numbers; refusals are 422s whose message names the offending row and feature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.serving.core.convert import table_columns, takes_sequences
from services.serving.core.requests import Inference, Input, JsonTensor
from services.serving.runtimes.base import Signature
from shipyard_common.errors import InvalidInput, ShipyardError, ValidationFailed


def decode(inputs: Any, signature: Signature) -> dict[str, Input]:
    """The body's ``inputs`` as the named inputs of a version with ``signature``, or its 422.

    Rows (a list of lists of numbers) fill a version's one 2-D input; a model with several inputs
    takes ``{"inputs": {name: array, ...}}``.
    """
    if isinstance(inputs, dict) and len(signature.inputs) > 1:
        names = [spec.name for spec in signature.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise ValidationFailed(f"unknown input(s) {unknown}; the model takes {names}")
        return {key: JsonTensor(value) for key, value in inputs.items()}
    if len(signature.inputs) != 1 or (len(signature.inputs[0].shape) != 2
                                      and not takes_sequences(signature.inputs[0])):  # ragged sequences
        columns = table_columns(inputs, signature)  # a model taking one input per column: a table's rows
        if columns is not None:
            return columns
        raise ValidationFailed(
            f"this model takes {[s.describe() for s in signature.inputs]}; send "
            '{"inputs": {name: array, ...}} or use the v2 protocol'
        )
    return {signature.inputs[0].name: JsonTensor(inputs, rows=True)}


def refusal(exc: ShipyardError) -> ShipyardError:
    """This protocol has answered bad inputs with 422 since its first version (others: 400)."""
    if isinstance(exc, InvalidInput):
        return ValidationFailed(exc.message, details=exc.details)
    return exc


def predict_body(inference: Inference) -> dict[str, Any]:
    """Our predict answer: the model, the version that answered, its first output per row; and for a
    classifier, its class ``labels`` (once) and the ``label`` of each row's highest probability."""
    first = next(iter(inference.outputs.values()))
    body = answer_body(inference.model, inference.version, first)
    names = inference.signature.label_array
    if names is not None:
        body["labels"] = inference.signature.labels
        body["label"] = names[first.argmax(axis=1)].tolist()
    if inference.truncated is not None:  # raw text: which rows' texts were cut to the model's length
        body["truncated"] = inference.truncated
    return body


def answer_body(model: str, version: str, first: np.ndarray) -> dict[str, Any]:
    return {"model": model, "model_version": version, "outputs": first.tolist()}
