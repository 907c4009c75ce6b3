"""ONNX Runtime: an ONNX file is data, never code, which is why it is the format served first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.serving.runtimes.base import (
    FORMAT_ONNX,
    ModelLoadError,
    Signature,
    TensorSpec,
    parse_dtype,
    warm_up_arrays,
)
from shipyard_common.lineage import ONNX_FILE_NAME

_ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",  # a table's categorical column (the trainer's engines/preprocess.py)
}

_GRAPH_OPTIMIZATION = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def find_model_file(root: Path) -> Path:
    """The ``model.onnx`` under ``root``; the shallowest if the artifacts hold several."""
    found = sorted(root.rglob(ONNX_FILE_NAME), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    if not found:
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:20]
        raise ModelLoadError(f"the artifacts hold no {ONNX_FILE_NAME} (files: {present or 'none'})")
    return found[0]


def session_options(*, intra_op_threads: int, graph_optimization: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # A fixed, small pool per model: several models and many request threads share the machine,
    # and ORT's default (one thread per core, per session) oversubscribes it under load.
    options.intra_op_num_threads = intra_op_threads
    # Requests already arrive on many threads, and our graphs are chains (MLP, CNN, RNN): running
    # a graph's independent nodes in parallel (ORT_PARALLEL) adds contention, not speed.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT_ENABLE_ALL (the default setting): constant folding, node fusions (MatMul+Add → Gemm,
    # Conv+BN) and layout changes. They are done once at load and never change the answers
    # beyond float rounding, which the trainer's export check bounds.
    options.graph_optimization_level = _GRAPH_OPTIMIZATION[graph_optimization]
    # Spinning worker threads burn a core each between sporadic requests; sleeping costs microseconds.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _dimension(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxRuntime:
    format = FORMAT_ONNX
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, session: ort.InferenceSession, *, threads: int = 1) -> None:
        self.path = path
        self.session = session
        #: Intra-op threads of ``session`` (what :func:`load_onnx` chose).
        self.threads = threads
        self.signature = Signature(
            inputs=tuple(self._spec(arg) for arg in session.get_inputs()),
            outputs=tuple(self._spec(arg) for arg in session.get_outputs()),
        )
        self._output_names = list(self.signature.output_names)
        # InferenceSession.run checks graph capture, input names and OrtValue ownership in Python
        # on every call (a few µs, a third of a small model's call); requests reach the runtime
        # with exactly the signature's inputs as numpy arrays (validation.py), so call the
        # binding's run directly where this onnxruntime has it.
        binding = getattr(session, "_sess", None)
        self._run = binding.run if binding is not None and hasattr(binding, "run") else None

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ModelLoadError(f"{arg.name!r} is {arg.type}; serving feeds and answers numbers only")
        return TensorSpec(name=arg.name, dtype=parse_dtype(dtype),
                          shape=tuple(_dimension(d) for d in (arg.shape or [])))

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe and releases the GIL, so requests run in parallel.
        run = self._run
        answers = run(self._output_names, arrays, None) if run is not None else self.session.run(
            self._output_names, arrays)
        return dict(zip(self._output_names, answers, strict=True))  # numpy arrays already

    def close(self) -> None:
        # The session frees its memory when the last request holding it lets go.
        pass


def _open(path: Path, *, intra_op_threads: int, graph_optimization: str) -> OnnxRuntime:
    try:
        # A path rather than bytes, so that weights stored beside the graph (external data) load too.
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(
                intra_op_threads=intra_op_threads, graph_optimization=graph_optimization
            ),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/… types
        raise ModelLoadError(f"ONNX Runtime cannot open {path.name}: {exc}") from exc
    if not session.get_outputs():
        raise ModelLoadError("the model has no outputs")
    runtime = OnnxRuntime(path, session, threads=intra_op_threads)
    # The first run allocates and plans; doing it here keeps that cost off the first request and
    # proves the model runs before it is allowed to replace a working version.
    try:
        runtime.predict(warm_up_arrays(runtime.signature))
    except Exception as exc:
        raise ModelLoadError(f"the model failed its warm-up run: {exc}") from exc
    return runtime


def _seconds_per_row(
    runtimes: tuple[OnnxRuntime, ...], arrays: dict[str, np.ndarray], *, runs: int = 10, rounds: int = 5
) -> list[float]:
    """Each runtime's best timing of ``runs`` one-row calls, the runtimes taking turns round by round.

    Taking turns, so that a busy moment of the machine slows both rather than one; the best round
    of each, the one least disturbed by other work. 50 calls each in all, so that a load (serving
    loads every served version at its start) stays short even when the pool waits for busy cores.
    """
    best = [float("inf")] * len(runtimes)
    for _ in range(rounds):
        for index, runtime in enumerate(runtimes):
            started = time.perf_counter()
            for _ in range(runs):
                runtime.session.run(runtime._output_names, arrays)
            best[index] = min(best[index], (time.perf_counter() - started) / runs)
    return best


# Opening a second session to compare costs a load; a model whose file is this large is
# compute-bound (its many threads pay off), so the comparison is skipped.
_COMPARE_MAX_BYTES = 64 * 1024 * 1024
# The pool is kept only if it wins clearly: one thread also leaves the cores to other requests.
_POOL_MUST_WIN_BY = 0.8


def load_onnx(
    path: Path, *, intra_op_threads: int, graph_optimization: str, choose_threads: bool = True
) -> OnnxRuntime:
    """Open ``path`` with ONNX Runtime on CPU and warm it up.

    ``choose_threads``: with ``intra_op_threads`` above 1, also open the model with one thread,
    time a one-row call of each, and keep the one thread unless the pool is clearly faster. A
    small model's call takes microseconds, less than waking a second thread costs (and waiting
    for a core to run it on a busy machine): its pool makes every request slower.
    """
    runtime = _open(path, intra_op_threads=intra_op_threads, graph_optimization=graph_optimization)
    if not choose_threads or intra_op_threads <= 1 or path.stat().st_size > _COMPARE_MAX_BYTES:
        return runtime
    single = _open(path, intra_op_threads=1, graph_optimization=graph_optimization)
    arrays = warm_up_arrays(runtime.signature)
    pooled_s, single_s = _seconds_per_row((runtime, single), arrays)
    if pooled_s < single_s * _POOL_MUST_WIN_BY:
        single.close()
        return runtime
    runtime.close()
    return single
