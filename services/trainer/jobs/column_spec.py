"""``data.columns``: how each feature column of a table is encoded and its missing values filled
(docs/training.md, "Tables"); the trainer's engines/preprocess.py fits and exports it."""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ColumnType(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Encoding(StrEnum):
    ONEHOT = "onehot"
    EMBEDDING = "embedding"


class Imputation(StrEnum):
    MEAN = "mean"
    MEDIAN = "median"
    CONSTANT = "constant"
    MOST_FREQUENT = "most_frequent"
    MISSING_CATEGORY = "missing_category"
    NONE = "none"


_NUMERIC_IMPUTATIONS = frozenset({Imputation.MEAN, Imputation.MEDIAN, Imputation.CONSTANT, Imputation.NONE})
_CATEGORICAL_IMPUTATIONS = frozenset({Imputation.MOST_FREQUENT, Imputation.CONSTANT,
                                      Imputation.MISSING_CATEGORY})


class ColumnSpec(BaseModel):
    """How one feature column is encoded and its missing values filled, fitted on the training rows only
    (docs/training.md, "Tables"). Undeclared columns are inferred: numbers are numeric (impute mean),
    strings, pandas categories and booleans categorical (onehot, impute missing_category)."""

    model_config = ConfigDict(extra="forbid")

    type: ColumnType
    encoding: Encoding | None = Field(default=None, description="Categorical only; onehot when null.")
    embedding_dim: int | None = Field(default=None, ge=1, le=512, description="encoding embedding only.")
    impute: Imputation | None = Field(
        default=None, description="numeric: mean (default), median, constant or none (nulls refused); "
        "categorical: missing_category (default), most_frequent or constant.",
    )
    fill_value: float | str | None = Field(default=None, description="impute constant only: the value.")

    @model_validator(mode="after")
    def _options_fit_the_type(self) -> ColumnSpec:
        numeric = self.type == ColumnType.NUMERIC
        allowed = _NUMERIC_IMPUTATIONS if numeric else _CATEGORICAL_IMPUTATIONS
        if self.impute is not None and self.impute not in allowed:
            raise ValueError(f"impute {self.impute.value!r} is not available for a {self.type.value} column; "
                             f"use one of {sorted(i.value for i in allowed)}")
        if numeric and (self.encoding is not None or self.embedding_dim is not None):
            raise ValueError("encoding and embedding_dim apply to categorical columns only")
        if self.embedding_dim is not None and self.encoding != Encoding.EMBEDDING:
            raise ValueError("embedding_dim needs encoding 'embedding'")
        if (self.impute == Imputation.CONSTANT) != (self.fill_value is not None):
            raise ValueError(
                "fill_value goes with impute 'constant', and impute 'constant' needs a fill_value")
        if self.fill_value is not None:
            wrong = isinstance(self.fill_value, str) if numeric else not isinstance(self.fill_value, str)
            if wrong or (numeric and not math.isfinite(float(self.fill_value))) or self.fill_value == "":
                kind = "a finite number" if numeric else "a non-empty string (a category)"
                raise ValueError(f"fill_value of a {self.type.value} column must be {kind}")
        return self
