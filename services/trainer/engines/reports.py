"""The pictures and tables a finished training run leaves next to its model.

``confusion_matrix.json`` / ``.png`` for classifiers and ``training_curves.png`` for every run,
written into a folder for :meth:`services.trainer.engines.tracking.Tracking.log_reports` to upload.
Matplotlib runs on its Agg backend: a worker has no display.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from services.trainer.jobs.schemas import Task
from shipyard_common.lineage import CONFUSION_JSON, CONFUSION_PNG, CURVES_PNG, REPORTS_ARTIFACT_PATH

if TYPE_CHECKING:
    from services.trainer.engines.tracking import Tracking


class Reported(Protocol):
    """What the reports read: a :class:`~services.trainer.engines.types.FitOutcome` has it all."""

    task: Task
    classes: list[Any]
    confusion: list[list[int]] | None
    history: list[dict[str, float]]
    best_epoch: int | None



def write_reports(result: Reported, folder: Path) -> list[Path]:
    """Write this run's report files into ``folder``; return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no-op when a backend was already chosen headless
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if result.task == Task.CLASSIFICATION and result.confusion is not None:
        paths += _confusion(result.confusion, result.classes, result.best_epoch, folder)
    if result.history:
        paths.append(_curves(result.history, result.best_epoch, folder / CURVES_PNG))
    return paths


def log_run_reports(tracking: Tracking, run_id: str, result: Reported) -> list[str]:
    """Write the reports to a scratch folder and upload them to the run's ``reports/``; their names."""
    with tempfile.TemporaryDirectory(prefix="shipyard-reports-") as folder:
        paths = write_reports(result, Path(folder))
        tracking.log_reports(run_id, paths, artifact_path=REPORTS_ARTIFACT_PATH)
        return [path.name for path in paths]


def _figure() -> Any:
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: no global state shared with whatever else the process does.
    return Figure(figsize=(6.4, 4.8), dpi=100)


def _confusion(
    matrix: list[list[int]], classes: list[Any], best_epoch: int | None, folder: Path
) -> list[Path]:
    labels = [str(c) for c in classes]
    as_json = folder / CONFUSION_JSON
    as_json.write_text(json.dumps(
        {"labels": labels, "matrix": matrix, "rows": "true", "columns": "predicted", "epoch": best_epoch},
        indent=2,
    ))
    figure = _figure()
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center",
                      color="white" if count > peak / 2 else "black")
    axes.set_title("Validation confusion matrix")
    figure.tight_layout()
    as_png = folder / CONFUSION_PNG
    figure.savefig(as_png)
    return [as_json, as_png]


def _curves(history: list[dict[str, float]], best_epoch: int | None, path: Path) -> Path:
    epochs = [int(h["epoch"]) for h in history]
    figure = _figure()
    loss_axes, score_axes = figure.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        loss_axes.plot(epochs, [h[key] for h in history], label=key)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_title("loss")
    scores = [k for k in ("val_accuracy", "val_f1_macro", "val_roc_auc", "val_mae") if k in history[-1]]
    for key in scores:
        score_axes.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    score_axes.set_xlabel("epoch")
    score_axes.set_title("validation")
    for axes in (loss_axes, score_axes):
        if best_epoch is not None:
            axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path
