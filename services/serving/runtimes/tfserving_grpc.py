"""TensorFlow SavedModels, served by a TF Serving server that this runtime forwards to over gRPC.

Serving never loads a SavedModel itself: TF Serving (``tensorflow/serving``) loads it, under the
registered model's name and with the registry's version number (``<model_base_path>/<version>/``).
"Loading" a savedmodel version here means checking that TF Serving answers for exactly that
name and version (``GetModelMetadata``), reading the ``serving_default`` signature from it, and
running one warm-up ``Predict``. TensorFlow is imported only when such a version is loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.serving.runtimes.base import (
    FORMAT_SAVEDMODEL,
    ModelLoadError,
    Signature,
    TensorSpec,
    parse_dtype,
    warm_up_arrays,
)

SIGNATURE_NAME = "serving_default"


class TfServingRuntime:
    format = FORMAT_SAVEDMODEL
    platform = "tensorflow_savedmodel"

    def __init__(self, *, address: str, model_name: str, version: str, timeout_s: float) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.address = address
        self.model_name = model_name
        self.version = version
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(
            address,
            # Batches of a few MB each way; gRPC's default 4 MB receive limit would cut them.
            options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                     ("grpc.max_send_message_length", 256 * 1024 * 1024)],
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.signature = Signature(inputs=(), outputs=())

    def _model_spec(self, spec: Any) -> None:
        spec.name = self.model_name
        spec.version.value = int(self.version)
        spec.signature_name = SIGNATURE_NAME

    def read_signature(self) -> Signature:
        """``serving_default`` as TF Serving reports it for this name and version."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self.stub.GetModelMetadata(request, timeout=self.timeout_s)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        if SIGNATURE_NAME not in signature_map.signature_def:
            raise ModelLoadError(
                f"TF Serving's {self.model_name!r} version {self.version} has no {SIGNATURE_NAME!r} "
                f"signature (it has {sorted(signature_map.signature_def)})"
            )
        definition = signature_map.signature_def[SIGNATURE_NAME]

        def specs(infos: Any) -> tuple[TensorSpec, ...]:
            import tensorflow as tf

            found = []
            for key in sorted(infos):
                info = infos[key]
                shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
                dtype = parse_dtype(tf.dtypes.as_dtype(info.dtype).name)
                found.append(TensorSpec(name=key, dtype=dtype, shape=shape))
            return tuple(found)

        return Signature(inputs=specs(definition.inputs), outputs=specs(definition.outputs))

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec)
        for name, array in arrays.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        for name in self.signature.output_names:
            request.output_filter.append(name)
        response = self.stub.Predict(request, timeout=self.timeout_s)
        return {name: tf.make_ndarray(response.outputs[name]) for name in self.signature.output_names}

    def close(self) -> None:
        self.channel.close()


def connect_tf_serving(
    *, address: str, model_name: str, version: str, timeout_s: float
) -> TfServingRuntime:
    import grpc

    runtime = TfServingRuntime(address=address, model_name=model_name, version=version, timeout_s=timeout_s)
    try:
        runtime.signature = runtime.read_signature()
        runtime.predict(warm_up_arrays(runtime.signature))
    except grpc.RpcError as exc:
        runtime.close()
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise ModelLoadError(
            f"TF Serving at {address} does not serve {model_name!r} version {version}: {code}: {details}"
        ) from exc
    except ModelLoadError:
        runtime.close()
        raise
    return runtime
