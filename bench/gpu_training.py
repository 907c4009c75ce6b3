"""The CNN job on a GPU in fp32 and in bf16: wall time and samples/s, bf16 as a ratio of fp32.

Runs the platform's engine (``engine.prepare_data`` + ``engine.train``: the loop a ``gpu``-queue
job runs) on an MNIST-sized image set made from scikit-learn's digits (8×8 upscaled to 28×28,
with noise and shifts, 60,000 rows), so the GPU has enough work per batch to show the
difference. Needs CUDA; prints the table that bench/RESULTS.md records.

    python bench/gpu_training.py [--rows 60000] [--epochs 3] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.engines import engine
from services.trainer.jobs.schemas import JobCreate


def images(rows: int, seed: int = 0) -> pd.DataFrame:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.images), rows)
    small = torch.from_numpy(digits.images[pick].astype(np.float32) / 16.0).unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)
    canvas = torch.zeros(rows, 1, 28, 28)
    shifts = rng.integers(0, 5, size=(rows, 2))
    for dy in range(5):
        for dx in range(5):
            mask = torch.from_numpy((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            canvas[mask, :, dy:dy + 24, dx:dx + 24] = big[mask]
    canvas += 0.1 * torch.from_numpy(rng.standard_normal(canvas.shape).astype(np.float32))
    frame = pd.DataFrame(canvas.reshape(rows, -1).numpy(), columns=[f"p{i}" for i in range(784)])
    frame["label"] = digits.target[pick]
    return frame


def spec(precision: str, *, epochs: int, batch_size: int, compile_model: bool) -> JobCreate:
    return JobCreate.model_validate({
        "model_name": "gpu-bench",
        "model": {"type": "cnn", "input_shape": [1, 28, 28], "channels": [32, 64], "hidden": 128},
        "data": {"dataset": "images", "rev": "0" * 40, "task": "classification", "target": "label"},
        "training": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 1e-3,
                     "precision": precision, "pin_memory": True, "compile": compile_model},
        "resources": {"queue": "gpu", "gpus": 1},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures the gpu queue")
    frame = images(args.rows)
    device = engine.pick_device("gpu")
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.rows} rows of 1×28×28, batch {args.batch_size}, {args.epochs} epochs")
    variants = [("fp32", False), ("bf16", False)]
    if args.compile:
        variants += [("fp32", True), ("bf16", True)]
    results: dict[str, tuple[float, float, float]] = {}
    for precision, compile_model in variants:
        job = spec(precision, epochs=args.epochs, batch_size=args.batch_size, compile_model=compile_model)
        data = engine.prepare_data(frame, job)
        # A one-epoch warm-up run: CUDA context, cuDNN autotuning, compile caches.
        engine.train(data, job.model_copy(update={"training": job.training.model_copy(update={"epochs": 1})}),
                     device=device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = engine.train(data, job, device=device)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rate = len(data.x_train) * args.epochs / seconds
        name = precision + (" + compile" if compile_model else "")
        results[name] = (seconds, rate, result.metrics["val_accuracy"])
        accuracy = result.metrics["val_accuracy"]
        print(f"{name:16s} {seconds:7.2f} s  {rate:10.0f} samples/s  val_accuracy {accuracy:.4f}"
              f"  (device recorded: {result.device})")
    base = results["fp32"][1]
    print("\n| variant | seconds | samples/s | vs fp32 | val_accuracy |\n|---|---|---|---|---|")
    for name, (seconds, rate, accuracy) in results.items():
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / base:.2f}× | {accuracy:.4f} |")


if __name__ == "__main__":
    main()
