"""Names of datasets and the ways a revision may be given: a git sha (short or full), a tag, ``latest``."""

from __future__ import annotations

import re

from shipyard_common.errors import InvalidInput

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
REVISION = re.compile(r"^[0-9a-f]{7,64}$")
FULL_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LATEST = "latest"
# Words git gives a meaning of its own, and branch names (moving targets, never a version): as a
# tag they would read as something else.
RESERVED_TAGS = frozenset({"HEAD", "FETCH_HEAD", "ORIG_HEAD", "MERGE_HEAD", "main", "master", LATEST})


def validate_name(name: str, *, kind: str = "dataset") -> str:
    """Names that become file paths or registry keys: no separators, no '..', no leading dot."""
    if not DATASET_NAME.match(name) or ".." in name:
        raise InvalidInput(
            f"{kind} name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def validate_dataset_name(name: str) -> str:
    return validate_name(name, kind="dataset")


def validate_revision(rev: str) -> str:
    """A git commit id, short or full."""
    if not REVISION.match(rev):
        raise InvalidInput(f"dataset revision {rev!r} is not a git commit id (7-64 hex digits)")
    return rev


def validate_tag(tag: str) -> str:
    if not TAG.match(tag) or ".." in tag or tag.endswith(".lock") or tag in RESERVED_TAGS:
        raise InvalidInput(
            f"dataset tag {tag!r} is not allowed: up to 64 letters, digits, '_', '-' and '.', starting "
            f"with a letter or digit, and none of {', '.join(sorted(RESERVED_TAGS))}"
        )
    return tag


def validate_ref(ref: str) -> str:
    """What a job or a command may name a dataset version by: a git commit id (7-64 hex digits),
    a tag given at ``shipyard data add --tag``, or ``latest``."""
    if ref == LATEST or REVISION.match(ref):
        return ref
    try:
        return validate_tag(ref)
    except InvalidInput:
        raise InvalidInput(
            f"dataset revision {ref!r} is not a git commit id (7-64 hex digits), a tag or 'latest'"
        ) from None
