"""The Keras child's job and model: what the parent wrote, the model it describes, compiled.

:class:`Job` is the folder :mod:`services.trainer.engines.keras_job` prepared (``job.json`` and the
arrays); :func:`configure` sets seed, determinism and precision before any model exists;
:func:`build_core` is the trained model, :func:`build_serving` the exported one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.engines.export import INPUT_NAME, OUTPUT_NAMES
from services.trainer.engines.keras_job import JOB_FILE
from services.trainer.jobs.schemas import JobCreate, OptimizerName, Precision, Task

PREDICT_BATCH = 4096


class Failed(Exception):
    """The job's error, reported to the parent as a ``failed`` event."""


@dataclass
class Job:
    folder: Path
    spec: JobCreate
    features: list[str]
    classes: list[Any]
    device: str
    checkpoint_dir: Path
    resume_dir: Path | None
    tensorboard_dir: Path
    exports_dir: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def task(self) -> Task:
        return self.spec.data.task

    @property
    def classification(self) -> bool:
        return self.task == Task.CLASSIFICATION

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.classification else 1

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.x_train) / self.spec.training.batch_size))

    def standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance of the training split; a constant column is left unscaled."""
        mean = self.x_train.mean(axis=0, dtype=np.float64)
        variance = self.x_train.var(axis=0, dtype=np.float64)
        variance = np.where(variance < 1e-24, 1.0, variance)
        return mean.astype(np.float32), variance.astype(np.float32)

    def target_scale(self) -> tuple[float, float]:
        """Regression trains on the standardised target (as the PyTorch jobs do); (mean, std)."""
        if self.classification:
            return 0.0, 1.0
        return float(self.y_train.mean()), float(self.y_train.std()) or 1.0


def load_job(folder: Path) -> Job:
    raw = json.loads((folder / JOB_FILE).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False)
              for name in ("x_train", "y_train", "x_val", "y_val")}
    return Job(
        folder=folder, spec=JobCreate.model_validate(raw["spec"]), features=list(raw["features"]),
        classes=list(raw["classes"]), device=str(raw["device"]),
        checkpoint_dir=Path(raw["checkpoint_dir"]),
        resume_dir=Path(raw["resume_dir"]) if raw["resume_dir"] else None,
        tensorboard_dir=Path(raw["tensorboard_dir"]), exports_dir=Path(raw["exports_dir"]), **arrays,
    )


def backend_name() -> str:
    import keras

    return str(keras.backend.backend())


def configure(job: Job) -> None:
    """Seed, determinism and precision, before any model exists."""
    import keras

    training = job.spec.training
    if training.deterministic:
        if backend_name() == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        else:
            import torch

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
    keras.utils.set_random_seed(int(training.seed))
    if training.precision == Precision.BF16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    elif training.precision == Precision.FP16:
        if running_device() != "cuda":  # the parent refuses this already; a GPU may have gone
            raise Failed("training.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32'")
        keras.mixed_precision.set_global_policy("mixed_float16")


def running_device() -> str:
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_core(job: Job) -> Any:
    """Raw feature rows → standardise → the spec's body → logits (or the standardised target)."""
    import keras
    from keras import layers

    spec = job.spec.model
    n_features = len(job.features)
    mean, variance = job.standardisation()
    inputs = keras.Input(shape=(n_features,), name=INPUT_NAME, dtype="float32")
    x = layers.Normalization(mean=mean, variance=variance, dtype="float32", name="standardise")(inputs)
    if spec.type == "mlp":
        for width in spec.hidden:
            x = layers.Dense(width, activation="relu")(x)
            if spec.dropout > 0:
                x = layers.Dropout(spec.dropout)(x)
    elif spec.type == "cnn":
        channels, height, width = spec.input_shape
        # The spec's shape is PyTorch's (C, H, W); Keras convolves channels-last (H, W, C).
        x = layers.Reshape((channels, height, width))(x)
        x = layers.Permute((2, 3, 1))(x)
        for filters in spec.channels:
            x = layers.Conv2D(filters, spec.kernel_size, padding="same")(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
            x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Flatten()(x)
        x = layers.Dense(spec.hidden, activation="relu")(x)
        if spec.dropout > 0:
            x = layers.Dropout(spec.dropout)(x)
    elif spec.type in ("lstm", "gru"):
        steps = spec.sequence_length or 1  # never null here: keras_job refuses that first
        x = layers.Reshape((steps, n_features // steps))(x)
        cell = layers.LSTM if spec.type == "lstm" else layers.GRU
        for index in range(spec.num_layers):
            last = index == spec.num_layers - 1
            recurrent = cell(spec.hidden_size, return_sequences=not last)
            x = layers.Bidirectional(recurrent)(x) if spec.bidirectional else recurrent(x)
            if not last and spec.dropout > 0:  # between layers, as nn.LSTM's dropout
                x = layers.Dropout(spec.dropout)(x)
    else:  # the schema allows only the types above for framework keras
        raise Failed(f"model.type {spec.type!r} is not available with framework 'keras'")
    # float32 whatever the policy: softmax and the loss stay accurate under mixed precision.
    outputs = layers.Dense(job.n_outputs, dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"shipyard_{spec.type}")


def build_serving(job: Job, core: Any) -> Any:
    """The exported model: the trained weights in float32, softmax or the target's units on top."""
    import keras
    from keras import layers

    keras.mixed_precision.set_global_policy("float32")
    fresh = build_core(job)
    fresh.set_weights(core.get_weights())
    if job.classification:
        out = layers.Softmax(name=OUTPUT_NAMES[Task.CLASSIFICATION])(fresh.output)
    else:
        mean, std = job.target_scale()
        out = layers.Rescaling(scale=std, offset=mean, name=OUTPUT_NAMES[Task.REGRESSION])(fresh.output)
    return keras.Model(fresh.input, out, name="serving")


def build_optimizer(job: Job) -> Any:
    import keras

    training = job.spec.training
    common: dict[str, Any] = {"learning_rate": training.learning_rate}
    if training.grad_clip_norm is not None:
        # The norm of all gradients together, as torch.nn.utils.clip_grad_norm_ (``clipnorm``
        # would clip each variable's gradient on its own).
        common["global_clipnorm"] = training.grad_clip_norm
    decay = training.weight_decay
    match training.optimizer:
        case OptimizerName.SGD:
            return keras.optimizers.SGD(momentum=training.momentum or 0.0,
                                        weight_decay=decay or None, **common)
        case OptimizerName.ADAM:
            return keras.optimizers.Adam(epsilon=1e-8, weight_decay=decay or None, **common)
        case OptimizerName.ADAMW:
            return keras.optimizers.AdamW(epsilon=1e-8, weight_decay=decay, **common)
        case OptimizerName.RMSPROP:  # PyTorch's defaults, so that the same spec trains alike
            return keras.optimizers.RMSprop(rho=0.99, epsilon=1e-8, weight_decay=decay or None, **common)
    raise AssertionError(training.optimizer)


def compile_model(job: Job, model: Any) -> None:
    import keras

    loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if job.classification
            else keras.losses.MeanSquaredError())
    model.compile(optimizer=build_optimizer(job), loss=loss, jit_compile=False)
