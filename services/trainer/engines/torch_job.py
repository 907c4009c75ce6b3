"""Frameworks ``pytorch`` and ``transformers``: the engine's loop, then the exports, checked.

``transformers`` is the same loop on token ids (see :mod:`services.trainer.engines.text`); ``gpus > 1``
runs the same loop under torchrun (see :mod:`services.trainer.engines.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from services.trainer.engines import crossval, engine, preprocess, quantize
from services.trainer.engines.resume import CHECKPOINT_FILE, load_resume
from services.trainer.engines.tabular import metrics_on_test_rows
from services.trainer.engines.types import Export, FitContext, FitOutcome, Fold, TabularData
from services.trainer.jobs.schemas import ExportFormat, Framework, JobCreate
from shipyard_common.lineage import COLUMNS_FILE

log = logging.getLogger("shipyard.trainer.torch_job")


def prepare(context: FitContext) -> TabularData:
    spec = context.spec
    if spec.framework == Framework.TRANSFORMERS:
        from services.trainer.engines import text

        return text.prepare_text_data(context.frame, spec, workdir=context.workdir)
    return engine.prepare_data(context.frame, spec, context.test_frame, parent_table=parent_table(context))


def parent_table(context: FitContext) -> preprocess.Table | None:
    """The table of the version this job fine-tunes, if it has one."""
    if context.initial_columns is None:
        return None
    return preprocess.table_of(context.initial_columns, where="init_from: the parent version's columns.json")


def fit(context: FitContext) -> FitOutcome:
    spec = context.spec
    data = prepare(context)
    folds: list[Fold] = []
    final_steps = engine.steps_per_epoch(data, spec) * spec.training.epochs
    if spec.evaluation is not None:
        cuts = crossval.cuts(data, spec)
        fold_steps = crossval.steps(data, spec, cuts)
        context.plan(fold_steps + final_steps)
        folds = crossval.cross_validate(data, context, cuts)
        context = dataclasses.replace(context, observer=crossval.shifted(context.observer, fold_steps))
    else:
        context.plan(final_steps)
    if spec.resources.gpus > 1:
        from services.trainer.engines import distributed

        result = distributed.train(data, context)
    else:
        result = train_here(data, context)
    tested = metrics_on_test_rows(data, lambda rows: engine.predict_rows(result.model, rows, spec))
    n_test = 0 if data.x_test is None else len(data.x_test)
    if tested:
        log.info("test metrics on %d rows neither training nor early stopping saw: %s", n_test, tested)
    exports = export_all(result.model, data, spec, context)
    outcome = FitOutcome(
        task=data.task, features=data.features, target=data.target, classes=data.classes,
        n_train=len(data.x_train), n_val=len(data.x_val),
        metrics={**result.metrics, **tested, **crossval.summary(folds)}, folds=folds,
        n_test=n_test, rows=data.rows,
        history=result.history, confusion=result.confusion, best_epoch=result.best_epoch,
        stopped_early=result.stopped_early, seconds=result.seconds, device=result.device,
        exports=exports, state_dict=result.model.state_dict(),
        artifacts=[*getattr(data, "artifacts", []), *table_artifacts(data, context)],
        columns=[] if data.table is None else data.table.describe(),
        card={"parameters": sum(p.numel() for p in result.model.parameters()),
              "architecture": type(result.model).__name__},
    )
    quantize.add_int8(outcome, data, spec, context.workdir / "exports")
    return outcome


def table_artifacts(data: TabularData, context: FitContext) -> list[tuple[Path, str]]:
    """A table's columns as declared or inferred and fitted (the version's ``columns.json``), if any."""
    if data.table is None:
        return []
    path = context.workdir / COLUMNS_FILE
    path.write_text(json.dumps({"columns": data.table.describe()}, indent=2))
    return [(path, ".")]


def train_here(data: TabularData, context: FitContext) -> engine.TrainResult:
    """The engine in this process, checkpointing into ``context.checkpoint_dir`` every epoch."""
    checkpoint_file = context.checkpoint_dir / CHECKPOINT_FILE

    def checkpointer(state: dict[str, Any]) -> None:
        engine.save_checkpoint(state, checkpoint_file)
        context.checkpoint_saved()

    resume = load_resume(context)
    return engine.train(
        data, context.spec, device=context.device, observer=context.observer, checkpointer=checkpointer,
        resume=resume, tensorboard_dir=context.tensorboard_dir, initial_weights=context.initial_weights,
        plugin_dir=context.plugin_dir,
    )


def export_all(model: Any, data: TabularData, spec: JobCreate, context: FitContext) -> list[Export]:
    """Every format the spec asks for, each checked against PyTorch on the validation rows; but
    ``onnx_int8``, which :func:`~services.trainer.engines.quantize.add_int8` makes from the ONNX one."""
    from services.trainer.engines import export

    exports: list[Export] = []
    folder = context.workdir / "exports"
    for fmt in spec.exports:
        if fmt == ExportFormat.ONNX_INT8:
            continue
        if fmt == ExportFormat.ONNX:
            done = export.export_onnx(
                model, task=data.task, example=export.example_input(data),
                path=folder / "onnx" / "model.onnx", check_rows=data.x_val, classes=data.classes,
                table=data.table, check_frame=data.val_frame,
            )
        elif fmt == ExportFormat.TORCHSCRIPT:
            done = export.export_torchscript(
                model, task=data.task, example=export.example_input(data),
                path=folder / "torchscript" / "model.pt", check_rows=data.x_val, classes=data.classes,
            )
        else:  # the schema allows only the two above for these frameworks
            raise AssertionError(fmt)
        log.info("exported %s: max |difference| from PyTorch on %d held-out rows = %.3g",
                 fmt.value, len(data.x_val), done.max_abs_diff)
        exports.append(Export(format=fmt, path=done.path, max_abs_diff=done.max_abs_diff,
                              signature=done.signature))
    return exports
