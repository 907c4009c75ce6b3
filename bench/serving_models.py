"""The models that ``bench/serving.py`` serves: built with PyTorch, exported to ONNX like the trainer.

Each takes one input ``input`` float32 [batch, n_features] (dynamic batch axis) and answers
``probabilities`` [batch, 10] (softmax), opset 18, IR version clamped to 10 as
``services/trainer/engines/export.py`` does. Weights are random (seeded): serving speed does not depend
on what the model has learnt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 18
MAX_IR_VERSION = 10


@dataclass(frozen=True)
class BenchModel:
    key: str
    description: str
    n_features: int


MODELS = {
    "mlp": BenchModel("mlp", "MLP 64→256→256→10", 64),
    "cnn": BenchModel("cnn", "CNN on 1×28×28 (784 floats in, reshaped inside)", 784),
    "big": BenchModel("big", "compute-bound MLP 1024→4096→4096→10", 1024),
}


def build_module(key: str):  # type: ignore[no-untyped-def]  # torch is imported lazily
    import torch
    from torch import nn

    class Softmaxed(nn.Module):
        def __init__(self, body: nn.Module, reshape: tuple[int, ...] | None = None) -> None:
            super().__init__()
            self.body = body
            self.reshape = reshape

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # `input`: the ONNX input's name
            x = input.reshape(input.shape[0], *self.reshape) if self.reshape else input
            return torch.softmax(self.body(x), dim=1)

    torch.manual_seed(0)
    if key == "mlp":
        body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
        return Softmaxed(body).eval()
    if key == "big":
        body = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 10))
        return Softmaxed(body).eval()
    if key == "cnn":
        body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16×14×14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32×7×7
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        return Softmaxed(body, reshape=(1, 28, 28)).eval()
    raise ValueError(f"unknown model {key!r}; known: {', '.join(MODELS)}")


def export(key: str, path: Path) -> Path:
    """Write model ``key`` to ``path`` as ONNX the way the trainer does, and check it against PyTorch."""
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    import onnxruntime as ort
    import torch

    module = build_module(key)
    n = MODELS[key].n_features
    example = torch.randn(2, n)  # two rows, so that the exporter keeps the batch axis dynamic
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, dynamo=True,
            external_data=False, verbose=False,
        )
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    rows = np.random.default_rng(1).normal(size=(3, n)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: rows})
    with torch.no_grad():
        want = module(torch.from_numpy(rows)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise RuntimeError(f"{key}: ONNX Runtime differs from PyTorch by {diff}")
    return path


def session_options(threads: int):  # type: ignore[no-untyped-def]
    """The session options serving uses (``services/serving/runtimes/onnx.py``), for a fair reference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def in_process_rate(path: Path, n_features: int, threads: int, seconds: float = 2.0) -> float:
    """Rows/s of ``session.run`` on one row, in a loop, in this process: the ceiling for any server."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    row = np.random.default_rng(0).normal(size=(1, n_features)).astype(np.float32)
    feeds = {INPUT_NAME: row}
    for _ in range(20):
        session.run([OUTPUT_NAME], feeds)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(10):
            session.run([OUTPUT_NAME], feeds)
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)
