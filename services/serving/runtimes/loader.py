"""Which runtime serves a version, and the signature requests are checked against.

The format: the version's ``shipyard.format`` tag when the version holds that format's files;
otherwise the first of onnx_int8 > onnx > torchscript > savedmodel that it holds (``onnx_int8``
is an ONNX file too, opened by the same runtime). A savedmodel is served
only through TF Serving, so it is a candidate only when ``tf_serving_address`` is set.

The signature: the stored one for that format (``signature.json``'s ``formats[fmt]``, or the
``shipyard.signature`` tag when it describes that format), else the runtime's own. A classifier's
``signature.json`` also names its class ``labels`` (its first output's columns, in order) and the
``features`` its input's columns are; the protocols answer with them (label per row, classify). A
sequence model's holds ``sequence.max_length``, the most steps a sequence may have; every GET shows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.serving.runtimes.base import (
    FORMAT_ONNX,
    FORMAT_ONNX_INT8,
    FORMAT_PREFERENCE,
    FORMAT_SAVEDMODEL,
    FORMAT_TORCHSCRIPT,
    ModelLoadError,
    Runtime,
    Signature,
)
from services.serving.runtimes.onnx import find_model_file, load_onnx
from services.serving.runtimes.text import TOKENIZER_FILE, TextEncoder, load_text_encoder
from services.serving.runtimes.torchscript import TORCHSCRIPT_FILE_NAME, load_torchscript
from services.serving.settings import ServingSettings
from shipyard_common.lineage import COLUMNS_FILE, ONNX_FILE_NAME, SIGNATURE_FILE, TAG_FORMAT, TAG_SIGNATURE

log = logging.getLogger("shipyard.serving.runtimes")


@dataclass(frozen=True)
class LoadedRuntime:
    runtime: Runtime
    #: What requests are checked against: the stored signature, or the runtime's own.
    signature: Signature
    #: A text model's tokenizer (runtimes/text.py): raw text in place of its token ids.
    text: TextEncoder | None = None
    #: A table's columns as the trainer fitted them (``columns.json``: type, categories, imputation),
    #: shown to clients; the graph applies them itself.
    columns: list[dict[str, Any]] | None = None


def model_root(folder: Path) -> Path:
    """The version's model folder: the shallowest one holding ``signature.json``, else ``folder``."""
    found = sorted(folder.rglob(SIGNATURE_FILE), key=lambda p: (len(p.parts), str(p)))
    return found[0].parent if found else folder


def format_files(root: Path) -> dict[str, Path]:
    """The formats ``root`` holds, each with the path its runtime opens."""
    files: dict[str, Path] = {}
    onnx = root / FORMAT_ONNX / ONNX_FILE_NAME
    if onnx.is_file():
        files[FORMAT_ONNX] = onnx
    else:
        # Versions registered before the model folder: a model.onnx anywhere in the artifacts.
        with contextlib.suppress(ModelLoadError):
            files[FORMAT_ONNX] = find_model_file(root)
    int8 = root / FORMAT_ONNX_INT8 / ONNX_FILE_NAME
    if int8.is_file():
        files[FORMAT_ONNX_INT8] = int8
    torchscript = root / FORMAT_TORCHSCRIPT / TORCHSCRIPT_FILE_NAME
    if torchscript.is_file():
        files[FORMAT_TORCHSCRIPT] = torchscript
    savedmodel = root / FORMAT_SAVEDMODEL
    if (savedmodel / "saved_model.pb").is_file():
        files[FORMAT_SAVEDMODEL] = savedmodel
    return files


def choose_format(tags: Mapping[str, str], available: dict[str, Path], *, tf_serving: bool) -> str:
    servable = [f for f in FORMAT_PREFERENCE if f in available and (f != FORMAT_SAVEDMODEL or tf_serving)]
    tagged = tags.get(TAG_FORMAT)
    if tagged in servable:
        return str(tagged)
    if not servable:
        held = sorted(available)
        if held == [FORMAT_SAVEDMODEL]:
            raise ModelLoadError(
                "the version holds only a savedmodel, which serving answers through TF Serving: "
                "set SHIPYARD_SERVING_TF_SERVING_ADDRESS"
            )
        raise ModelLoadError(
            f"the version holds no format serving can load (looked for {', '.join(FORMAT_PREFERENCE)})"
        )
    if tagged:
        log.warning("the version's %s is %r, which it cannot be served as here; serving %s",
                    TAG_FORMAT, tagged, servable[0])
    return servable[0]


