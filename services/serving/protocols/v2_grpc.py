"""The Open Inference Protocol v2 over gRPC (KServe/Triton's ``inference.GRPCInferenceService``).

The messages are the stubs tritonclient ships (``tritonclient.grpc.service_pb2``), so that
``tritonclient.grpc`` talks to serving as to Triton. This module is the codec: protobuf messages
in, named arrays to the data plane (:func:`services.serving.core.dataplane.infer`, as every
protocol's route), protobuf messages out; the datatype names
and metadata are :mod:`services.serving.protocols.v2`'s.

Inputs come as ``raw_input_contents`` (one little-endian buffer per input, in input order, as
tritonclient sends them) or in the typed ``contents`` field of the input's datatype; outputs go
back as ``raw_output_contents``, as Triton answers by default. BYTES inputs are refused, as over
HTTP; shared-memory tensors too. Errors: :func:`error_status` maps a
:class:`~shipyard_common.errors.ShipyardError` to a gRPC status code and its message, the one place
that mapping is made.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from services.serving.core.loaded import ServedModel
from services.serving.core.requests import Inference
from services.serving.core.validation import array_from_json
from services.serving.protocols import v2
from shipyard_common.errors import InvalidInput, ShipyardError

#: The typed ``contents`` field that carries each datatype's values (FP16 has none: raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}
_ALL_CONTENTS = (*dict.fromkeys(CONTENTS_FIELDS.values()), "bytes_contents")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}


def error_status(exc: ShipyardError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and details of ``exc``: the one place serving's errors become gRPC codes."""
    code = _STATUS_CODES.get(exc.status_code)
    if code is None:
        code = grpc.StatusCode.INTERNAL if exc.status_code >= 500 else grpc.StatusCode.INVALID_ARGUMENT
    return code, exc.message


# -- metadata ---------------------------------------------------------------------------------


def server_metadata(version: str) -> pb.ServerMetadataResponse:
    described = v2.server_metadata(version)
    # binary_tensor_data is an HTTP extension: gRPC tensors are always binary.
    return pb.ServerMetadataResponse(name=described["name"], version=described["version"], extensions=[])


def model_metadata(served: ServedModel) -> pb.ModelMetadataResponse:
    described = v2.model_metadata(served)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=described["name"], versions=described["versions"], platform=described["platform"],
        inputs=[tensor(**spec) for spec in described["inputs"]],
        outputs=[tensor(**spec) for spec in described["outputs"]],
    )


# -- inference --------------------------------------------------------------------------------


def _refuse_shared_memory(parameters: Any, what: str) -> None:
    if any(key in parameters for key in _SHARED_MEMORY):
        raise InvalidInput(f"{what}: shared-memory tensors are not supported; send the data in the request")


def _input_dtype(tensor: Any) -> np.dtype[Any]:
    dtype = v2.DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {tensor.name!r}: datatype {tensor.datatype!r} is not one serving takes "
            f"({', '.join(v2.DATATYPES)})"
        )
    return dtype


