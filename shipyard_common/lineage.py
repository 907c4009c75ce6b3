"""Names that the trainer writes on MLflow objects and the registry, serving and monitor read."""

from __future__ import annotations

from collections.abc import Mapping

PRODUCTION = "production"
STAGING = "staging"
CANARY = "canary"
SHADOW = "shadow"
ALIASES = (PRODUCTION, STAGING, CANARY, SHADOW)
# Registered-model tag: the share of requests (0, 1] that serving sends to the canary alias.
TAG_CANARY_WEIGHT = "shipyard.canary_weight"
DEFAULT_CANARY_WEIGHT = 0.1

TAG_JOB_ID = "shipyard.job_id"
TAG_DATASET = "shipyard.dataset"
TAG_DATASET_REV = "shipyard.dataset_rev"
TAG_GIT_COMMIT = "shipyard.git_commit"
TAG_FEATURES = "shipyard.features"
TAG_TARGET = "shipyard.target"
TAG_TASK = "shipyard.task"
TAG_FORMAT = "shipyard.format"
TAG_SIGNATURE = "shipyard.signature"
# JSON list of the formats the version's model folder holds; TAG_FORMAT names the one to serve first.
TAG_FORMATS = "shipyard.formats"
TAG_FRAMEWORK = "shipyard.framework"
# Sequence versions (data.sequence): JSON of where the dataset holds the sequences, "column" (a list
# column) or "id" and "step" (long format), the step's "features" and the "max_length" the model reads
# (shipyard_common.datasets.sequences: SequenceLayout.tag writes it, sequence_layout reads it).
TAG_SEQUENCE = "shipyard.sequence"
# Fine-tuned versions: "<model>/<version>" of the registered parent, or "pretrained:<checkpoint>".
TAG_PARENT = "shipyard.parent"

# A version's lineage, field by field: the trainer writes these tags on the run and the version
# (:func:`lineage_tags`), the registry reads them back as the version's ``lineage``
# (:func:`read_lineage`). One table, so that a tag added here is both written and read.
LINEAGE_TAGS: dict[str, str] = {
    "job_id": TAG_JOB_ID,
    "dataset": TAG_DATASET,
    "dataset_rev": TAG_DATASET_REV,
    "git_commit": TAG_GIT_COMMIT,
    "framework": TAG_FRAMEWORK,
    "parent": TAG_PARENT,
    "task": TAG_TASK,
}


def lineage_tags(**fields: str | None) -> dict[str, str]:
    """The tags that record ``fields`` (named as in :data:`LINEAGE_TAGS`); a None field is left out."""
    unknown = sorted(set(fields) - set(LINEAGE_TAGS))
    if unknown:
        raise KeyError(f"not lineage field(s): {unknown}; known: {sorted(LINEAGE_TAGS)}")
    return {LINEAGE_TAGS[name]: value for name, value in fields.items() if value is not None}


def read_lineage(tags: Mapping[str, str]) -> dict[str, str | None]:
    """The lineage fields that a run's or version's ``tags`` record, None where a tag is absent."""
    return {name: tags.get(tag) for name, tag in LINEAGE_TAGS.items()}


# Version tags ``shipyard.metric.<name>``: the metrics of the model that was registered (with early
# stopping's restore_best, an earlier epoch's), unlike the run's summary (its last logged values).
METRIC_TAG_PREFIX = "shipyard.metric."
# Version tag set by the registry: an archived version can no longer be given an alias.
TAG_ARCHIVED = "shipyard.archived"

# A version's source is the run's ``model/`` folder: one sub-folder per export format
# (``onnx/model.onnx``, ``torchscript/model.pt``, ``savedmodel/``), the tokenizer for text
# models, ``signature.json``, ``split.json`` and the model card (``MODEL_CARD.md`` / ``model_card.json``).
MODEL_ARTIFACT_PATH = "model"
MODEL_CARD_FILE = "MODEL_CARD.md"
MODEL_CARD_JSON = "model_card.json"
# Each format's inputs and outputs, the input's ``features`` (column names) and a classifier's ``labels``
# (its target values as strings, in the order of its probabilities), which serving answers with.
SIGNATURE_FILE = "signature.json"
# How the rows were split (train / validation / test) and each part's row positions in the revision.
SPLIT_FILE = "split.json"
# A table's columns as the trainer fitted them (type, categories, filling), beside the signature;
# serving shows them in GET of the model.
COLUMNS_FILE = "columns.json"
# The trained weights (a state dict) that ``init_from`` fine-tunes from; never served.
WEIGHTS_ARTIFACT_PATH = "weights"
WEIGHTS_FILE = "model.pt"

# The run's report files, drawn by the trainer and shown by the registry's web UI.
REPORTS_ARTIFACT_PATH = "reports"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"

ONNX_ARTIFACT_PATH = "onnx"
ONNX_FILE_NAME = "model.onnx"
