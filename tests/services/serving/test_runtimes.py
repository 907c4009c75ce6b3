"""Runtimes and input validation on their own: no MLflow, no HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.serving.core.validation import array_from_json, check_body_size, validate_inputs
from services.serving.runtimes.base import ModelLoadError, Runtime, Signature
from services.serving.runtimes.loader import choose_format, format_files, load_runtime
from services.serving.runtimes.onnx import load_onnx, session_options
from services.serving.runtimes.torchscript import load_torchscript
from services.serving.settings import ServingSettings
from shipyard_common.errors import InvalidInput, PayloadTooLarge
from shipyard_common.lineage import TAG_FORMAT
from tests.services.serving.model_folder import SIGNATURE, expected, write_model_folder

ROWS = np.asarray([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)


def settings(**values: object) -> ServingSettings:
    return ServingSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_model_folder(tmp_path / "model", seed=3)
    return tmp_path


def test_onnx_session_options_are_set_deliberately() -> None:
    options = session_options(intra_op_threads=3, graph_optimization="all")
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_a_small_onnx_model_runs_on_one_thread_unless_told_otherwise(folder: Path) -> None:
    path = folder / "model" / "onnx" / "model.onnx"
    # A 4→3 classifier's call takes microseconds: a pool of 4 cannot beat one thread by 20%.
    chosen = load_onnx(path, intra_op_threads=4, graph_optimization="all")
    assert chosen.threads == 1 and chosen.session.get_session_options().intra_op_num_threads == 1
    kept = load_onnx(path, intra_op_threads=4, graph_optimization="all", choose_threads=False)
    assert kept.threads == 4 and kept.session.get_session_options().intra_op_num_threads == 4
    np.testing.assert_allclose(chosen.predict({"input": ROWS})["probabilities"],
                               kept.predict({"input": ROWS})["probabilities"], rtol=1e-6)


def test_onnx_and_torchscript_answer_alike_behind_one_interface(folder: Path) -> None:
    root = folder / "model"
    signature = Signature.from_json(SIGNATURE)
    onnx = load_onnx(root / "onnx" / "model.onnx", intra_op_threads=1, graph_optimization="all")
    script = load_torchscript(root / "torchscript" / "model.pt", signature=signature, intra_op_threads=1)
    for runtime, platform in ((onnx, "onnxruntime_onnx"), (script, "pytorch_libtorch")):
        assert isinstance(runtime, Runtime) and runtime.platform == platform
        answer = runtime.predict({"input": ROWS})
        assert list(answer) == ["probabilities"]
        np.testing.assert_allclose(answer["probabilities"], expected(3, ROWS), rtol=1e-5, atol=1e-6)
        runtime.close()
    # ONNX describes itself; TorchScript does not, so it needs the stored signature.
    assert onnx.signature.inputs[0].shape == (None, 4) and onnx.signature.inputs[0].dtype == np.float32
    with pytest.raises(ModelLoadError, match=r"signature\.json"):
        load_torchscript(root / "torchscript" / "model.pt", signature=None, intra_op_threads=1)


def test_torchscript_is_loaded_with_jit_load_only(tmp_path: Path) -> None:
    # A pickle (what torch.save of a module or state dict writes) is not TorchScript: refused.
    pickled = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, pickled)
    with pytest.raises(ModelLoadError, match=r"torch\.jit\.load cannot open"):
        load_torchscript(pickled, signature=Signature.from_json(SIGNATURE), intra_op_threads=1)


def test_the_format_tag_chooses_the_runtime_else_onnx_torchscript_savedmodel(folder: Path) -> None:
    available = format_files(folder / "model")
    assert sorted(available) == ["onnx", "torchscript"]
    assert choose_format({TAG_FORMAT: "torchscript"}, available, tf_serving=False) == "torchscript"
    assert choose_format({}, available, tf_serving=False) == "onnx"
    assert choose_format({}, {"torchscript": Path("x")}, tf_serving=False) == "torchscript"
    # A tag naming a format the version lacks, or savedmodel without TF Serving: the next one held.
    assert choose_format({TAG_FORMAT: "savedmodel"}, available, tf_serving=False) == "onnx"
    assert choose_format({}, {"savedmodel": Path("x")}, tf_serving=True) == "savedmodel"
    with pytest.raises(ModelLoadError, match="SHIPYARD_SERVING_TF_SERVING_ADDRESS"):
        choose_format({TAG_FORMAT: "savedmodel"}, {"savedmodel": Path("x")}, tf_serving=False)

    loaded = load_runtime(
        folder, name="m", version="1", tags={TAG_FORMAT: "torchscript"}, settings=settings()
    )
    assert loaded.runtime.format == "torchscript" and loaded.signature.classes == ("a", "b", "c")


def test_a_stored_signature_that_disagrees_with_the_model_is_refused(tmp_path: Path) -> None:
    wrong = {**SIGNATURE, "inputs": [{"name": "features", "shape": [None, 4], "dtype": "float32"}]}
    write_model_folder(tmp_path / "model", seed=1, formats=("onnx",), signature=wrong)
    with pytest.raises(ModelLoadError, match="does not match the model's own"):
        load_runtime(tmp_path, name="m", version="1", tags={}, settings=settings())


SIG = Signature.from_json(SIGNATURE)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({}, "missing"),
        ({"input": ROWS, "extra": ROWS}, "unknown input(s) ['extra']"),
        ({"input": ROWS.astype(np.float64)}, "is float64; the model takes 'input' float32[?, 4]"),
        ({"input": ROWS[:, :3]}, "dimension 1 must be 4, not 3"),
        ({"input": ROWS[0]}, "2 dimensions"),
        ({"input": np.zeros((0, 4), np.float32)}, "no rows"),
        ({"input": np.zeros((9, 4), np.float32)}, "at most 8"),
        ({"input": np.asarray([[1, np.nan, 3, 4]], np.float32)}, "at [0, 1] is nan; values must be finite"),
        ({"input": np.asarray([[1, 2, np.inf, 4]], np.float32)}, "at [0, 2] is inf"),
    ],
)
def test_validation_refuses_with_a_message_that_says_what_is_wrong(
    arrays: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_inputs(arrays, SIG, max_batch_rows=8, allow_non_finite=False)
    assert message in caught.value.message


def test_validation_passes_good_input_and_non_finite_when_allowed() -> None:
    checked = validate_inputs({"input": ROWS}, SIG, max_batch_rows=8, allow_non_finite=False)
    assert checked["input"].flags.c_contiguous
    nan = np.asarray([[1, np.nan, 3, 4]], np.float32)
    assert np.isnan(
        validate_inputs({"input": nan}, SIG, max_batch_rows=8, allow_non_finite=True)["input"][0, 1]
    )


def test_json_values_are_numbers_of_the_models_dtype() -> None:
    assert array_from_json([[1, 2.5]], np.dtype("float32"), what="x").dtype == np.float32
    for value, message in (
        ([["1", 2]], "strings"),
        ([[True, False]], "booleans"),
        ([[1, 2], [3]], "rectangular"),
        ([[1e39]], "beyond the model's float32 range"),
    ):
        with pytest.raises(InvalidInput, match=message):
            array_from_json(value, np.dtype("float32"), what="x")
    with pytest.raises(InvalidInput, match="fractional"):
        array_from_json([[1.5]], np.dtype("int64"), what="ids")
    with pytest.raises(InvalidInput, match="beyond the int32 range"):
        array_from_json([[2**40]], np.dtype("int32"), what="ids")
    with pytest.raises(PayloadTooLarge):
        check_body_size(11, 10)
    json.dumps(SIGNATURE)