def stored_signature(root: Path, tags: Mapping[str, str], fmt: str) -> Signature | None:
    """The signature the trainer stored for ``fmt``, if any."""
    path = root / SIGNATURE_FILE
    if path.is_file():
        try:
            data: Any = json.loads(path.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{SIGNATURE_FILE} is not valid JSON: {exc}") from exc
        formats = data.get("formats") if isinstance(data, dict) else None
        if isinstance(formats, dict) and isinstance(formats.get(fmt), dict):
            merged = {key: data.get(key) for key in ("classes", "labels", "features", "sequence")}
            return _with_labels(Signature.from_json({**merged, **formats[fmt]}))
        if isinstance(data, dict) and data.get("primary") == fmt:
            return _with_labels(Signature.from_json(data))
    tagged = tags.get(TAG_SIGNATURE)
    if tagged and tags.get(TAG_FORMAT) == fmt:
        try:
            return Signature.from_json(json.loads(tagged))
        except ValueError as exc:
            raise ModelLoadError(f"the {TAG_SIGNATURE} tag is not valid JSON: {exc}") from exc
    return None


def _with_labels(signature: Signature) -> Signature:
    """``signature``, once its labels are known to name its first output's columns, one each."""
    if signature.labels is None:
        return signature
    first = signature.outputs[0]
    columns = first.shape[-1] if len(first.shape) == 2 else None
    if len(first.shape) != 2 or (columns is not None and columns != len(signature.labels)):
        raise ModelLoadError(
            f"the signature names {len(signature.labels)} class labels, but its first output "
            f"{first.describe()} does not have one column per label"
        )
    return signature


def _check_names(stored: Signature, own: Signature) -> None:
    if sorted(stored.input_names) != sorted(own.input_names) or not set(stored.output_names) <= set(
        own.output_names
    ):
        raise ModelLoadError(
            f"the stored signature (inputs {stored.input_names}, outputs {stored.output_names}) does not "
            f"match the model's own (inputs {own.input_names}, outputs {own.output_names})"
        )


def inside(folder: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``folder``: a symbolic link in a version's files that leads
    elsewhere on the host (a model, a signature or a whole folder) is refused, never read."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ModelLoadError(
            f"{path.relative_to(folder)} resolves outside the version's files (a symbolic link to "
            f"{path.resolve()}); refused"
        )
    return path


def load_runtime(
    folder: Path, *, name: str, version: str, tags: Mapping[str, str], settings: ServingSettings
) -> LoadedRuntime:
    """Open the version in ``folder`` with the runtime its format needs; warm it up. Every file it
    reads must lie inside ``folder`` (:func:`inside`)."""
    root = inside(folder, model_root(folder))
    available = format_files(root)
    fmt = choose_format(tags, available, tf_serving=settings.tf_serving_address is not None)
    inside(folder, available[fmt])
    inside(folder, root / SIGNATURE_FILE)
    stored = stored_signature(root, tags, fmt)
    runtime: Runtime
    if fmt in (FORMAT_ONNX, FORMAT_ONNX_INT8):
        runtime = load_onnx(available[fmt], intra_op_threads=settings.intra_op_threads,
                            graph_optimization=settings.graph_optimization,
                            choose_threads=settings.choose_intra_op_threads)
        runtime.format = fmt  # the status says which of the two files answers
    elif fmt == FORMAT_TORCHSCRIPT:
        runtime = load_torchscript(
            available[fmt], signature=stored, intra_op_threads=settings.intra_op_threads
        )
    else:
        from services.serving.runtimes.tfserving_grpc import connect_tf_serving

        assert settings.tf_serving_address is not None
        runtime = connect_tf_serving(address=settings.tf_serving_address, model_name=name, version=version,
                                     timeout_s=settings.tf_serving_timeout_s)
    signature = runtime.signature if stored is None else stored
    try:
        if stored is not None:
            _check_names(stored, runtime.signature)
        inside(folder, root / TOKENIZER_FILE)
        text = load_text_encoder(root, signature)
        columns = table_columns(inside(folder, root / COLUMNS_FILE))
    except ModelLoadError:
        runtime.close()
        raise
    return LoadedRuntime(runtime=runtime, signature=signature, text=text, columns=columns)


def input_limits(signature: Signature, text: TextEncoder | None) -> dict[str, dict[str, Any]]:
    """The most a version's input reads, as every protocol's GET shows it: ``text`` (the tokens each text
    is cut or padded to) for a text model, ``sequence`` (the steps a sequence may have) for a sequence
    model; each ``{"input": name, "max_length": n}``."""
    limits: dict[str, dict[str, Any]] = {}
    if text is not None:
        limits["text"] = {"input": text.input, "max_length": text.max_length}
    if signature.sequence_max_length is not None:
        limits["sequence"] = {"input": signature.inputs[0].name, "max_length": signature.sequence_max_length}
    return limits


def table_columns(path: Path) -> list[dict[str, Any]] | None:
    """The version's table columns (``{"columns": [...]}``), if it holds them."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())["columns"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{COLUMNS_FILE} is not a record of a table's columns ({exc})") from None
    if not isinstance(found, list) or not all(isinstance(column, dict) for column in found):
        raise ModelLoadError(f"{COLUMNS_FILE} holds no list of columns")
    return found
