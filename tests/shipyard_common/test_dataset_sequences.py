"""The platform's one reader of a dataset's sequences and the layout a version is read by
(shipyard_common/datasets/sequences.py): a list column (lists, Parquet arrays, or their JSON text in the
CSV) or long format (id, step, features), and each refusal naming the row, id or column."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from shipyard_common.datasets.repo import lists_as_json
from shipyard_common.datasets.sequences import SequenceLayout, read_sequences, sequence_layout
from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import TAG_SEQUENCE

LIST = SequenceLayout(column="steps")
LONG = SequenceLayout(id="id", step="t")


def ragged(count: int, *, width: int, seed: int) -> list[list[list[float]]]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(1, 8)), width)).round(6).tolist() for _ in range(count)]


@pytest.mark.parametrize("width", [1, 3])
def test_a_list_column_reads_the_same_from_lists_parquet_and_the_csvs_json_text(width):
    steps = ragged(12, width=width, seed=width)
    cells = [[s[0] for s in seq] for seq in steps] if width == 1 else steps
    frame = pd.DataFrame({"steps": cells, "sign": ["a", "b"] * 6})
    parquet = pd.read_parquet(io.BytesIO(frame.to_parquet()))  # numpy arrays (of arrays) in the cells
    csv = pd.read_csv(io.BytesIO(lists_as_json(parquet).to_csv(index=False).encode()))
    assert isinstance(csv["steps"][0], str)
    read = [read_sequences(f, LIST) for f in (frame, parquet, csv)]
    for each in read:
        assert [v.shape for v in each.values] == [(len(s), width) for s in steps]
        for values, expected in zip(each.values, steps, strict=True):
            np.testing.assert_array_equal(values, np.asarray(expected, np.float32))
            assert values.dtype == np.float32
        assert each.features == (["steps"] if width == 1 else [f"steps[{i}]" for i in range(width)])
        assert each.ids.tolist() == list(range(12)) and each.rows["sign"].tolist() == ["a", "b"] * 6


def test_long_format_orders_steps_within_an_id_and_ids_as_the_trainer_does():
    frame = pd.DataFrame({"id": ["b", "a", "b", "a", "c", "b"], "t": [2, 1, 0, 0, 5, 1],
                          "x": [3.0, 20.0, 1.0, 10.0, 7.0, 2.0], "y": [30.0, 200.0, 10.0, 100.0, 70.0, 20.0],
                          "sign": ["n", "p", "n", "p", "p", "n"]})
    read = read_sequences(frame, LONG, per_sequence=["sign"])
    assert read.ids.tolist() == ["a", "b", "c"]  # by id, as the trainer has always ordered them
    assert read.features == ["x", "y"]  # every column but id, step and the per-sequence ones
    np.testing.assert_array_equal(read.values[0], [[10, 100], [20, 200]])
    np.testing.assert_array_equal(read.values[1], [[1, 10], [2, 20], [3, 30]])
    np.testing.assert_array_equal(read.values[2], [[7, 70]])
    assert read.rows["sign"].tolist() == ["p", "n", "p"] and read.rows["t"].tolist() == [0, 0, 5]
    named = read_sequences(frame, SequenceLayout(id="id", step="t", features=("y",)), dtype=np.float64)
    assert named.features == ["y"] and named.values[1].dtype == np.float64
    np.testing.assert_array_equal(named.values[1][:, 0], [10, 20, 30])


def test_float64_keeps_what_float32_rounds():
    frame = pd.DataFrame({"steps": ["[0.1, 1e-40]"]})
    assert read_sequences(frame, LIST, dtype=np.float64).values[0][:, 0].tolist() == [0.1, 1e-40]
    assert read_sequences(frame, LIST).values[0][:, 0].astype(np.float64).tolist() != [0.1, 1e-40]


def _list(*cells: object) -> pd.DataFrame:
    return pd.DataFrame({"steps": list(cells), "sign": "a"})


def _long(**columns: object) -> pd.DataFrame:
    return pd.DataFrame({"id": [1, 1, 2], "t": [0, 1, 0], "x": [1.0, 2.0, 3.0], "sign": "a", **columns})


@pytest.mark.parametrize(("frame", "layout", "message"), [
    (_list("[1, 2]", "[]"), LIST, "row 1 of column 'steps' is an empty sequence"),
    (_list("[[1, 2], [3, 4]]", "[[1, 2, 3]]"), LIST, "row 1 of column 'steps' has steps of 3 values; row 0's "
     "have 2: every step must have the same width"),
    (_list("[1, 2]", "one, two"), LIST, "row 1 of column 'steps' is 'one, two', not a list of numbers"),
    (_list("[1, NaN]"), LIST, "row 0 of column 'steps' holds a missing or infinite value"),
    (_list("[1]", "[1, 1e39]"), LIST, "row 1 of column 'steps' holds a missing or infinite value"),
    (_list("[true, false]"), LIST, "row 0 of column 'steps' holds bool True; steps are numbers"),
    (_list("[0.5, \"x\"]"), LIST, "row 0 of column 'steps' holds str 'x'; steps are numbers"),
    (_list('["a"]'), LIST, "row 0 of column 'steps' holds str 'a'"),
    (_list("7"), LIST, "row 0 of column 'steps' is int, not a list of numbers"),
    (_list("[[1, 2], [3]]"), LIST, "row 0 of column 'steps' is not a list of numbers or of equal-width"),
    (_list("[[]]"), LIST, "row 0 of column 'steps' is not a list of numbers or of equal-width"),
    (_list("[1]"), SequenceLayout(column="cells"), "there is no column(s) ['cells']; the columns are "
     "['steps', 'sign']"),
    (_list("[1]").iloc[:0], LIST, "there are no rows, so no sequences"),
    (_long(t=[0, 0, 0]), LONG, "id 1 has step 0 more than once"),
    (_long(sign=["a", "b", "b"]), LONG, "column 'sign' must be constant within each sequence (one value "
     "per 'id'); it varies within id(s) [1]"),
    (_long(x=["1", "2", "3"]), LONG, "step feature column(s) ['x'] are not numeric"),
    (_long(x=[1.0, None, 3.0]), LONG, "column(s) ['x'] have missing values; fill or drop them first"),
    (_long(t=[0, None, 1]), LONG, "column(s) ['t'] have missing values"),
    (_long(x=[1.0, np.inf, 3.0]), LONG, "step feature column(s) ['x'] hold infinite values"),
    (_long().drop(columns="x"), LONG, "long format: there are no step feature columns besides the id, step"),
    (_long(), SequenceLayout(id="id", step="t", features=("x", "z")), "there is no column(s) ['z']"),
])
def test_what_is_not_a_sequence_is_refused_naming_the_row_id_or_column(frame, layout, message):
    with pytest.raises(InvalidInput) as refused:
        read_sequences(frame, layout, per_sequence=["sign"])
    assert message in refused.value.message


def test_a_layout_is_a_list_column_or_long_format_and_its_tag_reads_back():
    for both_or_neither in ({}, {"column": "s", "id": "i", "step": "t"}, {"id": "i"}):
        with pytest.raises(ValueError, match="a list column or long format"):
            SequenceLayout(**both_or_neither)
    long = SequenceLayout(id="id", step="t", features=("x", "noise"), max_length=20)
    assert json.loads(long.tag()) == {"id": "id", "step": "t", "features": ["x", "noise"], "max_length": 20}
    assert json.loads(LIST.tag()) == {"column": "steps"}
    for layout in (long, LIST):
        assert sequence_layout({TAG_SEQUENCE: layout.tag()}, {}, features=()) == layout


def test_the_tag_says_the_layout_else_the_runs_params_else_a_list_columns_feature_names():
    said = {"data.sequence.column": "null", "data.sequence.id": "id", "data.sequence.step": "t"}
    tagged = {TAG_SEQUENCE: SequenceLayout(column="rows", features=("rows",), max_length=9).tag()}
    assert sequence_layout(tagged, said, features=("rows",)) == SequenceLayout(
        column="rows", features=("rows",), max_length=9)
    assert sequence_layout({}, said, features=("x", "noise")) == SequenceLayout(
        id="id", step="t", features=("x", "noise"))
    listed = {"data.sequence.column": "rows", "data.sequence.id": "null"}
    assert sequence_layout({}, listed, features=("steps",)) == SequenceLayout(column="rows")
    assert sequence_layout({}, {}, features=("s[0]", "s[1]")) == SequenceLayout(column="s")
    unsaid = {"data.sequence": "null"}
    assert sequence_layout({}, unsaid, features=("steps",)) == SequenceLayout(column="steps")
    for unnamed in (("x", "noise"), ("s[1]", "s[0]"), ("s[0]", "t[1]"), ()):
        assert sequence_layout({}, {}, features=unnamed) is None


@pytest.mark.parametrize(("tag", "message"), [
    ("{column", "is not JSON"),
    ('["steps"]', "is not a JSON object"),
    ('{"column": 3}', "column, id and step are names"),
    ('{"id": "id", "step": "t", "features": []}', "features a list of names"),
    ('{"column": "s", "max_length": 0}', "max_length a positive number"),
    ('{"id": "id"}', "a list column or long format (id and step)"),
])
def test_a_malformed_tag_is_refused_naming_the_tag(tag, message):
    with pytest.raises(InvalidInput) as refused:
        sequence_layout({TAG_SEQUENCE: tag}, {"data.sequence.column": "steps"}, features=("steps",))
    assert TAG_SEQUENCE in refused.value.message and message in refused.value.message
