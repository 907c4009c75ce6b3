"""Our protocol's rows of numbers: the quick check of a body's values agrees with looking at each.

:func:`~services.serving.dataplane.plain_numbers` lets the one-pass path skip the per-value type
check when a body's bytes prove that every value is a fraction; whatever the body, the rows it
takes must be exactly those the per-value check takes, and a body it cannot vouch for must still
be looked at value by value.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from services.serving.protocols.ours import float_rows, plain_numbers

F32 = np.dtype("float32")

BODIES = [
    (b'{"inputs": [[0.5, -1.25, 3.0], [1e-3, 2.5E+2, -0.0]]}', True),
    (b'{"inputs":[[0.1,0.2,0.3]]}', True),
    (b'{"inputs": [[1.5e-05, 2.0, 3.0]]}', True),     # "1.5e-05" keeps its "."
    (b'{"inputs": [[1e-05, 2.0, 3.0]]}', True),       # a float without ".": looked at, taken
    (b'{"inputs": [[1, 2.0, 3.0]]}', False),          # an integer: the general path's
    (b'{"inputs": [[true, 2.0, 3.0]]}', False),       # a boolean is not a number
    (b'{"inputs": [[false, 2.0, 3.0]]}', False),
    (b'{"inputs": [[null, 2.0, 3.0]]}', False),
    (b'{"inputs": [["1.5", 2.0, 3.0]]}', False),      # numpy would read the string as 1.5
    (b'{"inputs": [[1.0, 2.0]]}', False),             # two values where three are expected
    (b'{"inputs": [[1.0, 2.0, 3.0], [1.0, 2.0]]}', False),  # ragged
    (b'{"inputs": [[[1.0, 2.0, 3.0]]]}', False),      # one level too deep
    (b'{"inputs": [[1.0, 2.0, 1e39]]}', False),       # beyond float32
    (b'{"inputs": [[1.5, 2.5, 3.5]], "extra": "x.y"}', True),  # another string: looked at, taken
    (b'{"inputs": [[1.5, true, 3.5]], "x": 0.5}', False),       # as many dots as values, not plain
]


@pytest.mark.parametrize(("body", "taken"), BODIES)
def test_the_byte_count_takes_exactly_the_rows_the_per_value_check_takes(body: bytes, taken: bool) -> None:
    inputs = orjson.loads(body)["inputs"]
    looked_at = float_rows(inputs, F32, 3)
    quick = float_rows(inputs, F32, 3, dots=plain_numbers(body))
    assert (looked_at is not None) is taken
    assert (quick is not None) is taken
    if taken:
        assert quick is not None and looked_at is not None
        np.testing.assert_array_equal(quick, looked_at)
        assert quick.dtype == F32


def test_a_body_with_a_string_besides_its_key_is_not_plain() -> None:
    assert plain_numbers(b'{"inputs": [[0.5, 1.5]]}') == 2
    assert plain_numbers(b'{"inputs": [[1, true]]}') == 0  # no value has its "."
    for body in (b'{"inputs": [["0.5"]]}', b'{"inputs": [[0.5]], "a": "b.c"}'):
        assert plain_numbers(body) == -1, body
