"""Export ``onnx_int8`` against the fp32 ONNX export, on a trained MLP and CNN, in one run.

Run from the repository root:  .venv/bin/python bench/quantize.py [--rounds 5] [--requests 3000]

For each model (scikit-learn's digits, 64 features; the MLP [256, 256] and the CNN on 1×8×8 images,
trained by the engine as a job would be), the trainer's own export and quantization
(``services/trainer/engines/export.py``, ``quantize.py``) write both files; then, alternating fp32
and int8 each round so that a noisy moment hits both:

- **in process**: rows/s of serving's ONNX runtime (``load_onnx``, one intra-op thread) answering
  batches of ``--batch`` rows and single rows;
- **served**: requests/s of single-row predict requests through serving's HTTP protocol and data
  plane (``bench/serving_hotpath.py``'s lane: token check, signature check, batcher, prediction log),
  without sockets;
- **metric**: accuracy of each file on the validation rows, and the change.

Medians of ``--rounds`` rounds; the ratio int8 ÷ fp32 is the median of the rounds' own ratios. Figures go to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

from serving_hotpath import _drive, _shipyard_request, shipyard_lane  # noqa: E402

MODELS = {
    "mlp": {"type": "mlp", "hidden": [256, 256]},
    "cnn": {"type": "cnn", "input_shape": [1, 8, 8], "channels": [32, 64], "hidden": 128},
}


def train_and_export(key: str, folder: Path, epochs: int) -> tuple[Path, Path, Any]:
    """Train ``key`` on digits through the engine; (fp32 path, int8 path, the quantization facts)."""
    from sklearn.datasets import load_digits

    from services.trainer.engines import engine, quantize
    from services.trainer.engines.export import example_input, export_onnx
    from services.trainer.engines.types import Export
    from services.trainer.jobs.schemas import ExportFormat, JobCreate

    spec = JobCreate.model_validate({
        "model_name": f"bench_{key}", "model": MODELS[key], "exports": ["onnx", "onnx_int8"],
        "data": {"dataset": "digits", "rev": "0" * 40, "task": "classification", "target": "target"},
        "training": {"epochs": epochs, "batch_size": 32, "learning_rate": 1e-3, "seed": 0},
    })
    data = engine.prepare_data(load_digits(as_frame=True).frame, spec)
    model = engine.train(data, spec, device="cpu").model
    done = export_onnx(model, task=data.task, example=example_input(data), path=folder / key / "model.onnx",
                       check_rows=data.x_val, classes=data.classes)
    fp32 = Export(format=ExportFormat.ONNX, path=done.path, max_abs_diff=done.max_abs_diff,
                  signature=done.signature)
    # Tolerance 1: the benchmark measures the int8 file whatever the rule would decide (printed).
    found = quantize.quantize_export(fp32, data, tolerance=1.0, folder=folder / f"{key}_int8")
    assert found.export is not None
    return fp32.path, found.export.path, found


def in_process(path: Path, batch: int, seconds: float) -> float:
    """Rows/s of serving's ONNX runtime on ``batch`` rows per call, one intra-op thread."""
    import numpy as np

    from services.serving.runtimes.onnx import load_onnx

    runtime = load_onnx(path, intra_op_threads=1, graph_optimization="all", choose_threads=False)
    rows = {"input": np.random.default_rng(0).normal(size=(batch, 64)).astype(np.float32)}
    for _ in range(10):
        runtime.predict(rows)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.predict(rows)
        calls += 1
    rate = calls * batch / (time.perf_counter() - started)
    runtime.close()
    return rate


def served(lanes: dict[str, Any], loop: Any, requests: int) -> dict[str, float]:
    """Requests/s of single-row predict requests through each lane (one connection)."""
    import numpy as np

    row = [round(float(v), 4) for v in np.random.default_rng(7).normal(size=64)]
    payload = _shipyard_request("ours", row)
    from services.serving.fastlane.uvicorn_protocol import FastLaneHttpProtocol

    return {name: 1.0 / loop.run_until_complete(_drive(lane, FastLaneHttpProtocol, payload, requests))
            for name, lane in lanes.items()}


def bench_model(key: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from serving_hotpath import _LaneApp

    fp32_path, int8_path, found = train_and_export(key, folder, args.epochs)
    paths = {"fp32": fp32_path, "int8": int8_path}
    lanes, closers = {}, []
    for name, path in paths.items():
        lane, close = shipyard_lane(folder / f"{key}_{name}_lane", path)
        lanes[name] = _LaneApp(lane)
        closers.append(close)
    rounds: dict[str, list[float]] = {f"{n}_{m}": [] for n in paths for m in ("batch", "row", "served")}
    loop = asyncio.new_event_loop()
    try:
        served(lanes, loop, 300)  # warm-up
        for _ in range(args.rounds):
            for name, path in paths.items():
                rounds[f"{name}_batch"].append(in_process(path, args.batch, args.seconds))
                rounds[f"{name}_row"].append(in_process(path, 1, args.seconds))
            for name, rate in served(lanes, loop, args.requests).items():
                rounds[f"{name}_served"].append(rate)
    finally:
        loop.close()
        for close in closers:
            close()
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    sizes = {n: p.stat().st_size for n, p in paths.items()}
    return {"key": key, "found": found, "medians": medians, "rounds": rounds, "sizes": sizes}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nbatch {args.batch}, {args.rounds} rounds (medians), {args.requests} served requests a round")
    print("| model | file KB fp32 → int8 | accuracy fp32 → int8 (change) | kept at 0.01 | "
          f"rows/s batch {args.batch}: fp32, int8, ratio | rows/s one row: fp32, int8, ratio | "
          "served req/s: fp32, int8, ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m, q, s = r["medians"], r["found"], r["sizes"]
        cells = [f"{r['key']}", f"{s['fp32'] / 1024:.0f} → {s['int8'] / 1024:.0f}",
                 f"{q.fp32:.4f} → {q.int8:.4f} ({q.int8 - q.fp32:+.4f})",
                 "yes" if q.fp32 - q.int8 <= 0.01 else "no"]
        for kind in ("batch", "row", "served"):
            fp32, int8 = m[f"fp32_{kind}"], m[f"int8_{kind}"]
            # The ratio is the median of each round's int8 ÷ fp32: both measured within seconds.
            paired = zip(r["rounds"][f"int8_{kind}"], r["rounds"][f"fp32_{kind}"], strict=True)
            ratio = statistics.median(i / f for i, f in paired)
            cells.append(f"{fp32:,.0f}, {int8:,.0f}, **{ratio:.2f}**")
        print("| " + " | ".join(cells) + " |")
    for r in results:
        for kind, values in r["rounds"].items():
            print(f"{r['key']} {kind}: " + ", ".join(f"{v:,.0f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="served requests per file per round")
    parser.add_argument("--seconds", type=float, default=1.0, help="in-process seconds per measurement")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="shipyard-quantize-") as tmp:
        results = [bench_model(key, Path(tmp), args) for key in MODELS]
    report(results, args)


if __name__ == "__main__":
    main()
