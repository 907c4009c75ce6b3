"""JSON inputs converted per merged group: the group's conversion takes exactly what each request's takes.

:func:`~services.serving.core.convert.merge_json` converts the JSON values of many requests with one
numpy call and two reductions; whatever the values, what it takes must be exactly what the
request-by-request conversion (:func:`~services.serving.core.convert.to_array`, which names each
refusal) takes, with the same numbers, and one bad request must send the whole group back to be
converted request by request, so that its refusal stays its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from services.serving.core.convert import merge_json, to_array
from services.serving.core.requests import JsonTensor
from services.serving.core.validation import validate_inputs
from services.serving.runtimes.base import Signature, TensorSpec
from shipyard_common.errors import ShipyardError

F32 = np.dtype("float32")
SPEC = TensorSpec(name="x", dtype=F32, shape=(None, 3))

ROWS: list[tuple[Any, bool]] = [
    ([[0.5, -1.25, 3.0], [1e-3, 2.5e2, -0.0]], True),
    ([[1, 2.0, 3.0]], True),                   # an integer is a number (converted to float32)
    ([[True, 2.0, 3.0]], False),               # a boolean is not
    ([[None, 2.0, 3.0]], False),
    ([["1.5", 2.0, 3.0]], False),              # numpy would read the string as 1.5
    ([[1.0, 2.0]], False),                     # two values where three are expected
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], False),    # ragged
    ([[[1.0, 2.0, 3.0]]], False),              # one level too deep
    ([[1.0, 2.0, 1e39]], False),               # beyond float32
    ([[1.0, math.nan, 3.0]], False),
    ([[1.0, math.inf, 3.0]], False),
    ([[2**70, 1.0, 3.0]], False),              # an integer beyond 64 bits
    ([], False),
    ({"x": [1.0]}, False),
]


def alone(tensor: JsonTensor) -> np.ndarray | None:
    """The request converted and checked on its own, as the data plane does; None: refused."""
    try:
        array = to_array(tensor, SPEC, max_rows=64, allow_non_finite=False)
        return validate_inputs({"x": array}, Signature(inputs=(SPEC,), outputs=()), max_batch_rows=64,
                               allow_non_finite=False)["x"]
    except ShipyardError:
        return None


@pytest.mark.parametrize(("rows", "taken"), ROWS)
@pytest.mark.parametrize("protocol", ["ours", "tf"])
def test_a_group_takes_exactly_the_rows_each_request_takes(rows: Any, taken: bool, protocol: str) -> None:
    tensor = JsonTensor(rows, rows=protocol == "ours")
    merged = merge_json([tensor], SPEC, max_rows=64, allow_non_finite=False)
    expected = alone(tensor)
    assert (expected is not None) is taken
    if merged is not None:  # the group's conversion may only take what the request's takes, as it does
        assert expected is not None and merged.dtype == F32
        np.testing.assert_array_equal(merged, expected)
    elif taken:
        assert rows and all(type(v) is int for row in rows for v in row if type(v) is not float)


def test_one_bad_request_sends_the_group_back_and_good_ones_merge_in_order() -> None:
    good = [JsonTensor([[float(i), 1.5, 2.5]] * (1 + i % 2), rows=True) for i in range(5)]
    merged = merge_json(good, SPEC, max_rows=64, allow_non_finite=False)
    assert merged is not None
    np.testing.assert_array_equal(merged, np.concatenate([alone(t) for t in good]))  # type: ignore[misc]
    bad = JsonTensor([[1.0, True, 2.0]], rows=True)
    assert merge_json([*good, bad], SPEC, max_rows=64, allow_non_finite=False) is None
    too_many = JsonTensor([[1.0, 2.0, 3.0]] * 65, rows=True)  # over the per-request limit
    assert merge_json([*good, too_many], SPEC, max_rows=64, allow_non_finite=False) is None


def test_flat_values_with_shapes_merge_and_a_wrong_count_is_refused() -> None:
    flat = [JsonTensor([1.0, 2.0, 3.0] * 2, shape=(2, 3), dtype=F32),
            JsonTensor([4.0, 5.0, 6.0], shape=(1, 3))]
    merged = merge_json(flat, SPEC, max_rows=64, allow_non_finite=False)
    assert merged is not None and merged.shape == (3, 3) and merged[2].tolist() == [4.0, 5.0, 6.0]
    short = JsonTensor([1.0, 2.0], shape=(1, 3))
    assert merge_json([short], SPEC, max_rows=64, allow_non_finite=False) is None
    with pytest.raises(ShipyardError, match="has 2 values; shape \\[1, 3\\] needs 3"):
        to_array(short, SPEC, max_rows=64, allow_non_finite=False)
    other_type = JsonTensor([1.0, 2.0, 3.0], shape=(1, 3), dtype=np.dtype("float64"))
    assert merge_json([other_type], SPEC, max_rows=64, allow_non_finite=False) is None
