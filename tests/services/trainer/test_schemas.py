"""The job spec accepts what docs/contracts.md shows and rejects, by field, what it does not."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from services.trainer.jobs.schemas import FRAMEWORK_EXPORTS, FRAMEWORK_MODELS, Framework, JobCreate
from shipyard_common.auth import Role
from tests.services.trainer.support import job_spec
from tests.support import auth, running_app

REV = "0123456789abcdef0123456789abcdef01234567"
FACTORY_MESSAGE = "factory must be 'module:function'"

CNN = {"type": "cnn", "input_shape": [1, 5, 6]}
LSTM = {"type": "lstm", "sequence_length": 5}
GRU = {"type": "gru", "sequence_length": 5}
ENCODER = {"type": "transformer_encoder", "sequence_length": 5}
PLUGIN = {"type": "plugin", "factory": "my_models:build"}
PRETRAINED = {"type": "pretrained_text"}


def errors_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as caught:
        JobCreate.model_validate(spec)
    return list(caught.value.errors())


def fields_of(spec: dict[str, Any]) -> set[str]:
    return {".".join(str(p) for p in err["loc"]) for err in errors_of(spec)}


def test_contract_example_is_valid_and_defaults_fill_in():
    job = JobCreate.model_validate(job_spec(rev=REV))
    assert job.spec_version == 1 and job.data.features is None and job.exports == ["onnx"]
    minimal = JobCreate.model_validate(
        {"model_name": "m", "data": {"dataset": "d", "rev": REV[:7], "task": "regression", "target": "y"}}
    )
    assert minimal.training.optimizer == "adam" and minimal.resources.queue == "cpu"
    assert minimal.framework == "pytorch" and minimal.model.type == "mlp" and minimal.init_from is None
    training = minimal.training
    assert (training.precision, training.num_workers, training.pin_memory, training.compile) == (
        "fp32", 0, False, False)
    assert minimal.resources.gpus == 0


@pytest.mark.parametrize(
    ("framework", "model", "exports"),
    [
        ("pytorch", CNN, ["onnx", "torchscript"]),
        ("pytorch", LSTM, ["torchscript"]),
        ("pytorch", GRU, ["onnx"]),
        ("pytorch", ENCODER, ["onnx"]),
        ("pytorch", PLUGIN, ["onnx"]),
        ("keras", {"type": "mlp"}, ["onnx", "savedmodel"]),
        ("keras", CNN, ["savedmodel"]),
        ("keras", LSTM, ["onnx"]),
        ("keras", GRU, ["savedmodel"]),
        ("transformers", PRETRAINED, ["onnx", "torchscript"]),
    ],
)
def test_every_framework_accepts_its_models_and_exports(framework, model, exports):
    job = JobCreate.model_validate(job_spec(rev=REV, framework=framework, model=model, exports=exports))
    assert job.framework == framework and job.model.type == model["type"] and job.exports == exports


def test_new_options_are_accepted_and_kept():
    spec = job_spec(
        rev=REV, model=dict(ENCODER, d_model=32, nhead=8, num_layers=1, dim_feedforward=64, dropout=0.0),
        training__precision="bf16", training__num_workers=2, training__pin_memory=True,
        training__compile=True, resources__gpus=2, init_from={"model_name": "parent", "version": "3"},
    )
    job = JobCreate.model_validate(spec)
    assert job.model.type == "transformer_encoder" and job.model.nhead == 8  # type: ignore[union-attr]
    assert job.training.precision == "bf16" and job.training.num_workers == 2 and job.training.compile
    assert job.resources.gpus == 2 and job.init_from is not None and job.init_from.version == "3"
    # What is stored (model_dump) validates again to the same spec: the worker re-reads it.
    assert JobCreate.model_validate(job.model_dump(mode="json")) == job


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training__learning_rate": -0.1}, "training.learning_rate"),
        ({"training__optimizer": "lbfgs"}, "training.optimizer"),
        ({"training__epochs": 0}, "training.epochs"),
        ({"data__validation_split": 1.5}, "data.validation_split"),
        ({"data__rev": "main"}, "data.rev"),
        ({"data__dataset": "../etc"}, "data.dataset"),
        ({"data__task": "clustering"}, "data.task"),
        ({"data__features": ["target"]}, "data"),
        ({"model__type": "rnn"}, "model"),  # an unknown tag is the union's own error
        ({"model__hidden": [0]}, "model.mlp.hidden.0"),
        ({"model__dropout": 1.0}, "model.mlp.dropout"),
        ({"model__extra": 1}, "model.mlp.extra"),
        ({"model": {"type": "cnn"}}, "model.cnn.input_shape"),
        ({"model": dict(CNN, input_shape=[1, 2])}, "model.cnn.input_shape.2"),
        ({"model": dict(CNN, channels=[])}, "model.cnn.channels"),
        ({"model": dict(CNN, kernel_size=16)}, "model.cnn.kernel_size"),
        ({"model": dict(CNN, hidden=0)}, "model.cnn.hidden"),
        ({"model": dict(CNN, dropout=-0.1)}, "model.cnn.dropout"),
        ({"model": {"type": "lstm"}}, "model.lstm.sequence_length"),
        ({"model": dict(LSTM, sequence_length=0)}, "model.lstm.sequence_length"),
        ({"model": dict(LSTM, hidden_size=0)}, "model.lstm.hidden_size"),
        ({"model": dict(GRU, num_layers=17)}, "model.gru.num_layers"),
        ({"model": dict(GRU, bidirectional="sideways")}, "model.gru.bidirectional"),
        ({"model": dict(GRU, dropout=1.0)}, "model.gru.dropout"),
        ({"model": {"type": "transformer_encoder"}}, "model.transformer_encoder.sequence_length"),
        ({"model": dict(ENCODER, d_model=1)}, "model.transformer_encoder.d_model"),
        ({"model": dict(ENCODER, nhead=0)}, "model.transformer_encoder.nhead"),
        ({"model": dict(ENCODER, num_layers=49)}, "model.transformer_encoder.num_layers"),
        ({"model": dict(ENCODER, dim_feedforward=0)}, "model.transformer_encoder.dim_feedforward"),
        ({"model": dict(ENCODER, dropout=1.0)}, "model.transformer_encoder.dropout"),
        ({"model": {"type": "plugin"}}, "model.plugin.factory"),
        ({"model": dict(PLUGIN, factory="x" * 201)}, "model.plugin.factory"),
        ({"model": dict(PLUGIN, options=[1])}, "model.plugin.options"),
        ({"framework": "transformers", "model": dict(PRETRAINED, checkpoint="bert-base")},
         "model.pretrained_text.checkpoint"),
        ({"framework": "transformers", "model": dict(PRETRAINED, max_length=4)},
         "model.pretrained_text.max_length"),
        ({"framework": "transformers", "model": dict(PRETRAINED, freeze_encoder="maybe")},
         "model.pretrained_text.freeze_encoder"),
        ({"framework": "transformers", "model": dict(PRETRAINED, dropout=1.0)},
         "model.pretrained_text.dropout"),
        ({"training__precision": "fp8"}, "training.precision"),
        ({"training__num_workers": -1}, "training.num_workers"),
        ({"training__num_workers": 65}, "training.num_workers"),
        ({"training__pin_memory": "maybe"}, "training.pin_memory"),
        ({"training__compile": "maybe"}, "training.compile"),
        ({"resources__queue": "tpu"}, "resources.queue"),
        ({"resources__gpus": -1}, "resources.gpus"),
        ({"resources__gpus": 65}, "resources.gpus"),
        ({"init_from": {"model_name": "m"}}, "init_from.version"),
        ({"init_from": {"model_name": "m", "version": "0"}}, "init_from.version"),
        ({"init_from": {"model_name": "m", "version": "v1"}}, "init_from.version"),
        ({"init_from": {"model_name": "bad name!", "version": "1"}}, "init_from.model_name"),
        ({"init_from": {"model_name": "m", "version": "1", "run": "x"}}, "init_from.run"),
        ({"exports": ["pickle"]}, "exports.0"),
        ({"exports": []}, "exports"),
        ({"framework": "tensorflow"}, "framework"),
        ({"spec_version": 2}, "spec_version"),
        ({"learning_rte": 0.1}, "learning_rte"),
        ({"training__momentum": 0.9}, "training.momentum"),
        ({"model_name": "bad name!"}, "model_name"),
    ],
)
def test_each_bad_field_is_named(changes, field):
    fields = fields_of(job_spec(rev=REV, **changes))
    assert field in fields, fields


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        # Model-level checks report loc () ("" once joined): the message names the field instead.
        ({"model": dict(ENCODER, d_model=10, nhead=4)}, "d_model (10) must be a multiple of nhead (4)"),
        ({"framework": "keras", "model": ENCODER}, "model.type 'transformer_encoder' is not available "
                                                   "with framework 'keras'"),
        ({"framework": "keras", "model": PLUGIN},
         "model.type 'plugin' is not available with framework 'keras'"),
        ({"framework": "keras", "model": PRETRAINED}, "model.type 'pretrained_text' is not available"),
        ({"framework": "pytorch", "model": PRETRAINED}, "model.type 'pretrained_text' is not available "
                                                        "with framework 'pytorch'"),
        ({"framework": "transformers"}, "model.type 'mlp' is not available with framework 'transformers'"),
        ({"framework": "transformers", "model": CNN}, "it builds: pretrained_text"),
        ({"exports": ["savedmodel"]}, "exports ['savedmodel'] are not available with framework 'pytorch'"),
        ({"framework": "keras", "exports": ["torchscript"]},
         "exports ['torchscript'] are not available with framework 'keras'"),
        ({"framework": "transformers", "model": PRETRAINED, "exports": ["onnx", "savedmodel"]},
         "exports ['savedmodel'] are not available with framework 'transformers'"),
        ({"exports": ["onnx", "onnx"]}, "exports must not repeat a format"),
        ({"framework": "keras", "training__compile": True}, "training.compile is torch.compile"),
        ({"framework": "keras", "resources__gpus": 2}, "resources.gpus > 1"),
        ({"framework": "keras", "training__grad_accum_steps": 2}, "training.grad_accum_steps"),
        ({"framework": "keras", "training__num_workers": 2}, "training.num_workers and pin_memory"),
        ({"framework": "keras", "training__pin_memory": True}, "training.num_workers and pin_memory"),
        ({"framework": "keras", "init_from": {"model_name": "m", "version": "1"}}, "init_from"),
        ({"framework": "transformers", "model": PRETRAINED, "data__task": "regression"},
         "model 'pretrained_text' is a classifier"),
        ({"training__early_stopping": {"metric": "val_mae"}}, "training.early_stopping.metric 'val_mae'"),
    ],
)
def test_cross_field_mismatches_are_refused_with_a_message_naming_the_fields(changes, words):
    errors = errors_of(job_spec(rev=REV, **changes))
    assert any(words in err["msg"] for err in errors), [err["msg"] for err in errors]


def test_a_model_without_a_type_is_still_an_mlp():
    # Spec v1 took a model without 'type' as an MLP before the model union existed.
    job = JobCreate.model_validate(job_spec(rev=REV, model={"hidden": [8]}))
    assert job.model.type == "mlp" and job.model.hidden == [8]  # type: ignore[union-attr]


def test_framework_tables_cover_every_framework():
    # A framework added to the enum without its models/exports would KeyError in the validator.
    assert set(FRAMEWORK_MODELS) == set(Framework) == set(FRAMEWORK_EXPORTS)


@pytest.mark.parametrize(
    "factory",
    ["../x:y", "os.path:join", "pkg.mod:fn", "/abs/mod:fn", "mod", "mod:", ":fn", "mod:fn:extra",
     "mod:fn.attr", "1mod:fn", "mod:fn()", "mod :fn", "mod:fn\n"],
)
def test_plugin_factory_must_be_plain_module_colon_function(factory):
    errors = errors_of(job_spec(rev=REV, model=dict(PLUGIN, factory=factory)))
    [error] = errors
    assert error["loc"] == ("model", "plugin", "factory")
    assert "factory must be 'module:function'" in error["msg"] and "no dots or slashes" in error["msg"]


@pytest.mark.parametrize("factory", ["my_models:build", "_private:_make", "M2:Net_v2"])
def test_plugin_factory_plain_names_are_accepted(factory):
    job = JobCreate.model_validate(job_spec(rev=REV, model=dict(PLUGIN, factory=factory, options={"k": 1})))
    assert job.model.factory == factory  # type: ignore[union-attr]


def test_revision_error_speaks_of_git():
    with pytest.raises(ValidationError, match="git commit id"):
        JobCreate.model_validate(job_spec(rev="HEAD"))


def test_api_names_every_bad_field_of_one_spec(settings):
    from services.trainer.app import create_app

    spec = job_spec(
        rev=REV, model=dict(CNN, kernel_size=99), training__precision="fp8", training__num_workers=-1,
        resources__gpus=-1, exports=["pickle"], init_from={"model_name": "m", "version": "0"},
    )
    spec["data"]["rev"] = "main"
    spec["learning_rte"] = 0.1
    wanted = {"model.cnn.kernel_size", "training.precision", "training.num_workers", "resources.gpus",
              "exports.0", "init_from.version", "data.rev", "learning_rte"}
    with running_app(create_app(settings)) as base:
        response = httpx.post(f"{base}/jobs", json=spec, headers=auth(Role.TRAINER))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert {d["field"] for d in error["details"]} == wanted, error["details"]
        assert all(f"{field}:" in error["message"] for field in wanted), error["message"]

        # A model-level mismatch has no field of its own: the 422 says so in words.
        keras_torchscript = job_spec(rev=REV, framework="keras", exports=["torchscript"])
        mismatch = httpx.post(f"{base}/jobs", json=keras_torchscript, headers=auth(Role.TRAINER))
        assert mismatch.status_code == 422, mismatch.text
        body = mismatch.json()["error"]
        assert "exports ['torchscript'] are not available with framework 'keras'" in body["message"]
        outside = job_spec(rev=REV, model=dict(PLUGIN, factory="os.path:join"))
        plugin = httpx.post(f"{base}/jobs", json=outside, headers=auth(Role.TRAINER))
        assert plugin.status_code == 422 and FACTORY_MESSAGE in plugin.json()["error"]["message"]
        assert {d["field"] for d in plugin.json()["error"]["details"]} == {"model.plugin.factory"}
        assert httpx.get(f"{base}/jobs", headers=auth(Role.VIEWER)).json() == []
