"""``data.sequence``: the dataset's rows are variable-length sequences (docs/training.md, "Sequences").

Two layouts: a list column (``column``: each cell a list of numbers, or of equal-width lists of
numbers: one sequence per row), or long format (``id`` and ``step``: one row per step, grouped by
``id`` and ordered by ``step``; ``features`` are the step's columns, all but id, step, target and the
split column when null). The target is per sequence (constant within an id in long format).
Only the sequence models read them (lstm, gru, transformer_encoder, framework pytorch), padded and
masked; :func:`sequence_refusal` says why a job cannot.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SEQUENCE_MODELS = ("lstm", "gru", "transformer_encoder")
_Column = Annotated[str, Field(min_length=1, max_length=256)]


class SequenceSpec(BaseModel):
    """Where a dataset's sequences are: a list ``column``, or long format (``id``, ``step``, ``features``)."""

    model_config = ConfigDict(extra="forbid")

    column: _Column | None = Field(
        default=None, description="A column whose cells are lists of numbers (steps of width 1) or "
        "lists of equal-width lists (Parquet list columns; JSON text in CSV)."
    )
    id: _Column | None = Field(default=None, description="Long format: the column naming each sequence.")
    step: _Column | None = Field(default=None, description="Long format: the column ordering the steps.")
    features: list[_Column] | None = Field(
        default=None, min_length=1,
        description="Long format: each step's columns, in order; all but id, step, target and split "
        "when null.",
    )

    @model_validator(mode="after")
    def _one_layout(self) -> SequenceSpec:
        long_format = self.id is not None or self.step is not None
        if (self.column is None) == (not long_format):
            raise ValueError("data.sequence takes either 'column' (a list column) or 'id' and 'step' "
                             "(long format: one row per step), not both and not neither")
        if long_format:
            if self.id is None or self.step is None:
                raise ValueError("long format needs both data.sequence.id and data.sequence.step")
            if self.id == self.step:
                raise ValueError("data.sequence.id and data.sequence.step must be different columns")
            inside = sorted({self.id, self.step} & set(self.features or ()))
            if inside:
                raise ValueError(f"data.sequence.features cannot include the id or step column {inside}")
            if self.features is not None and len(set(self.features)) != len(self.features):
                raise ValueError("data.sequence.features must not repeat a column")
        elif self.features is not None:
            raise ValueError("data.sequence.features is for long format; a list column holds its steps")
        return self

    def columns(self) -> list[str]:
        """The columns the sequences are read from (besides ``features`` in long format)."""
        return [self.column] if self.column is not None else [str(self.id), str(self.step)]


def length_left_to_the_data(values: Any) -> Any:
    """A job spec's raw values, a sequence model's ``sequence_length`` set to null (the longest training
    sequence) where data.sequence is given and it is left out; without data.sequence it stays required."""
    data = values.get("data") if isinstance(values, dict) else None
    model = values.get("model") if isinstance(values, dict) else None
    if (isinstance(data, dict) and data.get("sequence") is not None and isinstance(model, dict)
            and model.get("type") in SEQUENCE_MODELS and "sequence_length" not in model):
        return {**values, "model": {**model, "sequence_length": None}}
    return values


def sequence_refusal(spec: Any) -> str | None:
    """Why ``spec`` (a :class:`~services.trainer.jobs.schemas.JobCreate`; typed Any: schemas imports this
    module) cannot train (its data.sequence with its model, or its model without one), or None."""
    data, model = spec.data, spec.model
    fixed_length = getattr(model, "sequence_length", 0)
    if data.sequence is None:
        if fixed_length is None:
            return ("model.sequence_length is required for fixed-width rows (each row read as that many "
                    "equal steps); it is optional with data.sequence only")
        return None
    if model.type not in SEQUENCE_MODELS:
        return (f"data.sequence (variable-length sequences) needs model.type one of {list(SEQUENCE_MODELS)}, "
                f"not {model.type!r}")
    if spec.framework.value != "pytorch":
        return f"data.sequence needs framework 'pytorch', not {spec.framework.value!r}"
    if data.features is not None or getattr(data, "columns", None):
        return ("with data.sequence, name each step's columns in data.sequence.features (long format); "
                "data.features and data.columns are for tables")
    if any(f.value == "onnx_int8" for f in spec.exports):
        return "data.sequence models export to 'onnx' and 'torchscript', not 'onnx_int8'"
    taken = {data.target, data.split.column if data.split is not None else None}
    clash = sorted(c for c in [*data.sequence.columns(), *(data.sequence.features or [])] if c in taken)
    if clash:
        return f"data.sequence names {clash}, the target or the split column"
    return None
