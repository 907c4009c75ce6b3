"""On a CUDA machine: a ``gpu``-queue job through ``torch_job.fit`` lands on the GPU, records it,
and its exports (trained on CUDA, exported on CPU) match. Prints what it saw; exits 1 if not."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_training import images
from services.trainer.engines import engine, torch_job
from services.trainer.engines.types import FitContext
from services.trainer.jobs.schemas import JobCreate


def main() -> None:
    spec = JobCreate.model_validate({
        "model_name": "gpu-check",
        "model": {"type": "cnn", "input_shape": [1, 28, 28], "channels": [16, 32], "hidden": 64},
        "data": {"dataset": "images", "rev": "0" * 40, "task": "classification", "target": "label"},
        "training": {"epochs": 2, "batch_size": 128, "precision": "bf16", "pin_memory": True},
        "resources": {"queue": "gpu"},
        "exports": ["onnx", "torchscript"],
    })
    epochs: list[int] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for sub in ("checkpoint", "tensorboard"):
            (work / sub).mkdir()
        context = FitContext(
            spec=spec, frame=images(5000), device=engine.pick_device("gpu"), workdir=work,
            observer=lambda epoch, step, metrics: epochs.append(epoch) if metrics else None,
            checkpoint_dir=work / "checkpoint", checkpoint_saved=lambda: None, resume_dir=None,
            tensorboard_dir=work / "tensorboard", plan=lambda steps: None,
        )
        outcome = torch_job.fit(context)
    diffs = {e.format.value: e.max_abs_diff for e in outcome.exports}
    accuracy = outcome.metrics["val_accuracy"]
    print(f"device recorded: {outcome.device}; epochs {epochs}; val_accuracy {accuracy:.4f}; "
          f"export max |diff| {diffs}")
    ok = outcome.device == "cuda" and torch.cuda.is_available() and all(d <= 1e-4 for d in diffs.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
