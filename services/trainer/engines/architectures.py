"""The models a job spec's ``model`` describes, built for the data they will train on.

Every tabular model takes RAW float32 feature rows, shape (batch, n_features), and answers
(batch, outputs): logits for classification, target units for regression. The standardisation
fitted on the training split (and, for regression, the target's) lives inside the returned
:class:`FeatureModel` as buffers, so that whoever serves an export cannot forget it or apply
another one. The backbones below it see standardised rows:

- ``mlp``: (Linear → ReLU → Dropout)* → Linear;
- ``cnn``: the row reshaped to (C, H, W), (Conv2d same → BatchNorm2d → ReLU → MaxPool2d 2)*,
  then Flatten → Linear → ReLU → Dropout → Linear;
- ``lstm`` / ``gru``: the row read as ``sequence_length`` equal steps, the last layer's final
  hidden state (both directions when bidirectional) → Linear;
- ``transformer_encoder``: the row read as ``sequence_length`` tokens, Linear to ``d_model``,
  plus a learned position embedding, pre-norm encoder layers, mean over tokens → Linear;
- with ``data.sequence`` the data are padded sequences (batch, steps, width), NaN after each one's
  end: :class:`MaskedRecurrentNet` (the output at each sequence's last real step; bidirectional
  reads each sequence backward from its real end) and :class:`MaskedTransformerNet` (padded keys
  masked, mean over real steps), whose answers do not depend on the padding;
- ``plugin``: ``module:function`` from a file in the trainer's plugin directory;
- ``pretrained_text``: :func:`services.trainer.engines.text.build_text_model` (token ids in, no scaling).

Every built-in one is free of data-dependent control flow, so it exports to ONNX (dynamo, with
a dynamic batch axis) and traces to TorchScript; the tests check both for each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.trainer.engines.types import TabularData
from services.trainer.jobs.schemas import (
    FACTORY_PATTERN,
    CNNSpec,
    JobCreate,
    MLPSpec,
    PluginSpec,
    PretrainedTextSpec,
    RecurrentSpec,
    Task,
    TransformerEncoderSpec,
)
from shipyard_common.errors import InvalidInput

PLUGIN_DIR_ENV = "SHIPYARD_TRAINER_PLUGIN_DIR"


class FeatureModel(nn.Module):
    """Standardise raw rows → ``net`` → map regression outputs back to target units.

    For regression the target is standardised too (the loss then does not depend on the
    target's units; the training loop compares ``scale_target(out)`` with ``scale_target(y)``).
    The buffer names and ``net`` match the former ``engine.TabularMLP``, so an MLP's state dict
    (checkpoints, registered weights used by ``init_from``) loads into either.
    """

    mean: torch.Tensor
    std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: np.ndarray,
        std: np.ndarray,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) / self.std)
        return out * self.target_std + self.target_mean

    def scale_target(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std


def build_model(data: TabularData, spec: JobCreate, *, plugin_dir: Path | None) -> nn.Module:
    """The model ``spec.model`` describes, sized for ``data``, with its scaling fitted on the training split.

    Raises :class:`InvalidInput` when the architecture does not fit the data (shapes) or the
    plugin cannot be loaded: both are the job's submitter's to fix.
    """
    model_spec = spec.model
    if isinstance(model_spec, PretrainedTextSpec):
        from services.trainer.engines.text import build_text_model

        return build_text_model(data, spec)

    outputs = len(data.classes) if data.task == Task.CLASSIFICATION else 1
    if data.x_train.ndim == 3:  # data.sequence: (sequences, steps, width), NaN after each one's end
        return sequence_model(data, spec, outputs)
    n_features = int(data.x_train.shape[1])
    net: nn.Module
    if isinstance(model_spec, MLPSpec):
        net = mlp(n_features, outputs, model_spec)
    elif isinstance(model_spec, CNNSpec):
        net = ConvNet(n_features, outputs, model_spec)
    elif isinstance(model_spec, RecurrentSpec):
        net = RecurrentNet(n_features, outputs, model_spec)
    elif isinstance(model_spec, TransformerEncoderSpec):
        net = TransformerNet(n_features, outputs, model_spec)
    elif isinstance(model_spec, PluginSpec):
        net = build_plugin(model_spec, n_features=n_features, n_outputs=outputs, plugin_dir=plugin_dir)
    else:  # the schema's union holds only the types above
        raise AssertionError(type(model_spec))
    return scaled(net, data, data.x_train)


def scaled(net: nn.Module, data: TabularData, rows: np.ndarray) -> FeatureModel:
    """``net`` behind the standardisation of ``rows`` (feature rows, or real steps) and the target's."""
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    # A constant column would divide by zero; leave it centred and unscaled.
    std = np.where(std < 1e-12, 1.0, std)
    target_mean, target_std = 0.0, 1.0
    if data.task == Task.REGRESSION:
        target_mean = float(data.y_train.mean())
        target_std = float(data.y_train.std()) or 1.0
    return FeatureModel(net, mean=mean, std=std, target_mean=target_mean, target_std=target_std)


def mlp(n_features: int, outputs: int, spec: MLPSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for size in spec.hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """(batch, C·H·W) → (batch, C, H, W) → conv blocks → dense head.

    Each block halves each spatial side that is at least 2 (MaxPool2d); a side of 1 is left as
    it is, and a block whose input is 1×1 does not pool at all, so no side ever reaches 0.
    """

    def __init__(self, n_features: int, outputs: int, spec: CNNSpec) -> None:
        super().__init__()
        channels, height, width = spec.input_shape
        if channels * height * width != n_features:
            raise InvalidInput(
                f"model.input_shape {tuple(spec.input_shape)} holds {channels * height * width} values "
                f"but the dataset has {n_features} feature columns"
            )
        blocks: list[nn.Module] = [nn.Unflatten(1, (channels, height, width))]
        for size in spec.channels:
            blocks += [
                nn.Conv2d(channels, size, spec.kernel_size, padding="same"),
                nn.BatchNorm2d(size),
                nn.ReLU(),
            ]
            pool = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
            if pool != (1, 1):
                blocks.append(nn.MaxPool2d(pool))
                height, width = height // pool[0], width // pool[1]
            channels = size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, spec.hidden),
            nn.ReLU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def _steps(n_features: int, sequence_length: int | None) -> tuple[int, int]:
    """``sequence_length`` and the width of each of its equal steps of a row of ``n_features``."""
    if sequence_length is None:  # the schema requires it without data.sequence
        raise InvalidInput("model.sequence_length is required for fixed-width rows")
    if n_features % sequence_length:
        raise InvalidInput(
            f"{n_features} features do not split into sequence_length={sequence_length} equal steps; "
            f"pick a divisor of {n_features}"
        )
    return sequence_length, n_features // sequence_length


class RecurrentNet(nn.Module):
    """(batch, T·F) → (batch, T, F) → LSTM/GRU → the last layer's final hidden state(s) → Linear.

    With ``bidirectional`` the forward direction's state after the last step and the backward
    direction's after the first (each has then read the whole sequence) are concatenated.
    """

    def __init__(self, n_features: int, outputs: int, spec: RecurrentSpec) -> None:
        super().__init__()
        self.sequence_length, self.step_width = _steps(n_features, spec.sequence_length)
        step_width = self.step_width
        self.directions = 2 if spec.bidirectional else 1
        rnn_type = nn.LSTM if spec.type == "lstm" else nn.GRU
        # nn.LSTM/GRU apply dropout between layers only (and warn when there is one layer).
        self.rnn = rnn_type(
            step_width, spec.hidden_size, num_layers=spec.num_layers, batch_first=True,
            bidirectional=spec.bidirectional, dropout=spec.dropout if spec.num_layers > 1 else 0.0,
        )
        self.is_lstm = spec.type == "lstm"
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.hidden_size * self.directions, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(x.shape[0], self.sequence_length, self.step_width)
        _, state = self.rnn(steps)
        hidden = state[0] if self.is_lstm else state
        # (layers·directions, batch, hidden): the last layer's directions, side by side per row.
        last = hidden[-self.directions:].transpose(0, 1).reshape(x.shape[0], -1)
        out: torch.Tensor = self.head(self.dropout(last))
        return out


def learned_positions(length: int, d_model: int) -> nn.Parameter:
    """A learned position embedding, (1, length, d_model), drawn small (std 0.02) as BERT's is."""
    position = nn.Parameter(torch.zeros(1, length, d_model))
    nn.init.normal_(position, std=0.02)
    return position


def encoder_layers(spec: TransformerEncoderSpec) -> nn.TransformerEncoder:
    """The pre-norm encoder layers both transformers use (:class:`TransformerNet` on fixed-width rows,
    :class:`MaskedTransformerNet` on padded sequences). No nested tensors: they would make the exported
    graph depend on the data."""
    layer = nn.TransformerEncoderLayer(
        spec.d_model, spec.nhead, dim_feedforward=spec.dim_feedforward, dropout=spec.dropout,
        batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, spec.num_layers, enable_nested_tensor=False)


class TransformerNet(nn.Module):
    """(batch, T·F) → (batch, T, F) → Linear to d_model + learned positions → pre-norm encoder
    → LayerNorm → mean over tokens → Linear."""

    def __init__(self, n_features: int, outputs: int, spec: TransformerEncoderSpec) -> None:
        super().__init__()
        self.sequence_length, self.step_width = _steps(n_features, spec.sequence_length)
        self.embed = nn.Linear(self.step_width, spec.d_model)
        self.position = learned_positions(self.sequence_length, spec.d_model)
        self.encoder = encoder_layers(spec)
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], self.sequence_length, self.step_width)
        hidden = self.encoder(self.embed(tokens) + self.position)
        out: torch.Tensor = self.head(self.norm(hidden).mean(dim=1))
        return out


