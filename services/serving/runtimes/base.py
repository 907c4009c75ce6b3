"""What every runtime offers the data plane: a signature, ``predict`` on named arrays, ``close``.

A signature names each input and output with its dtype and shape (``None`` for a dimension
of any size, the batch first). Requests are checked against it before a runtime sees them
(:mod:`services.serving.core.validation`), so runtimes only ever get arrays of the right dtype and shape.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

FORMAT_ONNX = "onnx"
FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_SAVEDMODEL = "savedmodel"
# An ONNX file whose weights the trainer quantized to int8; the same ONNX runtime serves it.
FORMAT_ONNX_INT8 = "onnx_int8"
# Without a shipyard.format tag, the first of these whose files the version holds is served.
FORMAT_PREFERENCE = (FORMAT_ONNX_INT8, FORMAT_ONNX, FORMAT_TORCHSCRIPT, FORMAT_SAVEDMODEL)

# The dtypes a request may carry; ``string`` (numpy object arrays of str) only for a table's categorical
# columns (the trainer's engines/preprocess.py), the one kind of model that takes them.
_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool", "string")


class ModelLoadError(Exception):
    """A model version that cannot be served; the message says why, for the model's status."""


def parse_dtype(name: str) -> np.dtype[Any]:
    """A signature's dtype name (``float32``, ``int64``, …) as a numpy dtype."""
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one serving can feed (one of {', '.join(_DTYPES)})")
    return np.dtype(object) if name == "string" else np.dtype(name)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """A dtype's name in signatures and messages: ``string`` for str objects."""
    return "string" if dtype.kind == "O" else dtype.name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype[Any]
    # None: any size. The first dimension is the batch.
    shape: tuple[int | None, ...]
    # A table's numeric column with an imputation: NaN (JSON null) is a missing value, filled in the graph.
    nullable: bool = False

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {dtype_name(self.dtype)}[{dims}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    classes: tuple[Any, ...] | None = field(default=None)
    #: A classifier's class names, in the order of its first output's columns (the trainer's ``labels``).
    labels: tuple[str, ...] | None = field(default=None)
    #: The names of the columns the model reads, in the input's order (the trainer's ``features``).
    features: tuple[str, ...] | None = field(default=None)
    #: A sequence model's most steps per sequence (the trainer's ``sequence.max_length``: the longest it
    #: read in training); serving refuses a longer sequence rather than let the graph drop its end.
    sequence_max_length: int | None = field(default=None)
    #: ``labels`` as an array, so that an answer's label per row is one fancy index (set once, here).
    label_array: np.ndarray | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "label_array", np.asarray(self.labels, dtype=object))

    @functools.cached_property
    def input_names(self) -> list[str]:
        """The inputs' names, in order (made once: every request reads them; not to be changed)."""
        return [spec.name for spec in self.inputs]

    @functools.cached_property
    def output_names(self) -> list[str]:
        """The outputs' names, in order (made once: every request reads them; not to be changed)."""
        return [spec.name for spec in self.outputs]

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        """The trainer's signature JSON: ``{"inputs": [{"name", "shape", "dtype"}], "outputs": [...]}``."""

        def specs(key: str) -> tuple[TensorSpec, ...]:
            items = data.get(key)
            if not isinstance(items, list) or not items:
                raise ModelLoadError(f"the signature has no {key}")
            found = []
            for item in items:
                try:
                    shape = tuple(
                        None if d is None or (isinstance(d, int) and d < 0) else int(d) for d in item["shape"]
                    )
                    found.append(TensorSpec(name=str(item["name"]), dtype=parse_dtype(str(item["dtype"])),
                                            shape=shape, nullable=item.get("nullable") is True))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ModelLoadError(f"the signature's {key} entry {item!r} is malformed: {exc}") from exc
            return tuple(found)

        classes = data.get("classes")
        return cls(inputs=specs("inputs"), outputs=specs("outputs"),
                   classes=tuple(classes) if isinstance(classes, list) else None,
                   labels=_names(data, "labels"), features=_names(data, "features"),
                   sequence_max_length=_sequence_max_length(data))


def _names(data: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    """The signature's ``labels`` or ``features``: a non-empty list of strings, or absent (None)."""
    names = data.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"the signature's {key} must be a non-empty list of strings, not {names!r:.200}")
    return tuple(names)


def _sequence_max_length(data: Mapping[str, Any]) -> int | None:
    """The signature's ``sequence.max_length`` (``{"padding": "nan", "max_length": N}``, N >= 1), or None
    where it has no ``sequence``."""
    sequence = data.get("sequence")
    if sequence is None:
        return None
    length = sequence.get("max_length") if isinstance(sequence, dict) else None
    if type(length) is not int or length < 1:
        raise ModelLoadError("the signature's sequence must hold max_length, a whole number of steps >= 1; "
                             f"it is {sequence!r:.200}")
    return length


@runtime_checkable
class Runtime(Protocol):
    """One loaded model version. ``predict`` must be safe to call from many threads at once."""

    #: ``onnx``, ``onnx_int8``, ``torchscript`` or ``savedmodel``.
    format: str
    #: The Open Inference Protocol's platform name, e.g. ``onnxruntime_onnx``.
    platform: str
    #: What the runtime itself says it takes and answers.
    signature: Signature

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on inputs already checked against the signature; every output by name."""
        ...

    def close(self) -> None:
        """Release what the runtime holds; requests may no longer call ``predict``."""
        ...


def warm_up_arrays(signature: Signature) -> dict[str, np.ndarray]:
    """One row of zeros per input, with every free dimension 1: what a warm-up run feeds."""
    return {
        spec.name: np.full(tuple(1 if d is None else d for d in spec.shape),
                           "" if spec.dtype.kind == "O" else 0, dtype=spec.dtype)
        for spec in signature.inputs
    }
