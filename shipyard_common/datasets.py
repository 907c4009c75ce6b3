"""Datasets versioned with DVC: a git repository whose data lives in a DVC remote.

A dataset version is its name plus the git revision of the repository that pins it. Training
reads a dataset at its revision; the monitor reads the same revision as its drift reference.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from shipyard_common.errors import InvalidInput, NotFound, Unavailable
from shipyard_common.settings import NO_TELEMETRY_ENV

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
REVISION = re.compile(r"^[0-9a-f]{7,64}$")

_lock = threading.Lock()


def validate_name(name: str, *, kind: str = "dataset") -> str:
    """Names that become file paths or registry keys: no separators, no '..', no leading dot."""
    if not DATASET_NAME.match(name) or ".." in name:
        raise InvalidInput(
            f"{kind} name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def validate_dataset_name(name: str) -> str:
    return validate_name(name, kind="dataset")


def validate_revision(rev: str) -> str:
    if not REVISION.match(rev):
        raise InvalidInput(f"dataset revision {rev!r} is not a git commit id (7-64 hex digits)")
    return rev


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    rev: str
    path: str
    rows: int
    columns: list[str]
    md5: str


class DataRepo:
    """A DVC repository with a local-folder remote, both under the platform's state directory."""

    def __init__(self, path: Path, remote: Path) -> None:
        self.path = Path(path).resolve()
        self.remote = Path(remote).resolve()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(NO_TELEMETRY_ENV)
        env.update(
            GIT_AUTHOR_NAME="shipyard",
            GIT_AUTHOR_EMAIL="shipyard@localhost",
            GIT_COMMITTER_NAME="shipyard",
            GIT_COMMITTER_EMAIL="shipyard@localhost",
        )
        return env

    def _run(self, *args: str) -> str:
        result = subprocess.run(list(args), cwd=self.path, env=self._env(), capture_output=True, text=True)
        if result.returncode != 0:
            raise Unavailable(
                f"{' '.join(args[:2])} failed in the data repository: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout.strip()

    def _dvc(self, *args: str) -> str:
        import sys

        return self._run(sys.executable, "-m", "dvc", *args)

    def ensure(self) -> None:
        """Create the git + DVC repository and its remote on first use; idempotent."""
        with _lock:
            self.path.mkdir(parents=True, exist_ok=True)
            self.remote.mkdir(parents=True, exist_ok=True)
            if not (self.path / ".git").exists():
                self._run("git", "init", "-q", "-b", "main")
            if not (self.path / ".dvc").exists():
                self._dvc("init", "-q")
                self._dvc("config", "core.autostage", "true")
                self._dvc("remote", "add", "-d", "-f", "local", str(self.remote))
                self._run("git", "add", "-A")
                self._run("git", "commit", "-q", "-m", "Initialise Shipyard data repository")
            else:
                self._dvc("remote", "add", "-d", "-f", "local", str(self.remote))

    def add(self, name: str, frame: pd.DataFrame) -> DatasetVersion:
        """Version ``frame`` as ``data/<name>.csv``, push it to the remote, return the revision."""
        validate_dataset_name(name)
        self.ensure()
        relative = f"data/{name}.csv"
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        content = frame.to_csv(index=False).encode()
        md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
        with _lock:
            target.write_bytes(content)
            self._dvc("add", "-q", relative)
            self._run("git", "add", "-A")
            status = self._run("git", "status", "--porcelain")
            if status:
                self._run("git", "commit", "-q", "-m", f"Dataset {name} ({md5[:8]})")
            self._dvc("push", "-q")
            rev = self._run("git", "rev-parse", "HEAD")
        return DatasetVersion(
            name=name, rev=rev, path=relative, rows=len(frame), columns=list(frame.columns), md5=md5
        )

    def read(self, name: str, rev: str) -> pd.DataFrame:
        """The dataset as it was at ``rev``, fetched from the DVC remote if not cached."""
        import dvc.api
        from dvc.exceptions import DvcException

        validate_dataset_name(name)
        validate_revision(rev)
        if not (self.path / ".dvc").exists():
            raise NotFound(f"no data repository at {self.path}; add a dataset first")
        try:
            with _lock:
                raw = dvc.api.read(
                    f"data/{name}.csv", repo=str(self.path), rev=rev, remote="local", mode="rb"
                )
        except (DvcException, FileNotFoundError) as exc:
            raise NotFound(f"dataset {name!r} does not exist at revision {rev[:12]}: {exc}") from exc
        except Exception as exc:  # scmrepo raises its own errors for unknown revisions
            raise NotFound(f"dataset {name!r} at revision {rev[:12]} cannot be read: {exc}") from exc
        return pd.read_csv(io.BytesIO(raw))
