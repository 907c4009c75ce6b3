"""Which framework fits a job: :func:`fit` hands the runner's context to the spec's framework.

The context and the outcome are :mod:`services.trainer.engines.types`. The runner
(:mod:`services.trainer.worker.runner`) owns the job row, the MLflow run, checkpoint uploads,
cancellation and registration; a framework owns turning a data frame and a spec into a fitted,
exported, checked model:

- ``pytorch`` and ``transformers``: :mod:`services.trainer.engines.torch_job` (the engine in
  :mod:`services.trainer.engines.engine`, in this process, or under torchrun when ``gpus > 1``);
- ``keras``: :mod:`services.trainer.engines.keras_job`, in a child process, because Keras picks its
  backend once per process (torch by default, TensorFlow when a SavedModel is wanted).

Every framework reports through the same :class:`~services.trainer.engines.types.FitContext`
callbacks, so progress, cancel, checkpoints and resume behave the same whichever one trained
the model.
"""

from __future__ import annotations

from services.trainer.engines.types import FitContext, FitOutcome
from services.trainer.jobs.schemas import Framework


def fit(context: FitContext) -> FitOutcome:
    """Train, export and check the model that ``context.spec`` describes."""
    if context.spec.framework == Framework.KERAS:
        from services.trainer.engines import keras_job

        return keras_job.fit(context)
    from services.trainer.engines import torch_job

    return torch_job.fit(context)
