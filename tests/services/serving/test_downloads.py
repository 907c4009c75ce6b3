"""A version's files under the shared models folder: serving's worker processes download into the same
folder (the platform's state dir), and one must never pull the files from under another loading them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest

from services.serving.app import create_app
from services.serving.core.follower import ModelFollower
from services.serving.runtimes.onnx import OnnxRuntime
from services.serving.settings import ServingSettings
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import register_folder
from tests.services.serving.support import NO_RECONCILE


def _followers(platform: PlatformSettings, count: int) -> list[ModelFollower]:
    """The followers of ``count`` serving workers of one platform (not started: the test drives them)."""
    settings = ServingSettings(platform=platform, reconcile_interval_s=NO_RECONCILE)
    return [create_app(settings).state.follower for _ in range(count)]


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(path.name for path in model_dir.iterdir() if path.name.startswith("."))


def test_a_worker_finishing_second_keeps_the_first_workers_download(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = register_folder(model_factory, unique_name("download"), seed=3, serve="onnx")
    first, second = _followers(isolated_platform, 2)
    real = mlflow.artifacts.download_artifacts
    seen: dict[str, Any] = {}

    def first_finishes_meanwhile(**kwargs: Any) -> Any:
        path = real(**kwargs)
        if not seen:  # the second worker's download: the first one completes before it ends
            seen["nested"] = True
            seen["target"] = target = first.download(version.name, version.version)
            seen["inode"] = target.stat().st_ino
        return path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", first_finishes_meanwhile)
    found = second.download(version.name, version.version)
    assert found == seen["target"]
    assert found.stat().st_ino == seen["inode"], "the second download replaced the first one's folder"
    assert isinstance(second.load(version.name, version.version).runtime, OnnxRuntime)
    assert _leftovers(found.parent) == [], "the second download's staging folder was left behind"


def test_a_leftover_without_its_marker_is_replaced(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    version = register_folder(model_factory, unique_name("download"), seed=4, serve="onnx")
    (follower,) = _followers(isolated_platform, 1)
    complete = follower.download(version.name, version.version)
    for item in sorted(complete.rglob("*"), reverse=True):  # an older crash's folder: files, no marker
        if item.name == ".complete":
            item.unlink()
    (complete / "junk.txt").write_text("from a crash")
    found = follower.download(version.name, version.version)
    assert (found / ".complete").exists() and not (found / "junk.txt").exists()
    assert _leftovers(found.parent) == []
