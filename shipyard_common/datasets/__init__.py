"""Datasets versioned with DVC, validated before a version is accepted.

A dataset version is its name plus the git commit of the data repository that pins it. Training
reads a dataset at its revision; the monitor reads the same revision as its drift reference.

Why a package in ``shipyard_common`` rather than a ``services/data`` service: the trainer's API
(which answers the dataset routes and checks a job's dataset at submit), the trainer's worker,
the monitor and the Prefect flows all read or write the same repository, and services never
import each other. One package keeps the repository layout, the validation rules and the
statistics in one place; the HTTP routes are the trainer's (``services/trainer/api/datasets.py``).

    names.py   dataset names, revisions, tags
    repo.py    DataRepo: git + DVC repository, local folder or S3 remote, add/read/resolve/diff
    predictions.py  PredictionsRepo: batch scoring's outputs in the same repository (pipelines.batch)
    rules.py   the rules YAML and its checks (pandera)
    sequences.py  a frame's variable-length sequences (list column or long format) and their layout
    stats.py   summary statistics and the distribution shift between two versions
"""

from shipyard_common.datasets.names import (
    DATASET_NAME,
    LATEST,
    REVISION,
    validate_dataset_name,
    validate_name,
    validate_ref,
    validate_revision,
    validate_tag,
)
from shipyard_common.datasets.repo import DataRepo, DatasetNotFound, DatasetVersion, S3Remote

__all__ = [
    "DATASET_NAME",
    "LATEST",
    "REVISION",
    "DataRepo",
    "DatasetNotFound",
    "DatasetVersion",
    "S3Remote",
    "validate_dataset_name",
    "validate_name",
    "validate_ref",
    "validate_revision",
    "validate_tag",
]
