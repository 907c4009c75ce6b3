"""SavedModel versions answered through TF Serving's gRPC API (a stand-in: see tf_serving_stand_in)."""

from __future__ import annotations

import httpx
import numpy as np
import tritonclient.http as triton

from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import expected, register_folder
from tests.services.serving.support import model_status, serving
from tests.services.serving.tf_serving_stand_in import tf_serving_stand_in, write_savedmodel
from tests.support import auth

ROWS = np.asarray([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0]], dtype=np.float32)


def test_a_savedmodel_version_is_answered_by_tf_serving_over_grpc(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, tmp_path: object
) -> None:
    name = unique_name("tfs")
    version = register_folder(
        model_factory,
        name,
        seed=9,
        formats=("savedmodel", "onnx"),
        serve="savedmodel",
        savedmodel_writer=write_savedmodel,
    )
    missing = register_folder(
        model_factory,
        unique_name("tfs-missing"),
        seed=8,
        formats=("savedmodel",),
        serve="savedmodel",
        savedmodel_writer=write_savedmodel,
    )
    model_factory.set_production(name, version.version)
    model_factory.set_production(missing.name, missing.version)
    with tf_serving_stand_in() as (address, service):
        # TF Serving holds the version's savedmodel/ under the registry's name and version number.
        folder = model_factory.client.download_artifacts(
            str(model_factory.client.get_model_version(name, version.version).run_id),
            "model/savedmodel",
            str(tmp_path),
        )
        service.add(name, int(version.version), folder)  # type: ignore[arg-type]
        with serving(isolated_platform, tf_serving_address=address) as base:
            status = model_status(base, name)
            assert status["format"] == "savedmodel" and status["platform"] == "tensorflow_savedmodel"
            assert status["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 4]}]
            warmed = service.predict_calls
            assert warmed == 1

            want = expected(9, ROWS)
            ours = httpx.post(
                f"{base}/v1/models/{name}/predict", json={"inputs": ROWS.tolist()}, headers=auth("viewer")
            )
            assert ours.status_code == 200, ours.text
            np.testing.assert_allclose(ours.json()["outputs"], want, rtol=1e-5, atol=1e-6)
            rest = httpx.post(
                f"{base}/v1/models/{name}:predict", json={"instances": ROWS.tolist()}, headers=auth("viewer")
            )
            np.testing.assert_allclose(rest.json()["predictions"], want, rtol=1e-5, atol=1e-6)
            infer_input = triton.InferInput("input", [2, 4], "FP32")
            infer_input.set_data_from_numpy(ROWS)
            result = triton.InferenceServerClient(base.removeprefix("http://")).infer(
                name, [infer_input], headers=auth("viewer")
            )
            np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-5, atol=1e-6)
            assert service.predict_calls == warmed + 3

            # Validation happens here, before TF Serving is asked.
            bad = httpx.post(
                f"{base}/v1/models/{name}:predict", json={"instances": [[1.0, 2.0]]}, headers=auth("viewer")
            )
            assert bad.status_code == 400 and "dimension 1 must be 4" in bad.json()["error"]
            assert service.predict_calls == warmed + 3

            # A version TF Serving does not hold fails to load, and its status says why.
            failed = model_status(base, missing.name)
            assert failed["status"] == "failed"
            assert "does not serve" in failed["error"] and "NOT_FOUND" in failed["error"]


def test_without_a_tf_serving_address_the_next_format_is_served(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    name = unique_name("tfs-fallback")
    version = register_folder(
        model_factory,
        name,
        seed=4,
        formats=("savedmodel", "onnx"),
        serve="savedmodel",
        savedmodel_writer=write_savedmodel,
    )
    model_factory.set_production(name, version.version)
    with serving(isolated_platform) as base:
        assert model_status(base, name)["format"] == "onnx"
