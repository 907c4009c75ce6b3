"""JSON inputs converted per merged group: the group's conversion takes exactly what each request's takes.

:func:`~services.serving.core.convert.merge_json` converts the JSON values of many requests with
Python's builtins and one numpy call; whatever the values, what it takes must be exactly what the
request-by-request conversion (:func:`~services.serving.core.convert.to_array`, which names each
refusal) takes, with the same numbers, and one bad request must send the whole group back to be
converted request by request, so that its refusal stays its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from services.serving.core.convert import FEW_VALUES, merge_json, to_array
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
    ([[-1e39, 2.0, 1.0]], False),
    ([[3.4028235e38, 2.0, 1.0]], True),        # just beyond float32's largest, which it rounds to
    ([[3.4028234e38, -3.4028234e38, 1.0]], True),
    ([[], [], []], False),
    ([[1.0, math.nan, 3.0]], False),
    ([[1.0, math.inf, 3.0]], False),
    ([[2**70, 1.0, 3.0]], False),              # an integer beyond 64 bits
    ([], False),
    ({"x": [1.0]}, False),
]


def alone(tensor: JsonTensor, spec: TensorSpec = SPEC, max_rows: int = 64) -> np.ndarray | None:
    """The request converted and checked on its own, as the data plane does; None: refused."""
    try:
        array = to_array(tensor, spec, max_rows=max_rows, allow_non_finite=False)
        return validate_inputs({"x": array}, Signature(inputs=(spec,), outputs=()), max_batch_rows=max_rows,
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
    # No values where a free dimension allows none (a sequence of no steps): the request's own check
    # refuses it, naming what is missing; the group's conversion must not hand the runtime an empty array.
    free = TensorSpec(name="x", dtype=F32, shape=(None, None, 2))
    assert merge_json([JsonTensor([], shape=(1, 0, 2))], free, max_rows=64, allow_non_finite=False) is None
    assert merge_json([JsonTensor([[]], rows=True)], TensorSpec(name="x", dtype=F32, shape=(None, None)),
                      max_rows=64, allow_non_finite=False) is None


SPECIAL = [math.nan, math.inf, -math.inf, 1e39, -1e39, 3.4028235e38, 1e308, -0.0, True, 1, "1.5", None, 2**70,
           65519.0, 70000.0]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(None, 3), (None, 2, 2)], ids=["rows", "nested"])
def test_random_groups_take_exactly_what_each_request_takes(
    dtype: str, shape: tuple[int | None, ...]
) -> None:
    """Seeded random values, a few of them edge cases (NaN, ±Inf, beyond the dtype, booleans, strings,
    huge integers, ragged rows), at two depths and three float widths, in groups of a few values and
    of more than FEW_VALUES (checked by Python's builtins and by numpy's reductions)."""
    spec = TensorSpec(name="x", dtype=np.dtype(dtype), shape=shape)
    rng = np.random.default_rng(11)
    rate = 0.04

    def value() -> Any:
        return SPECIAL[rng.integers(len(SPECIAL))] if rng.random() < rate else float(rng.normal(0, 1e3))

    def row() -> Any:
        width = 3 if rng.random() > rate else 2
        return [value() for _ in range(width)] if len(shape) == 2 else [
            [value() for _ in range(2)] for _ in range(2 if rng.random() > rate else 1)]

    taken = {False: 0, True: 0}  # by whether the group had more than FEW_VALUES values
    for number in range(900):
        large = number % 3 == 0
        rate = 0.0004 if large else 0.04  # a large group holds about one edge case
        rows = (60, 130) if large else (1, 3)
        tensors = [JsonTensor([row() for _ in range(int(rng.integers(*rows)))], rows=True)
                   for _ in range(int(rng.integers(1, 4)))]
        merged = merge_json(tensors, spec, max_rows=256, allow_non_finite=False)
        if merged is None:
            continue
        taken[merged.size > FEW_VALUES] += 1
        each = [alone(tensor, spec, max_rows=256) for tensor in tensors]
        assert all(array is not None for array in each)
        assert merged.dtype == spec.dtype
        np.testing.assert_array_equal(merged, np.concatenate(each))  # type: ignore[arg-type]
    assert taken[False] > 150 and taken[True] > 50, taken  # most groups are clean: the merge must take them
