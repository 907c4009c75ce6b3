"""The folder a registered version points at: its exports, signature and model card.

The card is written for the person deciding whether to promote the version: what it was
trained on, how well it did on held-out rows, what it is for and where it is known to fall
short. ``model_card.json`` carries the same facts for programs (the registry UI shows it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.trainer.engines.types import Export, FitOutcome
from services.trainer.jobs.schemas import ExportFormat, JobCreate, Task
from shipyard_common.lineage import MODEL_CARD_FILE, MODEL_CARD_JSON, SIGNATURE_FILE, SPLIT_FILE

# Serving prefers the first format of this order that a version holds: an int8 file is there only
# when the job asked for it and it scored within training.quantization_tolerance of the fp32 one.
SERVING_PREFERENCE = (ExportFormat.ONNX_INT8, ExportFormat.ONNX, ExportFormat.TORCHSCRIPT,
                      ExportFormat.SAVEDMODEL)
_METRIC_NAMES = {
    "val_accuracy": "accuracy", "val_f1_macro": "F1 (macro)", "val_roc_auc": "ROC-AUC",
    "val_loss": "loss", "val_mse": "MSE", "val_mae": "MAE", "train_loss": "training loss",
    "test_accuracy": "test accuracy", "test_f1_macro": "test F1 (macro)", "test_roc_auc": "test ROC-AUC",
    "test_mse": "test MSE", "test_mae": "test MAE",
}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    primary: Export
    card: dict[str, Any]


def primary_export(exports: list[Export]) -> Export:
    by_format = {e.format: e for e in exports}
    return next(by_format[f] for f in SERVING_PREFERENCE if f in by_format)


def write_model_folder(
    *, outcome: FitOutcome, spec: JobCreate, lineage: dict[str, str], folder: Path
) -> ModelFolder:
    """Lay out ``folder`` as the version's source: ``<format>/…`` per export, signature, card."""
    folder.mkdir(parents=True, exist_ok=True)
    for export in outcome.exports:
        target = folder / export.format.value
        if export.path.is_dir():
            shutil.copytree(export.path, target, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export.path, target / export.path.name)
    for path, artifact_folder in outcome.artifacts:
        target = folder / artifact_folder
        target.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / path.name)
    if outcome.rows:
        (folder / SPLIT_FILE).write_text(json.dumps(split_record(outcome=outcome, spec=spec)))
    primary = primary_export(outcome.exports)
    signatures = {e.format.value: e.signature for e in outcome.exports}
    (folder / SIGNATURE_FILE).write_text(json.dumps(
        {"primary": primary.format.value, **primary.signature, **names(outcome), "formats": signatures},
        indent=2, sort_keys=True,
    ))
    card = card_facts(outcome=outcome, spec=spec, lineage=lineage)
    (folder / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    (folder / MODEL_CARD_FILE).write_text(render_card(card))
    return ModelFolder(path=folder, primary=primary, card=card)


def names(outcome: FitOutcome) -> dict[str, list[str]]:
    """What serving answers with: the input's ``features`` (column names, in order) and, for a
    classifier, its class ``labels`` in output order, each target value as a string (for a text
    classifier, its id2label: output ``i`` is ``labels[i]``)."""
    found = {"features": [str(name) for name in outcome.features]}
    if outcome.task == Task.CLASSIFICATION and outcome.classes:
        found["labels"] = [str(label) for label in outcome.classes]
    return found


def split_record(*, outcome: FitOutcome, spec: JobCreate) -> dict[str, Any]:
    """How the rows were split and each part's row positions in the dataset revision, so that anyone can
    recompute any figure: the version's ``split.json``."""
    split = spec.data.split
    if split is None:
        how = {"method": "validation_split", "validation_split": spec.data.validation_split,
               "seed": spec.training.seed}
    elif split.column is not None:
        how = {"method": "column", "column": split.column}
    else:
        how = {"method": "shares", "train": split.train, "validation": split.validation, "test": split.test,
               "seed": split.seed}
    if split is not None and split.test_rev is not None:
        how["test_revision"] = split.test_rev  # rows["test"]: positions in that revision
    stratified = outcome.task == Task.CLASSIFICATION and how["method"] != "column"
    record = {"dataset": spec.data.dataset, "revision": spec.data.rev, **how, "stratified": stratified,
              "rows": outcome.rows}
    if outcome.folds and spec.evaluation is not None:  # cross-validation: each fold's validation rows
        record["folds"] = {"kfold": spec.evaluation.kfold, "stratified": spec.evaluation.stratified,
                           "rows": [fold.rows for fold in outcome.folds]}
    return record


def card_facts(*, outcome: FitOutcome, spec: JobCreate, lineage: dict[str, str]) -> dict[str, Any]:
    classification = outcome.task == Task.CLASSIFICATION
    tested = (f"; tested once on {outcome.n_test} more rows that neither training nor early stopping saw "
              "(the test_* metrics)") if outcome.n_test else ""
    limits = [
        f"Validated on {outcome.n_val} held-out rows of the same dataset revision{tested}; expect worse "
        "on data from another source or period: watch the monitor's drift report.",
        f"Inputs must be the {len(outcome.features)} feature(s) {outcome.features[:20]} in that order, "
        "with the meaning and units they had in training.",
    ]
    if classification:
        limits.append(f"Only ever answers one of the classes seen in training: {outcome.classes[:50]}.")
    if outcome.stopped_early:
        limits.append(f"Training stopped early; the weights are those of epoch {outcome.best_epoch}.")
    return {
        "model_name": spec.model_name,
        "framework": spec.framework.value,
        "architecture": spec.model.type,
        "details": outcome.card,
        "task": outcome.task.value,
        "intended_use": (
            f"{'Classify' if classification else 'Predict'} {outcome.target!r} from "
            f"{', '.join(outcome.features[:10])}{' …' if len(outcome.features) > 10 else ''}, for rows "
            f"drawn like those of dataset {spec.data.dataset!r}. Not for decisions about people without "
            "a review of the data's provenance and of per-group error rates, which Shipyard does not compute."
        ),
        "data": {
            "dataset": spec.data.dataset, "revision": spec.data.rev, "target": outcome.target,
            "features": outcome.features, "rows_train": outcome.n_train, "rows_validation": outcome.n_val,
            "rows_test": outcome.n_test, "validation_split": spec.data.validation_split,
            "split": None if spec.data.split is None else spec.data.split.model_dump(exclude_none=True),
            "classes": outcome.classes,
        },
        "training": {
            "epochs_run": len(outcome.history), "best_epoch": outcome.best_epoch,
            "stopped_early": outcome.stopped_early, "device": outcome.device,
            "seconds": round(outcome.seconds, 2), "seed": spec.training.seed,
            "precision": spec.training.precision.value,
        },
        "metrics": outcome.metrics,
        "exports": {e.format.value: {"max_abs_diff": e.max_abs_diff} for e in outcome.exports},
        "lineage": lineage,
        "limitations": limits,
    }


def _quantization_lines(facts: dict[str, Any] | None) -> list[str]:
    """What became of export onnx_int8 (services/trainer/engines/quantize.py), if the job asked for it."""
    if not facts:
        return []
    return [
        f"- onnx_int8 {'kept' if facts['kept'] else 'dropped'}: {facts['metric']} {facts['int8']:.4g} "
        f"against fp32's {facts['fp32']:.4g} on {facts['n_rows']} {facts['rows']} rows "
        f"(training.quantization_tolerance {facts['tolerance']:g})"
    ]


def render_card(card: dict[str, Any]) -> str:
    data, training = card["data"], card["training"]
    lines = [
        f"# {card['model_name']}",
        "",
        f"A {card['framework']} `{card['architecture']}` {card['task']} model trained by Shipyard.",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "## Data",
        f"- Dataset `{data['dataset']}` at revision `{data['revision']}`",
        f"- Target `{data['target']}`; {len(data['features'])} feature(s)",
        f"- {data['rows_train']} training rows, {data['rows_validation']} validation rows"
        + (f", {data['rows_test']} test rows (split.json)" if data.get("rows_test") else ""),
    ]
    if data["classes"]:
        lines.append(f"- Classes: {', '.join(str(c) for c in data['classes'][:50])}")
    heading = "## Metrics (validation; test_* once on the test rows)" if data.get("rows_test") else (
        "## Metrics (validation)")
    lines += ["", heading, "| metric | value |", "|---|---|"]
    for key, value in card["metrics"].items():
        lines.append(f"| {_METRIC_NAMES.get(key, key)} | {value:.4g} |")
    lines += [
        "",
        "## Training",
        f"- {training['epochs_run']} epoch(s) on {training['device']} in {training['seconds']} s, "
        f"{training['precision']}, seed {training['seed']}"
        + (f"; stopped early, best epoch {training['best_epoch']}" if training["stopped_early"] else ""),
        "",
        "## Exports",
    ]
    for name, facts in card["exports"].items():
        source = "the fp32 ONNX file" if name == ExportFormat.ONNX_INT8.value else "the framework"
        lines.append(
            f"- {name}: max |difference| from {source} on validation rows {facts['max_abs_diff']:.3g}"
        )
    lines += _quantization_lines(card["details"].get("quantization"))
    lines += ["", "## Lineage"]
    lines += [f"- {key}: `{value}`" for key, value in sorted(card["lineage"].items())]
    lines += ["", "## Limitations"]
    lines += [f"- {limit}" for limit in card["limitations"]]
    return "\n".join(lines) + "\n"
