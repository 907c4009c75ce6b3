"""``shipyard data`` against a real trainer API and a real DVC repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sklearn.datasets import load_iris
from typer.testing import CliRunner

from services.trainer.app import create_app
from shipyard_cli.main import app as cli
from shipyard_common.auth import Role
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import trainer_settings
from tests.support import TOKENS, running_app


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def run(platform: PlatformSettings) -> Any:
    with running_app(create_app(trainer_settings(platform))) as base:
        def invoke(*args: str, role: Role = Role.TRAINER) -> Any:
            env = {"SHIPYARD_TRAINER_URL": base, "COLUMNS": "200",
                   "SHIPYARD_API_TOKEN": next(t for t, r in TOKENS.items() if r == role)}
            return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

        yield invoke


def test_add_list_show_diff_and_a_refusal(run, tmp_path: Path):
    frame = load_iris(as_frame=True).frame
    first, second = tmp_path / "iris.csv", tmp_path / "iris.parquet"
    frame.to_csv(first, index=False)
    frame.head(120).to_parquet(second)
    added = run("data", "add", str(first), "--name", "iris", "--tag", "v1")
    assert added.exit_code == 0, added.output
    rev = flat(added.output).split("revision ")[1].split()[0]
    assert len(rev) == 40 and "(tags: v1)" in added.output
    assert run("data", "add", str(second), "--name", "iris").exit_code == 0
    listed = run("data", "list", role=Role.VIEWER)
    assert "iris" in listed.output and " 2 " in listed.output
    shown = run("data", "show", "iris@v1", role=Role.VIEWER)
    assert shown.exit_code == 0 and rev in shown.output and "150 rows" in shown.output
    assert "sepal length (cm)" in shown.output and "no model yet" in shown.output
    diff = run("data", "diff", "iris", "v1", "latest", role=Role.VIEWER)
    assert diff.exit_code == 0 and "rows 150 → 120 (-30)" in flat(diff.output) and "ks" in diff.output

    rules = tmp_path / "rules.yaml"
    rules.write_text("label: {column: target, classes: [0, 1, 2]}\n")
    assert run("data", "rules", "iris", str(rules)).exit_code == 0
    frame[frame["target"] != 2].to_csv(first, index=False)
    refused = run("data", "add", str(first), "--name", "iris")
    assert refused.exit_code == 1 and "label_classes" in refused.output and "[2]" in refused.output
    missing = run("data", "show", "iris@nope", role=Role.VIEWER)
    assert missing.exit_code == 1 and "no revision 'nope'" in flat(missing.output)
    viewer = run("data", "add", str(second), "--name", "iris", role=Role.VIEWER)
    assert viewer.exit_code == 1 and "trainer" in viewer.output
