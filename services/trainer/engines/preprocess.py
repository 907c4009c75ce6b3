"""Tables with categorical columns and missing values: each column's encoding and imputation, fitted on the
training rows only, applied to the rows the network trains on, and written as ONNX nodes in front of it.

A :class:`Table` says, per feature column, its type (numeric or categorical), how nulls are filled and,
for a categorical one, its training categories and encoding: ``onehot`` (one float per slot) or
``embedding`` (the slot's index, which :class:`EmbeddedColumns` looks up in a learned table). Slots are
the sorted training categories, then ``(unknown)`` for any value training did not see, then
``(missing)`` when nulls get a slot of their own (``impute: missing_category``). A null categorical value
is the empty string inside the graph (serving turns JSON null into it).

:func:`encode` gives the float32 matrix the network trains on; :func:`prepend` writes the same
arithmetic into the exported ONNX graph (ai.onnx.ml LabelEncoder, Gather, IsNaN and Where), so that
the served model takes one input per raw column (float32 with NaN for null, or strings) and a client
sends raw rows. What was declared or inferred is :meth:`Table.describe`: the version's
``columns.json`` and the signature's ``columns``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.jobs.column_spec import ColumnSpec, ColumnType, Encoding, Imputation
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.errors import InvalidInput

#: A null categorical value as the graph sees it; an empty string counts as null too.
MISSING = ""
UNKNOWN_SLOT, MISSING_SLOT = "(unknown)", "(missing)"
ONEHOT_MAX_CATEGORIES = 1_000
EMBEDDING_MAX_CATEGORIES = 100_000
#: What every value and node :func:`prepend` writes is named with (quantization leaves them as they are).
GRAPH_PREFIX = "shipyard_table/"
_ML_DOMAIN, _ML_OPSET = "ai.onnx.ml", 3


@dataclass(frozen=True)
class Column:
    """One feature column as fitted on the training rows."""

    name: str
    type: ColumnType
    impute: Imputation
    inferred: bool
    fill: float | None = None  # numeric: what a null becomes (None: impute none, nulls refused)
    categories: tuple[str, ...] = ()
    encoding: Encoding | None = None
    embedding_dim: int | None = None
    fill_category: str | None = None  # categorical most_frequent / constant: what a null becomes

    @property
    def categorical(self) -> bool:
        return self.type == ColumnType.CATEGORICAL

    @property
    def slots(self) -> int:
        return len(self.categories) + 1 + (self.impute == Imputation.MISSING_CATEGORY)

    @property
    def missing_slot(self) -> int:
        if self.impute == Imputation.MISSING_CATEGORY:
            return len(self.categories) + 1
        assert self.fill_category is not None
        return self.categories.index(self.fill_category)

    @property
    def width(self) -> int:
        return self.slots if self.categorical and self.encoding == Encoding.ONEHOT else 1

    def describe(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "type": self.type.value, "impute": self.impute.value,
                                 "inferred": self.inferred}
        if self.categorical:
            assert self.encoding is not None
            slots = [*self.categories, UNKNOWN_SLOT]
            if self.impute == Imputation.MISSING_CATEGORY:
                slots.append(MISSING_SLOT)
            found.update(encoding=self.encoding.value, categories=list(self.categories), slots=slots,
                         fill_value=self.fill_category, nullable=True)
            if self.encoding == Encoding.EMBEDDING:
                found["embedding_dim"] = self.embedding_dim
        else:
            found.update(fill_value=self.fill, nullable=self.fill is not None)
        return found


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]

    @property
    def width(self) -> int:
        return sum(column.width for column in self.columns)

    def embedded(self) -> list[tuple[int, int, int]]:
        """(position in the encoded row, slots, embedding size) of each embedded column."""
        found, position = [], 0
        for column in self.columns:
            if column.encoding == Encoding.EMBEDDING:
                assert column.embedding_dim is not None
                found.append((position, column.slots, column.embedding_dim))
            position += column.width
        return found

    def describe(self) -> list[dict[str, Any]]:
        return [column.describe() for column in self.columns]


def table_of(described: list[dict[str, Any]], *, where: str) -> Table:
    """The :class:`Table` that :meth:`Table.describe` wrote (a version's ``columns.json``), so that
    fine-tuning encodes its rows as the parent version did; ``where`` names the file in a refusal."""
    try:
        return Table(columns=tuple(_column_of(item) for item in described))
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise InvalidInput(f"{where} does not describe a table's columns ({problem})") from None


def _column_of(item: dict[str, Any]) -> Column:
    kind, fill = ColumnType(item["type"]), item.get("fill_value")
    common: dict[str, Any] = {"name": str(item["name"]), "type": kind, "impute": Imputation(item["impute"]),
                              "inferred": bool(item["inferred"])}
    if kind == ColumnType.NUMERIC:
        return Column(**common, fill=None if fill is None else float(fill))
    dim = item.get("embedding_dim")
    return Column(**common, categories=tuple(str(c) for c in item["categories"]),
                  encoding=Encoding(item["encoding"]), embedding_dim=None if dim is None else int(dim),
                  fill_category=None if fill is None else str(fill))


def needs_table(frame: pd.DataFrame, features: list[str], spec: JobCreate) -> bool:
    """Whether the features call for a table: declared columns, a column of strings or categories, or a
    null. Numbers and booleans without nulls stay one float32 input, as they always were."""
    if spec.data.columns:
        return True
    return any(not pd.api.types.is_numeric_dtype(frame[name]) or bool(frame[name].isna().any())
               for name in features)


def _categorical_dtype(series: pd.Series) -> bool:
    return bool(pd.api.types.is_bool_dtype(series) or isinstance(series.dtype, pd.CategoricalDtype)
                or pd.api.types.is_string_dtype(series) or series.dtype == object)


def fit_table(train: pd.DataFrame, features: list[str], spec: JobCreate) -> Table:
    """Each feature's type, fill value and categories, from the training rows ``train`` only."""
    declared = spec.data.columns or {}
    return Table(columns=tuple(_fit_column(train[name], name, declared.get(name)) for name in features))


def _fit_column(series: pd.Series, name: str, declared: ColumnSpec | None) -> Column:
    if pd.api.types.is_datetime64_any_dtype(series) or pd.api.types.is_timedelta64_dtype(series):
        raise InvalidInput(f"feature column {name!r} holds dates or durations; convert it to numbers or "
                           "strings first")
    inferred = declared is None
    kind = declared.type if declared is not None else (
        ColumnType.CATEGORICAL if _categorical_dtype(series) else ColumnType.NUMERIC)
    if kind == ColumnType.NUMERIC:
        return _fit_numeric(series, name, declared, inferred)
    return _fit_categorical(series, name, declared, inferred)


def _fit_numeric(series: pd.Series, name: str, declared: ColumnSpec | None, inferred: bool) -> Column:
    values = numeric_values(series, name)
    impute = (declared.impute if declared is not None else None) or Imputation.MEAN
    present = values[~np.isnan(values)]
    fill: float | None = None
    if impute == Imputation.CONSTANT:
        assert declared is not None and declared.fill_value is not None
        fill = float(declared.fill_value)
    elif impute != Imputation.NONE:
        if not len(present):
            raise InvalidInput(f"feature column {name!r} has no values in the training rows to fill its "
                               "nulls with; drop it or declare impute 'constant'")
        fill = float(np.mean(present) if impute == Imputation.MEAN else np.median(present))
    return Column(name=name, type=ColumnType.NUMERIC, impute=impute, inferred=inferred, fill=fill)


def _fit_categorical(series: pd.Series, name: str, declared: ColumnSpec | None, inferred: bool) -> Column:
    values = category_strings(series)
    present = values[values != MISSING]
    encoding = (declared.encoding if declared is not None else None) or Encoding.ONEHOT
    impute = (declared.impute if declared is not None else None) or Imputation.MISSING_CATEGORY
    categories = set(present.tolist())
    fill_category: str | None = None
    if impute == Imputation.MOST_FREQUENT:
        if not len(present):
            raise InvalidInput(f"feature column {name!r} has no values in the training rows; "
                               "most_frequent has nothing to fill its nulls with")
        found, counts = np.unique(present, return_counts=True)
        fill_category = str(found[int(np.argmax(counts))])  # the first in sorted order on a tie
    elif impute == Imputation.CONSTANT:
        assert declared is not None
        fill_category = str(declared.fill_value)
        categories.add(fill_category)
    limit = ONEHOT_MAX_CATEGORIES if encoding == Encoding.ONEHOT else EMBEDDING_MAX_CATEGORIES
    if len(categories) > limit:
        hint = "; declare encoding 'embedding'" if encoding == Encoding.ONEHOT else ""
        raise InvalidInput(f"feature column {name!r} has {len(categories)} categories in the training rows, "
                           f"more than {encoding.value} takes ({limit}){hint}, or drop it")
    dim = None
    if encoding == Encoding.EMBEDDING:
        dim = (declared.embedding_dim if declared is not None else None) or min(
            16, max(2, round(1.6 * (len(categories) + 2) ** 0.56)))
    return Column(name=name, type=ColumnType.CATEGORICAL, impute=impute, inferred=inferred,
                  categories=tuple(sorted(categories)), encoding=encoding, embedding_dim=dim,
                  fill_category=fill_category)


def numeric_values(series: pd.Series, name: str) -> np.ndarray:
    """``series`` as float64 with NaN for null, or the 422 naming a value that is not a number."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        converted = pd.to_numeric(series.astype(object).where(series.notna(), None), errors="coerce")
        wrong = series[converted.isna() & series.notna()]
        if len(wrong) or pd.api.types.is_bool_dtype(series):
            shown = wrong.iloc[0] if len(wrong) else series.dropna().iloc[0]
            raise InvalidInput(f"feature column {name!r} is numeric but holds {shown!r}; declare it "
                               "categorical in data.columns, or fix the value")
        series = converted
    values: np.ndarray = series.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(values).any():
        raise InvalidInput(f"feature column {name!r} holds an infinite value")
    return values


def category_strings(series: pd.Series) -> np.ndarray:
    """Each value as the string the graph compares (``str(value)``), :data:`MISSING` for null."""
    mask = series.isna().to_numpy()
    pairs = zip(series.astype(object).tolist(), mask, strict=True)
    return np.array([MISSING if gone else str(value) for value, gone in pairs], dtype=object)


def encode(table: Table, frame: pd.DataFrame) -> np.ndarray:
    """``frame``'s feature columns as the float32 rows the network takes: what :func:`prepend` computes."""
    parts = [_encode_column(column, frame[column.name]) for column in table.columns]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _encode_column(column: Column, series: pd.Series) -> np.ndarray:
    if not column.categorical:
        values = numeric_values(series, column.name)
        gaps = np.isnan(values)
        if gaps.any():
            if column.fill is None:
                raise InvalidInput(f"feature column {column.name!r} has missing values and impute 'none'; "
                                   "fill or drop them, or declare an imputation")
            values = np.where(gaps, column.fill, values)
        return values.reshape(-1, 1)
    slots = slot_indexes(column, category_strings(series))
    if column.encoding == Encoding.EMBEDDING:
        return slots.astype(np.float64).reshape(-1, 1)
    onehot: np.ndarray = np.eye(column.slots)[slots]
    return onehot


def slot_indexes(column: Column, values: np.ndarray) -> np.ndarray:
    lookup = {category: index for index, category in enumerate(column.categories)}
    lookup[MISSING] = column.missing_slot
    unknown = len(column.categories)
    return np.array([lookup.get(value, unknown) for value in values], dtype=np.int64)


def raw_inputs(table: Table, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """``frame``'s feature columns as the exported graph takes them: float32 with NaN, or strings."""
    return {column.name: category_strings(frame[column.name]) if column.categorical
            else numeric_values(frame[column.name], column.name).astype(np.float32)
            for column in table.columns}


class EmbeddedColumns(nn.Module):
    """The network behind embedded columns: each one's slot index looked up in its learned table, the
    vectors put after the other encoded values, then ``inner`` (the model the spec describes, sized
    for that width). Standardisation stays ``inner``'s; it leaves the vectors as they are."""

    indexes: torch.Tensor
    dense: torch.Tensor

    def __init__(self, inner: nn.Module, embedded: list[tuple[int, int, int]], width: int) -> None:
        super().__init__()
        self.inner = inner
        self.tables = nn.ModuleList([nn.Embedding(slots, dim) for _, slots, dim in embedded])
        positions = [position for position, _, _ in embedded]
        self.register_buffer("indexes", torch.tensor(positions, dtype=torch.int64))
        self.register_buffer("dense", torch.tensor([i for i in range(width) if i not in positions],
                                                   dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = x.index_select(1, self.indexes).long()
        vectors = [table(slots[:, i]) for i, table in enumerate(self.tables)]
        out: torch.Tensor = self.inner(torch.cat([x.index_select(1, self.dense), *vectors], dim=1))
        return out

    def scale_target(self, y: torch.Tensor) -> torch.Tensor:
        scale: Any = getattr(self.inner, "scale_target", None)
        return y if scale is None else scale(y)


def with_embeddings(
    table: Table, x_train: np.ndarray, build: Callable[[np.ndarray], nn.Module]
) -> EmbeddedColumns:
    """:class:`EmbeddedColumns` around the model ``build`` makes for training rows as wide as it takes (the
    other encoded values, standardised on ``x_train``, then the vectors, left as they are: zeros here)."""
    embedded = table.embedded()
    positions = {position for position, _, _ in embedded}
    dense = x_train[:, [i for i in range(table.width) if i not in positions]]
    vectors = np.zeros((len(dense), sum(dim for _, _, dim in embedded)), dtype=np.float32)
    inner = build(np.concatenate([dense, vectors], axis=1))
    return EmbeddedColumns(inner, embedded, table.width)


def prepend(path: Path, table: Table, *, network_input: str) -> None:
    """Rewrite the ONNX network at ``path`` (taking the encoded rows as ``network_input``) to take the
    raw columns: one input per column, encoded inside the graph as :func:`encode` does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    taken = {name for node in graph.node for name in node.output} | {t.name for t in graph.initializer} | {
        o.name for o in graph.output}
    clash = sorted(column.name for column in table.columns if column.name in taken)
    if clash:
        raise InvalidInput(f"feature column(s) {clash[:10]} share a name with the network graph's values; "
                           "rename them")
    encoded = GRAPH_PREFIX + "encoded"
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == network_input:
                node.input[index] = encoded
    nodes, constants, inputs, outs = [], [], [], []
    constants.append(numpy_helper.from_array(np.array([1], dtype=np.int64), GRAPH_PREFIX + "axis1"))
    for index, column in enumerate(table.columns):
        step = _column_nodes(column, f"{GRAPH_PREFIX}{index}/", helper, numpy_helper)
        nodes += step[0]
        constants += step[1]
        outs.append(step[2])
        kind = TensorProto.STRING if column.categorical else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info(column.name, kind, ["batch"]))
    nodes.append(helper.make_node("Concat", outs, [encoded], axis=1))
    for node in nodes:  # named after their output, under GRAPH_PREFIX: quantize.py knows them by it
        node.name = node.output[0]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    del graph.input[:]
    graph.input.extend(inputs)
    graph.initializer.extend(constants)
    if not any(op.domain == _ML_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_ML_DOMAIN, _ML_OPSET))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _column_nodes(
    column: Column, prefix: str, helper: Any, numpy_helper: Any
) -> tuple[list[Any], list[Any], str]:
    """One column's nodes and constants, and the name of its [batch, width] float output."""
    out = prefix + "out"
    if not column.categorical:
        if column.fill is None:
            return [helper.make_node("Unsqueeze", [column.name, GRAPH_PREFIX + "axis1"], [out])], [], out
        fill = numpy_helper.from_array(np.array(column.fill, dtype=np.float32), prefix + "fill")
        return [
            helper.make_node("IsNaN", [column.name], [prefix + "null"]),
            helper.make_node("Where", [prefix + "null", prefix + "fill", column.name], [prefix + "filled"]),
            helper.make_node("Unsqueeze", [prefix + "filled", GRAPH_PREFIX + "axis1"], [out]),
        ], [fill], out
    keys = [*column.categories, MISSING]
    values = [*range(len(column.categories)), column.missing_slot]
    lookup = helper.make_node("LabelEncoder", [column.name], [prefix + "slot"], domain=_ML_DOMAIN,
                              keys_strings=keys, values_int64s=values, default_int64=len(column.categories))
    if column.encoding == Encoding.EMBEDDING:
        return [lookup,
                helper.make_node("Cast", [prefix + "slot"], [prefix + "index"], to=1),  # FLOAT
                helper.make_node("Unsqueeze", [prefix + "index", GRAPH_PREFIX + "axis1"], [out])], [], out
    eye = numpy_helper.from_array(np.eye(column.slots, dtype=np.float32), prefix + "onehot")
    gather = helper.make_node("Gather", [prefix + "onehot", prefix + "slot"], [out], axis=0)
    return [lookup, gather], [eye], out