def sequence_model(data: TabularData, spec: JobCreate, outputs: int) -> FeatureModel:
    """A masked sequence model for padded sequences (data.sequence), standardised per step feature on
    the real training steps; its longest sequence is the data's padded length."""
    length, width = int(data.x_train.shape[1]), int(data.x_train.shape[2])
    model_spec = spec.model
    net: nn.Module
    if isinstance(model_spec, RecurrentSpec):
        net = MaskedRecurrentNet(width, length, outputs, model_spec)
    elif isinstance(model_spec, TransformerEncoderSpec):
        net = MaskedTransformerNet(width, length, outputs, model_spec)
    else:  # the schema refuses data.sequence with other models
        raise InvalidInput(f"model.type {model_spec.type!r} does not read sequences")
    steps = data.x_train.reshape(-1, width)
    return scaled(net, data, steps[~np.isnan(steps).any(axis=1)])


def unpadded(x: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, T, width) with NaN steps as padding → (values with padding zeroed, the padding mask
    (batch, T), each sequence's real length); steps past ``max_length`` count as padding (truncation;
    masked rather than sliced off, which keeps the exported time axis free)."""
    steps = torch.arange(x.shape[1], device=x.device)
    padding = torch.isnan(x).any(dim=2) | (steps >= max_length).unsqueeze(0)
    values = x.masked_fill(padding.unsqueeze(2), 0.0)
    return values, padding, (~padding).sum(dim=1)


def at_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for each sequence b: (batch, T, width) → (batch, width)."""
    where = index.clamp(min=0).view(-1, 1, 1).expand(x.shape[0], 1, x.shape[2])
    return x.gather(1, where).squeeze(1)


