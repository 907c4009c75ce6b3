"""TorchScript: a ``torch.jit.trace``d module, loaded with ``torch.jit.load`` only.

``torch.jit.load`` reads the archive's TorchScript code and tensors; it never unpickles
arbitrary Python objects the way ``torch.load`` of a pickled module would. A TorchScript file
names neither its inputs' shapes nor its outputs, so the version's stored signature is required.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.serving.runtimes.base import (
    FORMAT_TORCHSCRIPT,
    ModelLoadError,
    Signature,
    warm_up_arrays,
)

TORCHSCRIPT_FILE_NAME = "model.pt"

_threads_lock = threading.Lock()
_threads_set = False


def _set_torch_threads(intra_op_threads: int) -> None:
    """torch's intra-op pool is per process; size it once, like ONNX Runtime's per session."""
    import torch

    global _threads_set
    with _threads_lock:
        if not _threads_set:
            torch.set_num_threads(intra_op_threads)
            _threads_set = True


class TorchScriptRuntime:
    format = FORMAT_TORCHSCRIPT
    platform = "pytorch_libtorch"

    def __init__(self, path: Path, module: Any, signature: Signature) -> None:
        self.path = path
        self.module = module
        self.signature = signature
        self._input_names = signature.input_names
        self._output_names = signature.output_names

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # from_numpy shares memory; the validator already made the arrays contiguous.
        tensors = [torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in self._input_names]
        # inference_mode: no autograd records, no version counters; released GIL inside ops.
        with torch.inference_mode():
            answer = self.module(*tensors)
        if isinstance(answer, dict):
            values = [answer[name] for name in self._output_names]
        elif isinstance(answer, (tuple, list)):
            values = list(answer)
        else:
            values = [answer]
        if len(values) != len(self._output_names):
            raise RuntimeError(
                f"the module answered {len(values)} tensors; the signature names {len(self._output_names)}"
            )
        return {
            name: value.detach().cpu().numpy()
            for name, value in zip(self._output_names, values, strict=True)
        }

    def close(self) -> None:
        pass


def load_torchscript(path: Path, *, signature: Signature | None, intra_op_threads: int) -> TorchScriptRuntime:
    if signature is None:
        raise ModelLoadError(
            f"{path.name} is TorchScript, which does not describe its inputs; the version needs a "
            "signature.json (or shipyard.signature tag) for it"
        )
    import torch

    _set_torch_threads(intra_op_threads)
    jit_load: Callable[..., Any] = torch.jit.load  # not annotated in torch
    try:
        module = jit_load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"torch.jit.load cannot open {path.name}: {exc}") from exc
    module.eval()
    runtime = TorchScriptRuntime(path, module, signature)
    try:
        answers = runtime.predict(warm_up_arrays(signature))
    except Exception as exc:
        raise ModelLoadError(f"the TorchScript model failed its warm-up run: {exc}") from exc
    for spec in signature.outputs:
        if answers[spec.name].ndim != len(spec.shape):
            raise ModelLoadError(
                f"output {spec.name!r} has {answers[spec.name].ndim} dimensions; "
                f"the signature says {spec.describe()}"
            )
    return runtime
