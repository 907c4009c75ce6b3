"""A lost worker's checkpoint, as the PyTorch engine (in this process or under torchrun) reads it."""

from __future__ import annotations

import logging
from typing import Any

from services.trainer.engines import engine
from services.trainer.engines.types import FitContext

log = logging.getLogger("shipyard.trainer.torch_job")

# The file a PyTorch job's checkpoint folder holds: the full training state of the last epoch.
CHECKPOINT_FILE = "last.pt"


def load_resume(context: FitContext) -> dict[str, Any] | None:
    """The lost worker's checkpoint, or None (none saved, or unreadable: then train from epoch 1)."""
    if context.resume_dir is None:
        return None
    path = context.resume_dir / CHECKPOINT_FILE
    if not path.is_file():
        log.info("no checkpoint to resume from; training starts at epoch 1")
        return None
    try:
        return engine.load_checkpoint(path)
    except Exception as exc:  # a torn or foreign file: training from scratch still gives a model
        log.warning("could not read the checkpoint (%s); training starts at epoch 1", exc)
        return None
