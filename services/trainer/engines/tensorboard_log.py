"""The PyTorch engine's per-epoch TensorBoard scalars (losses, lr, validation metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tensorboard_without_tensorflow() -> None:
    """Let TensorBoard use its own TF stub rather than import TensorFlow (installed for Keras).

    ``tensorboard.compat`` imports ``tensorflow`` (seconds) unless ``tensorboard.compat.notf``
    exists, the marker of its TensorFlow-free build; the event files are the same either way.
    Left alone when TensorFlow is already loaded in this process.
    """
    import sys
    import types

    if "tensorflow" not in sys.modules and "tensorboard.compat.notf" not in sys.modules:
        sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")


class TensorBoardLog:
    """Per-epoch scalars to ``SummaryWriter`` (imported only when asked for: it is slow to import)."""

    def __init__(self, folder: Path | None) -> None:
        self.writer: Any = None
        if folder is not None:
            tensorboard_without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter

            folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name == "lr":
                tag = "lr"
            elif name.startswith("val_"):
                tag = f"val/{name[4:]}"
            elif name.startswith("train_"):
                tag = f"train/{name[6:]}"
            else:
                tag = name
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
