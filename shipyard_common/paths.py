"""Names, files and flow parameters a caller gives: checked before any lookup or read.

A name that becomes a file path, a git ref or a registry key must be one plain segment
(:func:`shipyard_common.datasets.validate_name`); a file a caller names must lie inside the
folder the platform reads such files from (:func:`file_inside`), and is never a URL, so no
request reaches ``/etc/passwd``, ``file://`` or a cloud metadata address through a field.
Refusals are :class:`InvalidInput` (400) saying what a valid value looks like.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import Path as PathParam
from fastapi import Request

from shipyard_common.datasets.names import DATASET_NAME, validate_dataset_name, validate_name, validate_ref
from shipyard_common.errors import InvalidInput

# Where the flows read files to ingest (pipelines.flows.frame_to_csv writes them there too).
INPUTS_FOLDER = ("pipelines", "inputs")
# What a plain path does not need, and encodings, separators and URL syntax would use.
_NOT_PLAIN = re.compile(r"[%\\#?:*<>|\x00-\x1f\x7f]")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


def inputs_folder(state_dir: Path) -> Path:
    """The folder of files to ingest under the platform's state folder."""
    return state_dir.resolve().joinpath(*INPUTS_FOLDER)


def file_inside(root: Path, value: str, *, what: str) -> Path:
    """``value`` resolved inside ``root`` (given relative to it, or absolute within it).

    Refused: a URL (``file://``, ``http://169.254.169.254/…``), characters a plain path does not
    need (``%``, ``\\``, ``#``, ``?``, ``:``, control characters), a ``..`` segment, and anything
    that resolves outside ``root`` (symbolic links included).
    """
    root = root.resolve()
    hint = f"{what} must name a file in {root}, relative to it or absolute within it"
    if _URL.match(value):
        raise InvalidInput(f"{what} {value!r} is a URL: {hint}; URLs are not read")
    if not value or _NOT_PLAIN.search(value) or ".." in PurePosixPath(value).parts:
        raise InvalidInput(f"{what} {value!r} is not allowed: {hint}, without '..', '%', '\\', '#', "
                           "'?', ':' or control characters")
    path = (root / value).resolve()
    if path == root or not path.is_relative_to(root):
        raise InvalidInput(f"{what} {value!r} is outside {root}: {hint}")
    return path


#: A plain name in a route's path (a model, a dataset, a pipeline), for the OpenAPI: the pattern is what
#: ``plain_names`` admits (it refuses anything else with a 400 saying what is allowed, before FastAPI's
#: validation could answer a 422 without saying it), so the pattern is documented, not enforced here.
PlainName = Annotated[str, PathParam(
    description="Letters, digits, '_', '-' and '.', starting with a letter or digit; no '..'.",
    json_schema_extra={"pattern": DATASET_NAME.pattern},
)]


def plain_names(**kinds: str) -> Callable[[Request], None]:
    """A FastAPI dependency (for ``include_router``) that refuses (400) a path or query parameter
    in ``kinds`` (parameter -> what it names, e.g. ``name="model"``) that is not a plain name,
    before any route looks it up: one check for every route of a router, new ones included."""

    def check(request: Request) -> None:
        for parameter, kind in kinds.items():
            for value in (request.path_params.get(parameter), request.query_params.get(parameter)):
                if isinstance(value, str):
                    validate_name(value, kind=kind)

    return check


def _text(parameters: Mapping[str, Any], key: str) -> str:
    value = parameters[key]
    if key in ("parent_version", "version") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidInput(f"parameters.{key} must be a string, not {type(value).__name__}")
    return value


def _version(key: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not _VERSION.match(value):
            raise InvalidInput(f"parameters.{key} {value!r} is not a version number")
        return value

    return check


# The flow parameters that name things, and how each is checked.
_NAMED: dict[str, Callable[[str], str]] = {
    "name": validate_dataset_name,  # ingest's dataset
    "dataset_name": validate_dataset_name,
    "dataset": validate_dataset_name,  # batch_predict's input and output
    "output": validate_dataset_name,
    "model_name": lambda value: validate_name(value, kind="model"),
    "alias": lambda value: validate_name(value, kind="alias"),
    "dataset_rev": validate_ref,
    "rev": validate_ref,
    "parent_version": _version("parent_version"),
    "version": _version("version"),
}


def check_flow_names(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A caller's parameters for one of the platform's flows with their names checked (datasets,
    models, aliases, revisions, versions), and no ``config``, which is the deployments process's own
    (its URLs, folders and token)."""
    if "config" in parameters:
        raise InvalidInput("parameters.config is set by the platform (its URLs, folders and token); "
                           "leave it out")
    checked = dict(parameters)
    for key, check in _NAMED.items():
        if parameters.get(key) is not None:
            checked[key] = check(_text(parameters, key))  # a version given as a number: its text
    return checked


def check_flow_parameters(parameters: Mapping[str, Any], *, state_dir: Path) -> dict[str, Any]:
    """:func:`check_flow_names`, and ``csv_path`` a file in the inputs folder (answered resolved, so
    the flow reads that file wherever it runs): what a remote caller may ask of the flows."""
    checked = check_flow_names(parameters)
    if parameters.get("csv_path") is not None:
        path = file_inside(inputs_folder(state_dir), _text(parameters, "csv_path"), what="csv_path")
        checked["csv_path"] = str(path)
    return checked
