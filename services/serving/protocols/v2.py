"""The Open Inference Protocol (KServe v2 / Triton) over HTTP/REST, with binary tensor data.

JSON requests: ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data"}],
"outputs": [{"name", "parameters": {"binary_data": bool}}]}``, ``data`` flat or nested in
row-major order. Binary tensor data extension: the header ``Inference-Header-Content-Length``
gives the JSON's length; the raw little-endian bytes of each input whose
``parameters.binary_data_size`` is set follow it, in the order of ``inputs``. Outputs are answered
the same way when asked (``parameters.binary_data_output`` for all, ``binary_data`` per output).
Classification extension (Triton's): an output asked for with ``parameters.classification: k`` is
answered as BYTES of shape [batch, k], each row's k highest scores as ``"score:index:label"``, best
first; only a classifier's (a version with labels) output takes it. Errors: ``{"error": "message"}``
with the error's 4xx/5xx status.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from services.serving.core.loaded import ServedModel
from services.serving.core.requests import Inference, Input, JsonTensor
from services.serving.protocols import dumps, loads
from services.serving.runtimes.base import Signature, TensorSpec
from services.serving.runtimes.loader import input_limits
from shipyard_common.errors import InvalidInput, ShipyardError

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"),
    "UINT32": np.dtype("uint32"), "UINT64": np.dtype("uint64"),
    "INT8": np.dtype("int8"), "INT16": np.dtype("int16"),
    "INT32": np.dtype("int32"), "INT64": np.dtype("int64"),
    "FP16": np.dtype("float16"), "FP32": np.dtype("float32"), "FP64": np.dtype("float64"),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype(dtype: np.dtype[Any]) -> str:
    return _NAMES.get(np.dtype(dtype), "BYTES")


def _shape(spec: TensorSpec) -> list[int]:
    return [-1 if d is None else d for d in spec.shape]


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": _shape(spec)}


Response = tuple[int, bytes, dict[str, str]]


def error_response(exc: ShipyardError) -> Response:
    """The protocol's error shape, the one place it is made."""
    return exc.status_code, dumps({"error": exc.message}), {"content-type": JSON_TYPE}


def json_response(value: Any, status: int = 200) -> Response:
    return status, dumps(value), {"content-type": JSON_TYPE}


# -- metadata ---------------------------------------------------------------------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "shipyard-serving", "version": version,
            "extensions": ["binary_tensor_data", "classification"]}


def model_metadata(served: ServedModel) -> dict[str, Any]:
    signature = served.signature
    described: dict[str, Any] = {
        "name": served.name,
        "versions": [served.version],
        "platform": served.runtime.platform,
        "inputs": [_tensor_metadata(spec) for spec in signature.inputs],
        "outputs": [_tensor_metadata(spec) for spec in signature.outputs],
    }
    named = (("labels", signature.labels), ("features", signature.features))
    parameters: dict[str, Any] = {key: list(value) for key, value in named if value}
    parameters.update(input_limits(signature, served.text))
    if parameters:
        described["parameters"] = parameters
    return described


def model_ready(served: ServedModel) -> dict[str, Any]:
    return {"name": served.name, "version": served.version, "ready": True}


# -- inference --------------------------------------------------------------------------------


class RequestedOutput(NamedTuple):
    name: str
    binary: bool
    #: The classification extension's count: answer the k best classes per row instead of the tensor.
    classification: int | None = None


class InferRequest(NamedTuple):
    id: str | None
    #: Binary tensors as arrays; JSON ones as they came (the data plane converts them).
    inputs: dict[str, Input]
    #: None: every output the model has, binary when ``binary_default``.
    outputs: list[RequestedOutput] | None
    binary_default: bool


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _parameters(item: dict[str, Any], what: str, name: str | None = None) -> dict[str, Any]:
    """``item``'s parameters (none: empty); ``what`` and ``name`` word the refusal, made only then."""
    parameters = item.get("parameters")
    if not parameters:
        return _NO_PARAMETERS
    return _object(parameters, f"{what} {name!r}.parameters" if name is not None else f"{what}.parameters")


_NO_PARAMETERS: dict[str, Any] = {}


def _header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length is {value!r}, not a number of bytes") from None
    if not 0 < length <= body_size:
        raise InvalidInput(
            f"Inference-Header-Content-Length is {length}; the body has {body_size} bytes"
        )
    return length


