"""What every protocol hands the data plane, and what it gets back.

A protocol's codec decodes its body to an :class:`InferenceRequest`: the version chosen, the
inputs by name, an id, when it came in, and ``reply``, the continuation that encodes the answer in
the protocol's shape and sends it. Inputs that arrived as JSON stay JSON (:class:`JsonTensor`)
until the data plane converts them, once per merged group where it can: converting the rows of 32
requests costs little more than converting one request's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from services.serving.runtimes.base import Signature

if TYPE_CHECKING:
    from services.serving.core.loaded import ServedModel


class JsonTensor(NamedTuple):
    """An input's JSON value, converted by the data plane to the array its version takes.

    ``values``: nested lists in row-major order, or a flat list with ``shape``. ``dtype``: the type
    the request declared (OIP v2's ``datatype``); None: the version's. ``rows``: the message style
    of a refusal: our protocol's rows ("row 3, feature 1 is str") or a tensor's ("input 'x' holds").
    """

    values: Any
    shape: tuple[int, ...] | None = None
    dtype: np.dtype[Any] | None = None
    rows: bool = False

    @property
    def batch(self) -> int:
        """Its rows: the first dimension."""
        if self.shape is not None:
            return self.shape[0] if self.shape else 0
        return len(self.values) if type(self.values) is list else 0


Input = np.ndarray | JsonTensor


class Inference(NamedTuple):
    """A request's answer: the version that answered and every output, in the signature's order."""

    model: str
    version: str
    signature: Signature
    outputs: dict[str, np.ndarray]
    #: A text model's answer to raw text: whether each row's text was cut to the model's length.
    truncated: list[bool] | None = None


#: What a request's continuation receives: its answer, or the error that refused it.
Result = "Inference | ShipyardError"
Reply = Callable[[Any], None]


def settle(future: asyncio.Future[Any]) -> Reply:
    """A continuation that gives ``future`` its result, unless its caller has gone (cancelled)."""

    def reply(result: Any) -> None:
        if not future.done():
            future.set_result(result)

    return reply


class InferenceRequest:
    """A decoded request on its way to an answer (a :class:`~services.serving.batching.adaptive.Job`)."""

    __slots__ = ("inputs", "key", "model", "reply", "request_id", "rows", "served", "started", "truncated")

    def __init__(
        self, *, served: ServedModel, inputs: dict[str, Input], reply: Reply, request_id: str | None = None,
        started: float | None = None,
    ) -> None:
        self.served = served
        self.model = served.name
        self.inputs = inputs
        self.reply = reply
        self.request_id = request_id
        self.started = time.perf_counter() if started is None else started
        #: Set by the data plane when it takes the request: its rows, and its merge key.
        self.rows = 0
        self.key: Hashable | None = None
        #: Set when its raw text was tokenized: whether each row's text was cut to fit.
        self.truncated: list[bool] | None = None
