"""An in-process stand-in for TF Serving's gRPC ``PredictionService``, for tests.

It stands in for the ``tensorflow/serving`` binary (``tensorflow_model_server``), which cannot
run here. Like it, it answers ``GetModelMetadata`` (the ``signature_def`` field) and ``Predict``
for models addressed by name and version, executing each SavedModel's signature with
TensorFlow (``tf.saved_model.load``) and honouring ``output_filter``. Unknown models or versions
are ``NOT_FOUND``, bad inputs ``INVALID_ARGUMENT``, as TF Serving answers them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.services.registry.model_factory import N_FEATURES, classifier_weights
from tests.support import free_port


class TinyClassifier(tf.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        weights, bias = classifier_weights(seed)
        self.weights = tf.Variable(weights)
        self.bias = tf.Variable(bias)

    @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32, name="input")])
    def serve(self, input: tf.Tensor) -> dict[str, tf.Tensor]:  # `input`: the signature's input name
        return {"probabilities": tf.nn.softmax(tf.matmul(input, self.weights) + self.bias, axis=1)}


def write_savedmodel(path: Path, seed: int) -> None:
    """softmax(input @ W + b) as a SavedModel whose ``serving_default`` maps input → probabilities."""
    module = TinyClassifier(seed)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self) -> None:
        self.models: dict[tuple[str, int], Any] = {}
        self.lock = threading.Lock()
        self.predict_calls = 0

    def add(self, name: str, version: int, path: Path) -> None:
        with self.lock:
            self.models[(name, version)] = tf.saved_model.load(str(path))

    def _signature(self, spec: Any, context: grpc.ServicerContext) -> Any:
        versions = sorted(v for (n, v) in self.models if n == spec.name)
        if not versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        version = spec.version.value if spec.HasField("version") else versions[-1]
        model = self.models.get((spec.name, version))
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Specific({spec.name}, {version})")
        assert model is not None  # abort raises
        name = spec.signature_name or "serving_default"
        if name not in model.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{name}\" not found")
        return model.signatures[name], version

    def GetModelMetadata(  # noqa: N802 - the gRPC method's name
        self, request: Any, context: grpc.ServicerContext
    ) -> Any:
        function, version = self._signature(request.model_spec, context)
        definition = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for key, spec in function.structured_input_signature[1].items():
            definition.inputs[key].CopyFrom(meta_graph_pb2.TensorInfo(
                name=f"serving_default_{key}:0", dtype=spec.dtype.as_datatype_enum,
                tensor_shape=spec.shape.as_proto()))
        for key, spec in function.structured_outputs.items():
            definition.outputs[key].CopyFrom(meta_graph_pb2.TensorInfo(
                name=f"StatefulPartitionedCall:{key}", dtype=spec.dtype.as_datatype_enum,
                tensor_shape=spec.shape.as_proto()))
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        signature_map.signature_def["serving_default"].CopyFrom(definition)
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].CopyFrom(packed)
        return response

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        function, version = self._signature(request.model_spec, context)
        self.predict_calls += 1
        try:
            inputs = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()}
            outputs = function(**inputs)
        except (TypeError, ValueError, tf.errors.InvalidArgumentError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wanted = list(request.output_filter) or list(outputs)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(outputs[key])))
        return response


@contextmanager
def tf_serving_stand_in() -> Iterator[tuple[str, PredictionService]]:
    """A running stand-in; yields its ``host:port`` and the servicer, to add models to."""
    service = PredictionService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(grace=None)