def _from_raw(tensor: Any, raw: bytes, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {tensor.name!r}: raw_input_contents holds {len(raw)} bytes; shape {shape} of "
            f"{tensor.datatype} needs {count * dtype.itemsize}"
        )
    # Little-endian on the wire; a copy, so the array owns aligned memory (as protocols/v2.py).
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def _from_contents(tensor: Any, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    contents = tensor.contents
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    filled = [name for name in _ALL_CONTENTS if len(getattr(contents, name))]
    wrong = [name for name in filled if name != field]
    if wrong:
        raise InvalidInput(
            f"input {tensor.name!r}: datatype {tensor.datatype} takes its values in contents.{field}, "
            f"not {', '.join(f'contents.{name}' for name in wrong)}"
        )
    count = math.prod(shape)
    if not filled and count:
        raise InvalidInput(
            f"input {tensor.name!r} has no data: neither raw_input_contents nor contents.{field}"
        )
    flat = array_from_json(list(getattr(contents, field)), dtype, what=f"input {tensor.name!r}")
    if flat.size != count:
        raise InvalidInput(f"input {tensor.name!r} has {flat.size} values; shape {shape} needs {count}")
    return flat.reshape(shape)


def _strings(tensor: Any, raw: bytes | None, shape: list[int]) -> np.ndarray:
    """A BYTES input as an array of str: its raw contents (length-prefixed elements) or bytes_contents."""
    filled = [name for name in _ALL_CONTENTS if len(getattr(tensor.contents, name))]
    if raw is not None:
        if filled:
            raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and contents; send one")
        return v2.strings_array(v2.bytes_elements(raw, tensor.name), tensor.name, shape)
    if [name for name in filled if name != "bytes_contents"]:
        raise InvalidInput(f"input {tensor.name!r}: BYTES takes its values in contents.bytes_contents")
    return v2.strings_array(list(tensor.contents.bytes_contents), tensor.name, shape)


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """The request's inputs as named arrays, from raw_input_contents or the typed contents."""
    if not request.inputs:
        raise InvalidInput("the inference request needs 'inputs': at least one tensor")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput(
            f"the request has {len(request.inputs)} inputs and {len(raws)} raw_input_contents; "
            "send one raw buffer per input, in input order, or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{index}] needs a 'name'")
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice")
        _refuse_shared_memory(tensor.parameters, f"input {name!r}")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {name!r}: 'shape' must be non-negative integers, not {shape}")
        if tensor.datatype == "BYTES":  # text: a text model's raw text, a table's categorical column
            arrays[name] = _strings(tensor, raws[index] if raws else None, shape)
            continue
        dtype = _input_dtype(tensor)
        if raws:
            if any(len(getattr(tensor.contents, field)) for field in _ALL_CONTENTS):
                raise InvalidInput(f"input {name!r} has both raw_input_contents and contents; send one")
            arrays[name] = _from_raw(tensor, raws[index], dtype, shape)
        else:
            arrays[name] = _from_contents(tensor, dtype, shape)
    return arrays


def requested_outputs(request: Any, served: ServedModel) -> list[v2.RequestedOutput]:
    """The outputs to answer, in the order asked; none asked: every output, in the signature's order.
    An output with the ``classification`` parameter (an int64) is answered as the classification
    extension says (:func:`services.serving.protocols.v2.classifications`)."""
    known = served.signature.output_names
    if not request.outputs:
        return [v2.RequestedOutput(name, True) for name in known]
    outputs = []
    for index, output in enumerate(request.outputs):
        if not output.name:
            raise InvalidInput(f"outputs[{index}] needs a 'name'")
        _refuse_shared_memory(output.parameters, f"output {output.name!r}")
        outputs.append(v2.RequestedOutput(output.name, True, _classification(output)))
    unknown = [output.name for output in outputs if output.name not in known]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model answers {known}")
    for output in outputs:
        if output.classification is not None:
            v2.check_classification(output.name, served.signature)
    return outputs


def _classification(output: Any) -> int | None:
    """An output's ``classification`` parameter: how many classes per row, if asked for."""
    if "classification" not in output.parameters:
        return None
    parameter = output.parameters["classification"]
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 1:
        raise InvalidInput(
            f"output {output.name!r}: parameter classification must be an int64_param of 1 or more "
            f"(how many classes per row)"
        )
    return int(parameter.int64_param)


def _raw(value: np.ndarray, type_name: str) -> bytes:
    if type_name != "BYTES":
        return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    # Triton's BYTES layout: each element's length (4 bytes, little-endian), then its bytes.
    parts = []
    for item in value.ravel().tolist():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def encode_infer_response(
    inference: Inference, requested: list[v2.RequestedOutput], request_id: str
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=inference.model, model_version=inference.version, id=request_id,
    )
    for name, _, count in requested:
        value = inference.outputs[name]
        if count is not None:  # the classification extension: BYTES [batch, k]
            found = v2.classifications(value, count, inference.signature)
            value = np.asarray(found, dtype=object).reshape(len(value), min(count, value.shape[1]))
        type_name = "BYTES" if count is not None else v2.datatype(value.dtype)
        response.outputs.add(name=name, datatype=type_name, shape=list(value.shape))
        response.raw_output_contents.append(_raw(value, type_name))
    if inference.truncated is not None:  # raw text cut to the model's length, as over HTTP
        truncated = v2.truncation_parameters(inference.truncated)
        response.parameters["truncated"].bool_param = truncated["truncated"]
        response.parameters["truncated_rows"].string_param = truncated["truncated_rows"]
    return response
