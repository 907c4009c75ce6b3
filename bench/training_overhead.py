"""Training overhead: the platform's engine (``engine.train``) against a bare PyTorch loop.

Run from the repository root:  .venv/bin/python bench/training_overhead.py [--help]

Both sides train the same MLP (the spec's ``model.hidden``, same seed, hence the same initial
weights), on the same standardised synthetic classification set (20k x 64, 10 classes, the
engine's own stratified train/validation split), with the same batch size, optimizer (Adam),
learning rate, epochs, thread count and DataLoader(shuffle=True, seeded generator).

Both sides run validation once per epoch. The bare loop's validation is a forward pass, the
loss and an argmax accuracy; the engine's adds scikit-learn metrics (accuracy, macro F1,
confusion matrix). Those per-epoch extras are timed on their own and printed as a share of
the engine's time. ``observer`` is None (the worker's DB/MLflow progress reports are not
measured here). Throughput is training samples x epochs / wall time of the whole call
(model build + all epochs + validation), the median of N alternating rounds after one
warm-up each. The figure that matters is the ratio engine/bare (goal >= 0.95).

Not measured here: time from POST /jobs to a job running on an idle worker (skipped for time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer import engine  # noqa: E402
from services.trainer.schemas import JobCreate  # noqa: E402

REV = "0123456789abcdef0123456789abcdef01234567"


def make_frame(rows: int, features: int, classes: int, seed: int) -> pd.DataFrame:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows, n_features=features, n_informative=features // 2, n_redundant=features // 4,
        n_classes=classes, n_clusters_per_class=1, random_state=seed,
    )
    # Un-standardised on purpose (shifted, scaled): the engine standardises inside the model.
    rng = np.random.default_rng(seed)
    x = x * rng.uniform(0.5, 20.0, size=features) + rng.uniform(-50, 50, size=features)
    frame = pd.DataFrame(x.astype(np.float32), columns=[f"f{i}" for i in range(features)])
    frame["target"] = y
    return frame


def make_spec(args: argparse.Namespace) -> JobCreate:
    return JobCreate.model_validate({
        "model_name": "bench",
        "model": {"type": "mlp", "hidden": args.hidden, "dropout": 0.0},
        "data": {"dataset": "bench", "rev": REV, "task": "classification", "target": "target",
                 "validation_split": 0.2},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 1e-3,
                     "optimizer": "adam", "seed": 0},
    })


def run_engine(data: engine.TabularData, spec: JobCreate) -> tuple[float, float]:
    started = time.perf_counter()
    result = engine.train(data, spec, device="cpu")
    return time.perf_counter() - started, result.metrics["val_accuracy"]


def run_bare(data: engine.TabularData, spec: JobCreate, checks: bool = False) -> tuple[float, float]:
    """The ~20-line loop a user would write by hand; validation (loss + accuracy) each epoch.

    ``checks=True`` (diagnostic only) adds the engine's per-batch work to it: ``isfinite(loss)``,
    ``loss.item()``, ``clip_grad_norm_(inf)`` and ``isfinite(norm)``.
    """
    from torch.utils.data import DataLoader, TensorDataset

    t = spec.training
    started = time.perf_counter()
    mean, std = data.x_train.mean(axis=0), data.x_train.std(axis=0)
    std = np.where(std < 1e-12, 1.0, std)
    x_train = torch.from_numpy((data.x_train - mean) / std)
    x_val = torch.from_numpy((data.x_val - mean) / std)
    y_train, y_val = torch.from_numpy(data.y_train), torch.from_numpy(data.y_val)
    torch.manual_seed(t.seed)
    layers: list[nn.Module] = []
    width = x_train.shape[1]
    for size in spec.model.hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    model = nn.Sequential(*layers, nn.Linear(width, len(data.classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=t.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=t.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(t.seed))
    accuracy = 0.0
    for _ in range(t.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            if checks and not torch.isfinite(loss):
                raise RuntimeError("diverged")
            loss.backward()
            if checks:
                _total = loss.item() * len(x)
                if not torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), float("inf"))):
                    raise RuntimeError("diverged")
            optimizer.step()
        model.eval()
        with torch.no_grad():
            out = model(x_val)
            _val_loss = loss_fn(out, y_val).item()
            accuracy = (out.argmax(1) == y_val).float().mean().item()
    return time.perf_counter() - started, accuracy


def time_epoch_extras(data: engine.TabularData, spec: JobCreate, repeats: int = 20) -> float:
    """Seconds per epoch the engine spends in validation_metrics (scikit-learn metrics + confusion)."""
    torch.manual_seed(0)
    model = engine.build_model(data, spec).eval()
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    with torch.no_grad():
        out = model(x_val)
    engine.validation_metrics(data, out, y_val)  # warm-up (imports)
    started = time.perf_counter()
    for _ in range(repeats):
        engine.validation_metrics(data, out, y_val)
    return (time.perf_counter() - started) / repeats


def share_rest(gap: float, extras: float, checks: float) -> float:
    return gap - extras - checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256],
                        help="one comparison per batch size (32 is the platform default)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="0: pick per batch size so one run takes ~1-3 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    frame = make_frame(args.rows, args.features, args.classes, seed=0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, data {args.rows}x{args.features}, "
          f"{args.classes} classes, MLP hidden={args.hidden}, Adam lr=1e-3, seed 0, device cpu")
    print("validation: both sides, once per epoch (engine: loss + sklearn metrics; bare: loss + accuracy)")
    print(f"median of {args.rounds} alternating rounds (after one warm-up each)\n")

    header = (f"{'batch':>5} {'epochs':>6} {'engine samples/s':>16} {'bare samples/s':>14} "
              f"{'engine/bare':>11} {'extras/engine':>13} {'val_acc e/b':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for batch_size in args.batch_sizes:
        epochs = args.epochs or (6 if batch_size <= 64 else 16)
        spec = make_spec(argparse.Namespace(hidden=args.hidden, epochs=epochs, batch_size=batch_size))
        data = engine.prepare_data(frame, spec)
        samples = len(data.x_train) * epochs
        run_engine(data, spec), run_bare(data, spec)  # warm-up
        eng, bare, checked, eng_acc, bare_acc = [], [], [], 0.0, 0.0
        for _ in range(args.rounds):
            seconds, eng_acc = run_engine(data, spec)
            eng.append(seconds)
            seconds, bare_acc = run_bare(data, spec)
            bare.append(seconds)
            checked.append(run_bare(data, spec, checks=True)[0])
        eng_s, bare_s = statistics.median(eng), statistics.median(bare)
        checks_share = (statistics.median(checked) - bare_s) / eng_s
        extras = time_epoch_extras(data, spec) * epochs
        ratio = bare_s / eng_s  # (samples/eng_s) / (samples/bare_s)
        share = extras / eng_s
        rows.append((batch_size, ratio, share, checks_share, eng, bare))
        print(f"{batch_size:>5} {epochs:>6} {samples / eng_s:>16,.0f} {samples / bare_s:>14,.0f} "
              f"{ratio:>11.3f} {share:>12.1%} {eng_acc:>6.3f}/{bare_acc:.3f}")

    print()
    for batch_size, ratio, share, checks_share, eng, bare in rows:
        spread = (f"engine runs {', '.join(f'{s:.2f}' for s in eng)} s; "
                  f"bare runs {', '.join(f'{s:.2f}' for s in bare)} s")
        verdict = "meets" if ratio >= 0.95 else "MISSES"
        print(f"batch {batch_size}: engine/bare = {ratio:.3f} ({verdict} the >= 0.95 goal); {spread}")
        gap = 1 - ratio
        if gap > 0 and share >= 0.5 * gap:
            print(f"  the engine's per-epoch extras (sklearn validation metrics) are {share:.1%} "
                  f"of its time: they dominate the gap of {gap:.1%}")
        elif gap > 0:
            print(f"  per-epoch extras (sklearn validation metrics) are only {share:.1%} of engine time, "
                  f"so they do not dominate the {gap:.1%} gap")
        if gap > 0:
            print(f"  diagnostic: adding the engine's per-batch checks (isfinite(loss), loss.item(), "
                  f"clip_grad_norm_(inf)) to the bare loop costs {checks_share:.1%} of engine time; the rest "
                  f"(~{max(share_rest(gap, share, checks_share), 0):.1%}) is other per-batch work, e.g. "
                  "standardising inside forward() and the grad-accumulation bookkeeping")
    print("\nnot measured: POST /jobs -> running latency on an idle worker (skipped for time)")


if __name__ == "__main__":
    main()