def reversed_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's real steps in reverse order, its padding left where it is (its own inverse)."""
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    last = (lengths - 1).unsqueeze(1)
    index = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, index.unsqueeze(2).expand(x.shape))


class MaskedRecurrentNet(nn.Module):
    """Padded sequences → LSTM/GRU → the output at each sequence's last real step → Linear.

    Padding comes after the real steps, so a forward direction's output there has not seen it.
    Bidirectional layers run the backward direction on each sequence reversed within its length, so
    that it starts at the real end: per layer, a forward and a backward one-layer RNN, concatenated.
    """

    def __init__(self, width: int, max_length: int, outputs: int, spec: RecurrentSpec) -> None:
        super().__init__()
        self.max_length = max_length
        self.bidirectional = spec.bidirectional
        rnn_type = nn.LSTM if spec.type == "lstm" else nn.GRU
        if spec.bidirectional:
            sizes = [width, *[2 * spec.hidden_size] * (spec.num_layers - 1)]
            self.forward_layers = nn.ModuleList(rnn_type(n, spec.hidden_size, batch_first=True)
                                                for n in sizes)
            self.backward_layers = nn.ModuleList(rnn_type(n, spec.hidden_size, batch_first=True)
                                                 for n in sizes)
        else:
            self.rnn = rnn_type(width, spec.hidden_size, num_layers=spec.num_layers, batch_first=True,
                                dropout=spec.dropout if spec.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.hidden_size * (2 if spec.bidirectional else 1), outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _, lengths = unpadded(x, self.max_length)
        if not self.bidirectional:
            out, _ = self.rnn(values)
            last = at_steps(out, lengths - 1)
        else:
            hidden = values
            for index, (forward, backward) in enumerate(zip(self.forward_layers, self.backward_layers,
                                                            strict=True)):
                if index:
                    hidden = self.dropout(hidden)
                ahead, _ = forward(hidden)
                behind, _ = backward(reversed_within(hidden, lengths))
                hidden = torch.cat([ahead, reversed_within(behind, lengths)], dim=2)
            size = hidden.shape[2] // 2
            last = torch.cat([at_steps(hidden[..., :size], lengths - 1), hidden[:, 0, size:]], dim=1)
        out_: torch.Tensor = self.head(self.dropout(last))
        return out_


class MaskedTransformerNet(nn.Module):
    """Padded sequences → Linear to d_model + learned positions → pre-norm encoder, padded keys masked
    (``src_key_padding_mask``) → LayerNorm → mean over the real steps → Linear."""

    def __init__(self, width: int, max_length: int, outputs: int, spec: TransformerEncoderSpec) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Linear(width, spec.d_model)
        self.position = learned_positions(max_length, spec.d_model)
        self.encoder = encoder_layers(spec)
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, padding, lengths = unpadded(x, self.max_length)
        # Steps past max_length are padding: any position will do for them (the last one).
        steps = torch.arange(values.shape[1], device=values.device).clamp(max=self.max_length - 1)
        tokens = self.embed(values) + self.position[0].index_select(0, steps)
        hidden = self.norm(self.encoder(tokens, src_key_padding_mask=padding))
        real = (~padding).unsqueeze(2).to(hidden.dtype)
        pooled = (hidden * real).sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)
        out: torch.Tensor = self.head(pooled)
        return out


