"""Every built-in architecture trains, exports to ONNX and TorchScript, and the exports match PyTorch;
shape mistakes and plugin mistakes are the submitter's, with a reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_diabetes

from services.trainer.engines import architectures, engine, export
from services.trainer.jobs.schemas import JobCreate, PluginSpec, Task
from shipyard_common.errors import InvalidInput
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"
# The test calls torch.jit.load itself, as a server would; torch 2.13 marks it deprecated.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),
              pytest.mark.usefixtures("one_torch_thread")]




@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes(as_frame=True, scaled=False).frame


def spec(model: dict, **changes) -> JobCreate:
    return JobCreate.model_validate(job_spec(rev=REV, model=model, **changes))


def check_exports(model: torch.nn.Module, data: engine.TabularData, folder: Path) -> None:
    """Both exports load the way a server loads them and answer what the eager model answers."""
    example = export.example_input(data)
    assert example.shape == (2, len(data.features)) and example.dtype == torch.float32
    onnx_done = export.export_onnx(
        model, task=data.task, example=example, path=folder / "onnx" / "model.onnx",
        check_rows=data.x_val, classes=data.classes,
    )
    ts_done = export.export_torchscript(
        model, task=data.task, example=example, path=folder / "torchscript" / "model.pt",
        check_rows=data.x_val, classes=data.classes,
    )
    outputs = len(data.classes) if data.task == Task.CLASSIFICATION else 1
    name = "probabilities" if data.task == Task.CLASSIFICATION else "prediction"
    expected_signature = {
        "inputs": [{"name": "input", "shape": [None, len(data.features)], "dtype": "float32"}],
        "outputs": [{"name": name, "shape": [None, outputs], "dtype": "float32"}],
    }
    if data.classes:
        expected_signature["classes"] = data.classes
    assert json.loads(onnx_done.signature_json()) == expected_signature
    assert json.loads(ts_done.signature_json()) == expected_signature
    assert onnx_done.max_abs_diff <= 1e-4 * max(1.0, float(np.abs(data.y_val).max()))
    assert ts_done.max_abs_diff <= 1e-4 * max(1.0, float(np.abs(data.y_val).max()))

    serving = export.ServingModule(model, data.task).eval()
    session = ort.InferenceSession(str(onnx_done.path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_done.path))
    for rows in (data.x_val[:1], data.x_val[:37]):  # the batch axis is dynamic in both
        with torch.no_grad():
            want = serving(torch.from_numpy(rows)).numpy()
            from_ts = scripted(torch.from_numpy(rows)).numpy()
        (from_onnx,) = session.run(None, {"input": rows})
        atol = 1e-4 * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(from_onnx, want, rtol=0, atol=atol)
        np.testing.assert_allclose(from_ts, want, rtol=0, atol=atol)
        if data.task == Task.CLASSIFICATION:
            np.testing.assert_allclose(from_onnx.sum(axis=1), 1.0, atol=1e-5)


CLASSIFIERS = {
    "mlp": {"type": "mlp", "hidden": [32], "dropout": 0.1},
    "cnn": {"type": "cnn", "input_shape": [1, 8, 8], "channels": [8, 16], "hidden": 32, "dropout": 0.1},
    "lstm": {"type": "lstm", "sequence_length": 8, "hidden_size": 32, "num_layers": 2, "dropout": 0.1},
    "gru": {"type": "gru", "sequence_length": 8, "hidden_size": 32, "bidirectional": True},
    "transformer_encoder": {"type": "transformer_encoder", "sequence_length": 8, "d_model": 32, "nhead": 4,
                            "num_layers": 1, "dim_feedforward": 64},
}


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
def test_each_architecture_learns_digits_and_exports_both_formats(kind, digits, tmp_path):
    job = spec(CLASSIFIERS[kind], training__epochs=5)
    data = engine.prepare_data(digits, job)
    result = engine.train(data, job, device="cpu")
    assert isinstance(result.model, architectures.FeatureModel)
    # Ten classes: chance is 0.1; five epochs are far past it for every architecture.
    assert result.metrics["val_accuracy"] > 0.6, result.history
    check_exports(result.model, data, tmp_path)


REGRESSORS = {
    # Even kernel ('same' pads one side more); 2×5 pools to 1×2, then only the width pools.
    "cnn": {"type": "cnn", "input_shape": [1, 2, 5], "channels": [8, 8], "kernel_size": 2, "hidden": 16},
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("kind", sorted(REGRESSORS))
def test_regression_answers_in_target_units_and_exports_both_formats(kind, diabetes, tmp_path):
    job = spec(REGRESSORS[kind], data__task="regression", training__epochs=25, training__learning_rate=0.005)
    data = engine.prepare_data(diabetes, job)
    result = engine.train(data, job, device="cpu")
    model = result.model
    # The regression target's scaling lives in the model; the loop compares scaled values.
    assert float(model.target_std) == pytest.approx(float(data.y_train.std()), rel=1e-5)
    baseline = float(np.abs(data.y_val - data.y_train.mean()).mean())
    assert result.metrics["val_mae"] < baseline, result.history
    check_exports(model, data, tmp_path)


def test_a_bidirectional_stack_reads_both_directions_final_states(digits):
    job = spec({"type": "lstm", "sequence_length": 8, "hidden_size": 5, "num_layers": 3,
                "bidirectional": True})
    model = architectures.build_model(engine.prepare_data(digits, job), job, plugin_dir=None).eval()
    net = model.net
    captured = {}
    net.head.register_forward_hook(lambda _module, args, _out: captured.update(features=args[0]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
        sequence, _ = net.rnn(((x - model.mean) / model.std).reshape(4, 8, 8))
    # Forward direction after the last step, backward direction after the first: each has read it all.
    want = torch.cat([sequence[:, -1, :5], sequence[:, 0, 5:]], dim=1)
    torch.testing.assert_close(captured["features"], want)


def test_mlp_keeps_the_state_dict_layout_of_earlier_versions(digits):
    job = spec({"type": "mlp", "hidden": [16, 8]})
    model = architectures.build_model(engine.prepare_data(digits, job), job, plugin_dir=None)
    # Checkpoints and registered weights (init_from) written before the architectures existed.
    assert list(model.state_dict()) == [
        "mean", "std", "target_mean", "target_std",
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias",
    ]


def test_features_are_standardised_inside_the_model_and_constant_columns_kept(digits):
    job = spec({"type": "cnn", "input_shape": [1, 8, 8], "channels": [4]})
    data = engine.prepare_data(digits, job)
    model = engine.build_model(data, job)
    np.testing.assert_allclose(model.mean.numpy(), data.x_train.mean(axis=0), rtol=1e-5, atol=1e-6)
    # Digits has pixels that are 0 in every image: their std is 1, not 0.
    constant = data.x_train.std(axis=0) < 1e-12
    assert constant.any() and (model.std.numpy()[constant] == 1.0).all()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"type": "cnn", "input_shape": [1, 8, 9]},
         "model.input_shape (1, 8, 9) holds 72 values but the dataset has 64 feature columns"),
        ({"type": "lstm", "sequence_length": 10},
         "64 features do not split into sequence_length=10 equal steps"),
        ({"type": "gru", "sequence_length": 7},
         "64 features do not split into sequence_length=7 equal steps"),
        ({"type": "transformer_encoder", "sequence_length": 3},
         "64 features do not split into sequence_length=3 equal steps"),
    ],
)
def test_shapes_that_do_not_fit_the_data_are_refused_with_a_reason(model, message, digits):
    job = spec(model)
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=None)
    assert message in caught.value.message


def test_a_single_pixel_image_still_builds_without_pooling_to_zero(digits):
    job = spec({"type": "cnn", "input_shape": [64, 1, 1], "channels": [8, 8], "hidden": 8})
    model = architectures.build_model(engine.prepare_data(digits, job), job, plugin_dir=None).eval()
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model(torch.zeros(3, 64)).shape == (3, 10)


PLUGIN = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, n_features, n_outputs, width):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_outputs))

    def forward(self, x):
        return self.body(x)


def build(n_features, n_outputs, width=8):
    return Small(n_features, n_outputs, width)


def broken(n_features, n_outputs):
    raise RuntimeError("needs a GPU")


def not_a_module(n_features, n_outputs):
    return "a string"
'''


@pytest.fixture
def plugin_dir(tmp_path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "team_models.py").write_text(PLUGIN)
    return folder


def plugin_spec(factory: str, options: dict | None = None, **changes) -> JobCreate:
    return spec({"type": "plugin", "factory": factory, "options": options or {}}, **changes)


def test_a_plugin_factory_gets_standardised_rows_and_exports(plugin_dir, digits, tmp_path):
    job = plugin_spec("team_models:build", {"width": 16})
    data = engine.prepare_data(digits, job)
    model = architectures.build_model(data, job, plugin_dir=plugin_dir).eval()
    assert type(model.net).__name__ == "Small" and model.net.body[0].out_features == 16
    x = torch.from_numpy(data.x_val[:5])
    with torch.no_grad():
        np.testing.assert_allclose(model(x), model.net((x - model.mean) / model.std), rtol=0, atol=1e-6)
    # Loaded by path under a name of its own: never importable by its plain name.
    assert "team_models" not in sys.modules
    assert str(plugin_dir) not in sys.path
    check_exports(model, data, tmp_path / "exports")


def test_a_plugin_trains_through_the_engine(plugin_dir, digits):
    job = plugin_spec("team_models:build", {"width": 32}, training__epochs=5)
    data = engine.prepare_data(digits, job)
    result = engine.train(data, job, device="cpu", plugin_dir=plugin_dir)
    assert result.metrics["val_accuracy"] > 0.8


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("team_models:missing", "'team_models:missing': team_models.py has no function 'missing'"),
        ("nowhere:build", "'nowhere:build': there is no nowhere.py in the plugin directory"),
        ("team_models:broken", "plugin factory 'team_models:broken' raised RuntimeError: needs a GPU"),
        ("team_models:not_a_module", "'team_models:not_a_module' returned str, not a torch.nn.Module"),
        ("team_models:Small", "plugin factory 'team_models:Small' raised TypeError"),
    ],
)
def test_plugin_mistakes_name_the_factory(factory, message, plugin_dir, digits):
    job = plugin_spec(factory)
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=plugin_dir)
    assert message in caught.value.message


@pytest.mark.parametrize("factory", ["../evil:x", "os.path:join", "evil/../../x:y", "evil:x.y", "evil"])
def test_a_factory_that_is_not_two_plain_names_is_refused(factory, plugin_dir, digits):
    # The schema refuses these already; the loader does not rely on it.
    job = spec({"type": "mlp"})
    job.model = PluginSpec.model_construct(type="plugin", factory=factory, options={})
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=plugin_dir)
    assert "must be 'module:function'" in caught.value.message
    with pytest.raises(InvalidInput):
        architectures.load_factory(factory, plugin_dir)


def test_plugins_need_a_configured_existing_directory(tmp_path, digits):
    job = plugin_spec("team_models:build")
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=None)
    assert caught.value.message == "no plugin directory is configured: set SHIPYARD_TRAINER_PLUGIN_DIR"
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=tmp_path / "absent")
    assert "the plugin directory (SHIPYARD_TRAINER_PLUGIN_DIR) does not exist" in caught.value.message


def test_a_plugin_file_that_links_outside_the_directory_is_refused(plugin_dir, tmp_path, digits):
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "ran"
    (outside / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef build(n_features, n_outputs):\n    raise SystemExit\n"
    )
    (plugin_dir / "evil.py").symlink_to(outside / "evil.py")
    job = plugin_spec("evil:build")
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=plugin_dir)
    assert "'evil:build': evil.py leads outside the plugin directory" in caught.value.message
    assert not marker.exists()  # refused before a line of it ran


def test_a_plugin_that_fails_to_load_names_the_factory(plugin_dir, digits):
    (plugin_dir / "typo.py").write_text("def build(:\n")
    job = plugin_spec("typo:build")
    data = engine.prepare_data(digits, job)
    with pytest.raises(InvalidInput) as caught:
        architectures.build_model(data, job, plugin_dir=plugin_dir)
    assert "'typo:build': loading typo.py raised SyntaxError" in caught.value.message


class TinyText(torch.nn.Module):
    """Token ids in, like the pretrained text models: embedding, mean over the non-padding tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8, padding_idx=0)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != 0).unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def test_token_id_models_export_with_an_int64_input_ids_input(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(40, 12)).astype(np.int64)
    ids[:, 9:] = 0  # padding
    labels = rng.integers(0, 3, size=40).astype(np.int64)
    data = engine.TabularData(features=["text"], target="label", task=Task.CLASSIFICATION,
                              x_train=ids[:30], y_train=labels[:30], x_val=ids[30:], y_val=labels[30:],
                              classes=["a", "b", "c"])
    example = export.example_input(data)
    assert example.dtype == torch.int64 and example.shape == (2, 12)
    torch.testing.assert_close(example, torch.from_numpy(ids[:2]))
    model = TinyText().eval()
    want_input = {"name": "input_ids", "shape": [None, 12], "dtype": "int64"}
    onnx_done = export.export_onnx(model, task=data.task, example=example, path=tmp_path / "m.onnx",
                                   check_rows=data.x_val, classes=data.classes)
    ts_done = export.export_torchscript(model, task=data.task, example=example, path=tmp_path / "m.pt",
                                        check_rows=data.x_val, classes=data.classes)
    for done in (onnx_done, ts_done):
        assert done.signature["inputs"] == [want_input]
        assert done.signature["classes"] == ["a", "b", "c"]
        assert done.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(onnx_done.path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input_ids": ids[30:31]})
    assert probabilities.shape == (1, 3)


def test_a_model_that_cannot_be_exported_fails_the_training_not_the_worker(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on values: torch.export cannot capture it
                return x[:, :2]
            return -x[:, :2]

    rows = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(engine.TrainingFailed) as caught:
        export.export_onnx(DataDependent(), task=Task.REGRESSION, example=torch.ones(2, 3),
                           path=tmp_path / "m.onnx", check_rows=rows)
    assert caught.value.message.startswith("the model cannot be exported to ONNX: ")
