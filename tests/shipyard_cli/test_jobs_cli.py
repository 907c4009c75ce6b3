"""``shipyard jobs submit spec.yaml`` against a real trainer API (uvicorn, real Redis broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from services.trainer.app import create_app
from shipyard_cli.main import app as cli
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import job_spec, trainer_settings
from tests.support import TOKENS, auth, running_app

REV = "0123456789abcdef0123456789abcdef01234567"  # for specs refused before their dataset is looked up


@pytest.fixture
def rev(platform: PlatformSettings) -> str:
    """A versioned dataset in the trainer's data repository: a job naming it is accepted."""
    frame = load_breast_cancer(as_frame=True).frame.head(40)
    return DataRepo.from_settings(platform).add("breast_cancer", frame).rev


def flat(text: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def trainer(platform: PlatformSettings, tmp_path: Path) -> Any:
    """A trainer API (no worker: submitted jobs stay queued) and a function running the CLI at it."""
    with running_app(create_app(trainer_settings(platform))) as base:
        env = {
            "SHIPYARD_TRAINER_URL": base,
            "SHIPYARD_API_TOKEN": next(t for t, r in TOKENS.items() if r == Role.TRAINER),
            "SHIPYARD_STATE_DIR": str(tmp_path / "cli-state"),
            "COLUMNS": "200",
        }

        def run(*args: str) -> Any:
            return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

        yield base, run


def test_submit_a_yaml_spec_creates_the_job(trainer, tmp_path, rev):
    base, run = trainer
    spec = job_spec(rev=rev, model_name="cli-yaml", training__epochs=3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))

    result = run("jobs", "submit", str(path))
    assert result.exit_code == 0, result.output
    words = flat(result.output).split()
    assert words[0] == "job" and words[2] == "queued", result.output
    job_id = words[1]

    job = httpx.get(f"{base}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()
    assert job["state"] == "queued" and job["model_name"] == "cli-yaml"
    assert job["spec"]["training"]["epochs"] == 3 and job["spec"]["data"]["rev"] == rev
    listed = run("jobs", "list")
    assert listed.exit_code == 0 and job_id in listed.output


def test_a_yaml_spec_with_bad_fields_prints_each_field_and_fails(trainer, tmp_path):
    base, run = trainer
    path = tmp_path / "bad.yaml"
    path.write_text(
        """\
model_name: cli-bad
framework: pytorch
model:
  type: cnn
  input_shape: [1, 5, 6]
  kernel_size: 99
data:
  dataset: breast_cancer
  rev: main
  task: classification
  target: target
training:
  epochs: 0
  learning_rte: 0.1
resources:
  queue: tpu
exports: [onnx]
"""
    )
    result = run("jobs", "submit", str(path))
    assert result.exit_code == 1, result.output
    out = flat(result.output)
    assert "error:" in out and "invalid request" in out
    for field in ("model.cnn.kernel_size", "data.rev", "training.epochs", "training.learning_rte",
                  "resources.queue"):
        assert f"{field}:" in out, (field, out)
    assert httpx.get(f"{base}/jobs", headers=auth(Role.VIEWER)).json() == []


def test_a_mismatch_and_brackets_in_the_message_are_printed_verbatim(trainer, tmp_path):
    _, run = trainer
    # The API echoes the spec's values; rich must not read them as markup ("[/x]" would crash it).
    path = tmp_path / "mismatch.yaml"
    spec = job_spec(rev=REV, framework="keras", exports=["torchscript"])
    path.write_text(yaml.safe_dump(spec))
    result = run("jobs", "submit", str(path))
    assert result.exit_code == 1, result.output
    assert "exports ['torchscript'] are not available with framework 'keras'" in flat(result.output)

    path.write_text(yaml.safe_dump(job_spec(rev=REV, model_name="[/x]")))
    result = run("jobs", "submit", str(path))
    assert result.exit_code == 1, result.output
    assert "model_name:" in result.output and "'[/x]'" in flat(result.output)


def test_a_file_that_is_not_yaml_is_refused_before_any_request(trainer, tmp_path):
    base, run = trainer
    path = tmp_path / "broken.yaml"
    path.write_text("model_name: [unclosed\n")
    result = run("jobs", "submit", str(path))
    assert result.exit_code == 1 and "is not valid YAML" in flat(result.output)
    assert httpx.get(f"{base}/jobs", headers=auth(Role.VIEWER)).json() == []