def build_plugin(spec: PluginSpec, *, n_features: int, n_outputs: int, plugin_dir: Path | None) -> nn.Module:
    """Call the plugin's factory as ``function(n_features=…, n_outputs=…, **options)``."""
    factory = load_factory(spec.factory, plugin_dir)
    try:
        model = factory(n_features=n_features, n_outputs=n_outputs, **spec.options)
    except Exception as exc:
        raise InvalidInput(
            f"plugin factory {spec.factory!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise InvalidInput(
            f"plugin factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_factory(factory: str, plugin_dir: Path | None) -> Callable[..., Any]:
    """The function ``factory`` (``module:function``) names, from ``<plugin_dir>/<module>.py`` only.

    The file is loaded by path (never through ``sys.path`` or ``import_module``), and only if
    it resolves, symlinks followed, to a file inside ``plugin_dir``.
    """
    if not re.fullmatch(FACTORY_PATTERN, factory):
        raise InvalidInput(
            f"plugin factory {factory!r} must be 'module:function' with plain names (no dots or slashes)"
        )
    if plugin_dir is None:
        raise InvalidInput(f"no plugin directory is configured: set {PLUGIN_DIR_ENV}")
    module_name, function_name = factory.split(":")
    root = Path(plugin_dir).resolve()
    if not root.is_dir():
        raise InvalidInput(
            f"plugin factory {factory!r}: the plugin directory ({PLUGIN_DIR_ENV}) does not exist"
        )
    path = (root / f"{module_name}.py").resolve()
    if not path.is_relative_to(root):
        raise InvalidInput(
            f"plugin factory {factory!r}: {module_name}.py leads outside the plugin directory; refused"
        )
    if not path.is_file():
        raise InvalidInput(
            f"plugin factory {factory!r}: there is no {module_name}.py in the plugin directory"
        )

    # A name of its own per file, so that plugins never shadow real modules or each other.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    qualified = f"shipyard_plugin_{module_name}_{digest}"
    module_spec = importlib.util.spec_from_file_location(qualified, path)
    if module_spec is None or module_spec.loader is None:
        raise InvalidInput(f"plugin factory {factory!r}: {module_name}.py cannot be loaded as a module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered while it runs (dataclasses and typing look their module up); a fresh copy each
    # time, so that an edited plugin file takes effect on the next job.
    sys.modules[qualified] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(qualified, None)
        raise InvalidInput(
            f"plugin factory {factory!r}: loading {module_name}.py raised {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidInput(f"plugin factory {factory!r}: {module_name}.py has no function {function_name!r}")
    return function  # type: ignore[no-any-return]
