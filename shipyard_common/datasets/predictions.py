"""Outputs of batch scoring in the data repository: ``predictions/<name>/`` (Parquet files and a
manifest) tracked by DVC and pushed to the same remote as the datasets, ``predictions/<name>.json``
(lineage) in git; written by ``pipelines.batch``, read back by anyone with the revision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from shipyard_common.datasets.names import validate_dataset_name
from shipyard_common.datasets.repo import DataRepo
from shipyard_common.errors import Unavailable

MANIFEST = "manifest.json"


class PredictionsRepo(DataRepo):
    """The data repository, with outputs of batches: ``predictions/<name>/`` (Parquet files and a
    manifest) tracked by DVC and pushed to the same remote, ``predictions/<name>.json`` (lineage) in
    git. A version is the git commit, as for every dataset; one writer at a time (the repo's lock)."""

    def add_predictions(self, name: str, files: list[Path], manifest: dict[str, Any]) -> str:
        """Commit ``files`` and ``manifest`` as the next version of output ``name``; return its revision
        (the latest one when nothing changed)."""
        validate_dataset_name(name)
        relative = f"predictions/{name}"
        with self._locked():
            self._ensure_locked()
            latest = self._git_ok("log", "-1", "--format=%H", "--", f"{relative}.dvc")
            committed = json.loads(self._git_ok("show", f"HEAD:{relative}.json") or "{}")
            if latest and committed.get("batch") == manifest["batch"]:
                return latest  # the same batch (same inputs, same chunks) is the latest version already
            folder = self.path / relative
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for path in files:
                shutil.copyfile(path, folder / path.name)
            text_of = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
            (folder / MANIFEST).write_text(text_of)
            lineage = {key: value for key, value in manifest.items() if key != "chunks"}
            (self.path / f"{relative}.json").write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
            self._track(folder)
            paths = [f"{relative}.dvc", f"{relative}.json", "predictions/.gitignore", ".dvc/config"]
            self._run("git", "add", "--", *[p for p in paths if (self.path / p).exists()])
            if self._run("git", "status", "--porcelain", "--", *paths):
                self._run("git", "commit", "-q", "-m", f"Predictions {name} ({manifest['rows']} rows)")
            return self._run("git", "log", "-1", "--format=%H", "--", f"{relative}.dvc")

    def _track(self, folder: Path) -> None:
        """``dvc add`` and ``dvc push`` of ``folder`` through DVC's Python API, in this process: the
        CLI costs a Python start and DVC's import per call (about 2.5 s each, against 0.5 s here once
        DVC is loaded). The caller holds the repository's lock."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            with Repo(str(self.path)) as repo:
                repo.add([str(folder)])
                repo.push(targets=[f"{folder}.dvc"], remote=self.remote_name)
        except DvcException as exc:
            why = f"DVC could not add or push {folder.name} in the data repository: {exc}"
            raise Unavailable(why) from exc

    def read_predictions(self, name: str, rev: str) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Output ``name`` at ``rev`` (fetched from the remote where the cache lacks it): its rows, in
        chunk order, and its manifest."""
        from dvc.api import DVCFileSystem

        validate_dataset_name(name)
        remote = {"remote": {self.remote_name: self.remote_config()}, "core": {"remote": self.remote_name}}
        fs = DVCFileSystem(str(self.path), rev=rev, config=remote)
        relative = f"predictions/{name}"
        manifest = json.loads(fs.read_text(f"{relative}/{MANIFEST}"))
        frames = []
        for entry in manifest["chunks"]:
            with fs.open(f"{relative}/{entry['file']}", "rb") as handle:
                frames.append(pd.read_parquet(handle))
        return pd.concat(frames, ignore_index=True), manifest