def decode_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request's header (and its binary tensors' bytes), or the refusal naming what is wrong.

    On every predict's path: the common checks are inline (no call per check), each refusal worded
    only when it is made."""
    length = None if header_length is None else _header_length(header_length, len(body))
    header_bytes, binary = (body, b"") if length is None else (body[:length], body[length:])
    request = loads(header_bytes, what="the inference request")
    if type(request) is not dict:
        _object(request, "the inference request")
    inputs = request.get("inputs")
    if type(inputs) is not list or not inputs:
        raise InvalidInput("the inference request needs 'inputs': a list of tensors")
    decoded: dict[str, Input] = {}
    offset = 0
    for index, item in enumerate(inputs):
        checked = item if type(item) is dict else _object(item, f"inputs[{index}]")
        name, value, offset = _decode_input(checked, index, binary, offset)
        if name in decoded:
            raise InvalidInput(f"input {name!r} is given twice")
        decoded[name] = value
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary) - offset} bytes after the inputs' binary data"
        )
    parameters = request.get("parameters")
    binary_default = bool(parameters and _parameters(request, "the inference request").get(
        "binary_data_output", False))
    request_id = request.get("id")
    outputs = request.get("outputs")
    return InferRequest(None if request_id is None else str(request_id), decoded,
                        None if outputs is None else _decode_outputs(outputs, binary_default), binary_default)


def _decode_input(item: dict[str, Any], index: int, binary: bytes, offset: int) -> tuple[str, Input, int]:
    """One input tensor: its name, its value (an array, or its JSON), and where the next binary one starts."""
    name = item.get("name")
    if type(name) is not str or not name:
        raise InvalidInput(f"inputs[{index}] needs a 'name'")
    shape = item.get("shape")
    if type(shape) is not list or not _SIZES.issuperset(map(type, shape)) or (shape and min(shape) < 0):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers, not {shape!r}")
    type_name = item.get("datatype")
    dtype = DATATYPES.get(type_name) if type(type_name) is str else None
    if dtype is None:
        if type_name == "BYTES":  # strings: a table's categorical column
            return _decode_bytes(item, name, shape, binary, offset)
        raise InvalidInput(
            f"input {name!r}: datatype {type_name!r} is not one serving takes ({', '.join(DATATYPES)})"
        )
    binary_size = _parameters(item, "input", name).get("binary_data_size") if item.get("parameters") else None
    if binary_size is None:
        if "data" not in item:
            raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        return name, JsonTensor(item["data"], tuple(shape), dtype), offset
    return name, *_binary_tensor(binary, offset, name=name, shape=shape, dtype=dtype, size=binary_size)


def _binary_tensor(
    binary: bytes, offset: int, *, name: str, shape: list[int], dtype: np.dtype[Any], size: Any
) -> tuple[np.ndarray, int]:
    """A numeric input's binary data: the array, and where the next input's binary data starts."""
    needed = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a byte count")
    if size != needed:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} bytes; shape {shape} of {datatype(dtype)} "
            f"needs {needed}"
        )
    if offset + size > len(binary):
        raise InvalidInput(
            f"input {name!r}: the body holds {len(binary) - offset} bytes of binary data for it, "
            f"not {size}"
        )
    chunk = binary[offset:offset + size]
    # Little-endian on the wire; a copy, so the array owns aligned memory.
    array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return array, offset + size


_SIZES = frozenset({int})
_STRINGS = np.dtype(object)


def _decode_bytes(
    item: dict[str, Any], name: str, shape: list[int], binary: bytes, offset: int
) -> tuple[str, Input, int]:
    """A BYTES input: JSON strings (left for the data plane to check), or binary elements, each a 4-byte
    little-endian length then that many UTF-8 bytes; decoded to str."""
    size = _parameters(item, "input", name).get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        return name, JsonTensor(item["data"], tuple(shape), _STRINGS), offset
    if type(size) is not int or size < 0 or offset + size > len(binary):
        raise InvalidInput(f"input {name!r}: binary_data_size must be the byte count of its data in the body")
    return name, strings_array(bytes_elements(binary[offset:offset + size], name), name, shape), offset + size


def bytes_elements(chunk: bytes, name: str) -> list[bytes]:
    """Binary BYTES elements (HTTP's binary data, gRPC's raw contents): each a 4-byte little-endian
    length, then that many bytes."""
    at, elements = 0, list[bytes]()
    while at < len(chunk):
        length = int.from_bytes(chunk[at:at + 4], "little")
        if at + 4 + length > len(chunk):
            raise InvalidInput(f"input {name!r}: its BYTES element {len(elements)} runs past its data")
        elements.append(chunk[at + 4:at + 4 + length])
        at += 4 + length
    return elements


def strings_array(elements: list[bytes], name: str, shape: list[int]) -> np.ndarray:
    """BYTES elements as UTF-8 text in an array of str of ``shape``, or the refusal naming the element."""
    if len(elements) != math.prod(shape):
        raise InvalidInput(f"input {name!r} holds {len(elements)} BYTES elements; shape {shape} needs "
                           f"{math.prod(shape)}")
    values: list[str] = []
    for element in elements:
        try:
            values.append(element.decode())
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element {len(values)} is not UTF-8 text") from None
    return np.array(values, dtype=object).reshape(shape)


def _decode_outputs(raw_outputs: Any, binary_default: bool) -> list[RequestedOutput]:
    """The outputs asked for (the request's ``outputs``), in order, each binary or not."""
    if not isinstance(raw_outputs, list):
        raise InvalidInput("'outputs' must be a list of {\"name\": ...}")
    outputs = []
    for index, raw in enumerate(raw_outputs):
        item = _object(raw, f"outputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}] needs a 'name'")
        parameters = _parameters(item, "output", name)
        binary_flag = parameters.get("binary_data", binary_default)
        outputs.append(RequestedOutput(name, bool(binary_flag), _classification(parameters, name)))
    return outputs


def _classification(parameters: dict[str, Any], name: str) -> int | None:
    """An output's ``parameters.classification`` (how many classes per row), if asked for."""
    count = parameters.get("classification")
    if count is None:
        return None
    if type(count) is not int or count < 1:
        raise InvalidInput(
            f"output {name!r}: parameters.classification must be a whole number of classes (1 or more), "
            f"not {count!r:.50}"
        )
    return count


def truncation_parameters(truncated: list[bool]) -> dict[str, Any]:
    """Raw text's truncation as response parameters (the protocol's parameters are scalars): whether
    any row's text was cut to the model's length, and which rows, by index."""
    return {"truncated": any(truncated),
            "truncated_rows": ",".join(str(i) for i, cut in enumerate(truncated) if cut)}


def encode_infer_response(
    inference: Inference, requested: Sequence[RequestedOutput], request_id: str
) -> Response:
    header: dict[str, Any] = {
        "model_name": inference.model, "model_version": inference.version, "id": request_id, "outputs": [],
    }
    chunks: list[bytes] = []
    for output in requested:
        value = inference.outputs[output.name]
        if output.classification is not None:
            _classify(output, value, inference.signature, header["outputs"], chunks)
            continue
        tensor: dict[str, Any] = {"name": output.name, "datatype": _NAMES.get(value.dtype, "BYTES"),
                                  "shape": list(value.shape)}
        if output.binary:
            raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = value.ravel().tolist()
        header["outputs"].append(tensor)
    if inference.truncated is not None:
        header["parameters"] = truncation_parameters(inference.truncated)
    head = dumps(header)
    if not chunks:
        return 200, head, {"content-type": JSON_TYPE}
    return 200, head + b"".join(chunks), {
        "content-type": BINARY_TYPE, "inference-header-content-length": str(len(head)),
    }


def requested_outputs(request: InferRequest, signature: Signature) -> Sequence[RequestedOutput]:
    """The outputs to answer, in the order asked; none asked: every output, in the signature's order."""
    known = signature.output_names
    if request.outputs is None:
        return _every_output(tuple(known), request.binary_default)
    unknown = [output.name for output in request.outputs if output.name not in known]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model answers {known}")
    for output in request.outputs:
        if output.classification is not None:
            check_classification(output.name, signature)
    return request.outputs


@functools.lru_cache(maxsize=256)
def _every_output(names: tuple[str, ...], binary: bool) -> tuple[RequestedOutput, ...]:
    """Every output of a version whose outputs are ``names`` (made once per version, not per request)."""
    return tuple(RequestedOutput(name, binary) for name in names)


def check_classification(output: str, signature: Signature) -> None:
    """Refuse (400) a classification of ``output`` unless it is a classifier's scores: its first output,
    with labels."""
    first = signature.output_names[0]
    if signature.labels is None or output != first:
        raise InvalidInput(
            f"output {output!r} has no class labels (this version is not a classifier"
            + (")" if signature.labels is None else f"; its classes are output {first!r})")
            + ", so it cannot be answered with parameters.classification; ask for it without"
        )


def classifications(value: np.ndarray, count: int, signature: Signature) -> list[str]:
    """Triton's classification answer for ``value`` (rows of scores), row-major: each row's ``count``
    best (at most every class) as ``"score:index:label"`` (score as C's %f, as Triton writes it), best
    first, ties by index."""
    assert signature.label_array is not None
    k = min(count, value.shape[1])
    order = np.argsort(-value.astype(np.float64), axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(value, order, axis=1).ravel().tolist()
    names = signature.label_array[order].ravel().tolist()
    return [f"{score:f}:{index}:{name}"
            for score, index, name in zip(scores, order.ravel().tolist(), names, strict=True)]


def _classify(
    output: RequestedOutput, value: np.ndarray, signature: Signature, tensors: list[dict[str, Any]],
    chunks: list[bytes],
) -> None:
    """An output asked for with ``parameters.classification``, as BYTES [batch, k] (JSON or binary)."""
    assert output.classification is not None
    found = classifications(value, output.classification, signature)
    k = min(output.classification, value.shape[1])
    tensor: dict[str, Any] = {"name": output.name, "datatype": "BYTES", "shape": [len(value), k]}
    if output.binary:  # BYTES on the wire: each element's length (4 bytes, little-endian), then its bytes
        raw = b"".join(len(item).to_bytes(4, "little") + item for item in (f.encode() for f in found))
        tensor["parameters"] = {"binary_data_size": len(raw)}
        chunks.append(raw)
    else:
        tensor["data"] = found
    tensors.append(tensor)
