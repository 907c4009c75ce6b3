"""The data repository: git for versions, tags, rules and metadata; a DVC remote for the data.

Layout: ``data/<name>.csv`` (DVC-tracked; the data itself lives in the remote), ``meta/<name>.json``
(schema, rows, content hash, summary statistics of that version), ``rules/<name>.yaml`` (checks a
new version must pass, docs/data.md), git tags ``<name>/<tag>``. A dataset version is the git
commit that pins it; data is always stored as CSV, so every reader gets the same bytes and hash (and
the same frame, parsed once per content: :mod:`shipyard_common.datasets.frames`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import SecretStr

from shipyard_common.datasets import rules as checks
from shipyard_common.datasets import stats
from shipyard_common.datasets.frames import FrameCache
from shipyard_common.datasets.names import (
    FULL_SHA,
    LATEST,
    REVISION,
    validate_dataset_name,
    validate_ref,
    validate_tag,
)
from shipyard_common.errors import Conflict, InvalidInput, NotFound, Unavailable
from shipyard_common.settings import NO_TELEMETRY_ENV

if TYPE_CHECKING:
    from shipyard_common.settings import PlatformSettings

# Reentrant: a write (under it) may read an older version, which takes it too.
_lock = threading.RLock()


class DatasetNotFound(NotFound):
    """A dataset, or a revision of it, that does not exist; ``field`` says which ("dataset" | "rev")."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, details={"field": field})
        self.field = field


@dataclass(frozen=True)
class S3Remote:
    """An S3-compatible bucket as the DVC remote. The credentials go to ``.dvc/config.local`` (which
    git ignores) and to DVC's reader, never into the repository."""

    bucket: str
    prefix: str = "shipyard-data"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    region: str | None = None

    @classmethod
    def from_settings(cls, platform: PlatformSettings) -> S3Remote | None:
        """The platform's bucket (``SHIPYARD_DVC_S3_*``), if it names one."""
        if not platform.dvc_s3_bucket:
            return None
        return cls(bucket=platform.dvc_s3_bucket, prefix=platform.dvc_s3_prefix,
                   endpoint_url=platform.dvc_s3_endpoint_url, access_key_id=platform.dvc_s3_access_key_id,
                   secret_access_key=platform.dvc_s3_secret_access_key, region=platform.dvc_s3_region)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")

    def options(self) -> dict[str, str]:
        """DVC's remote options besides the url."""
        values = {
            "endpointurl": self.endpoint_url,
            "access_key_id": self.access_key_id,
            "secret_access_key": (
                self.secret_access_key.get_secret_value() if self.secret_access_key else None
            ),
            "region": self.region,
        }
        return {key: value for key, value in values.items() if value}


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    rev: str
    path: str
    rows: int
    columns: list[str]
    md5: str
    tags: list[str] = field(default_factory=list)
    created: bool = True  # False: the data equalled the latest version, which is returned


class DataRepo:
    """A git + DVC repository and its remote: a local folder, or an S3 bucket when ``s3`` is given."""

    def __init__(self, path: Path, remote: Path, *, s3: S3Remote | None = None) -> None:
        self.path = Path(path).resolve()
        self.remote = Path(remote).resolve()
        self.s3 = s3
        self._configured = False

    @classmethod
    def from_settings(cls, platform: PlatformSettings) -> DataRepo:
        return cls(platform.data_repo_path, platform.dvc_remote_path, s3=S3Remote.from_settings(platform))

    @property
    def remote_name(self) -> str:
        return "s3" if self.s3 else "local"

    def remote_config(self) -> dict[str, str]:
        """What ``dvc.api`` needs to read from the remote on any machine: url and, for S3, options."""
        if self.s3:
            return {"url": self.s3.url, **self.s3.options()}
        return {"url": str(self.remote)}

    # -- plumbing --------------------------------------------------------------------------------

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

    def _run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), cwd=self.path, env=self._env(), capture_output=True, text=True)
        if check and result.returncode != 0:
            raise Unavailable(
                f"{' '.join(args[:2])} failed in the data repository: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout.strip() if result.returncode == 0 else ""

    def _git_ok(self, *args: str) -> str | None:
        """Output of a git command, or None when it fails (an unknown revision or path)."""
        result = subprocess.run(
            ["git", *args], cwd=self.path, env=self._env(), capture_output=True, text=True
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def _dvc(self, *args: str) -> str:
        return self._run(sys.executable, "-m", "dvc", *args)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across threads and processes (the API, the CLI, a flow); a file lock
        ends with its holder, so a crash never leaves it held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _lock, open(self.path.parent / f".{self.path.name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return (self.path / ".dvc").exists() and (self.path / ".git").exists()

    def ensure(self) -> None:
        """Create the git + DVC repository and its remote on first use; idempotent."""
        with self._locked():
            self._ensure_locked()

    def _ensure_locked(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.s3:
            self.remote.mkdir(parents=True, exist_ok=True)
        fresh = False
        if not (self.path / ".git").exists():
            self._run("git", "init", "-q", "-b", "main")
        if not (self.path / ".dvc").exists():
            self._dvc("init", "-q")
            self._dvc("config", "core.autostage", "true")
            fresh = True
        if fresh or not self._configured:
            self._dvc("remote", "add", "-d", "-f", self.remote_name, self.remote_config()["url"])
            if self.s3:
                for key, value in self.s3.options().items():
                    self._dvc("remote", "modify", "--local", self.remote_name, key, value)
            self._configured = True
        if fresh:
            self._run("git", "add", ".dvc", ".dvcignore")
            self._run("git", "commit", "-q", "-m", "Initialise Shipyard data repository")

    # -- revisions -------------------------------------------------------------------------------

    @staticmethod
    def _data_path(name: str) -> str:
        return f"data/{name}.csv"

    def _latest(self, name: str) -> str | None:
        if not self.exists():
            return None
        return self._git_ok("log", "-1", "--format=%H", "--", f"{self._data_path(name)}.dvc") or None

    def _tags_at(self, name: str, rev: str) -> list[str]:
        listed = self._git_ok("tag", "--points-at", rev, "--list", f"{name}/*") or ""
        return [line.split("/", 1)[1] for line in listed.splitlines() if line]

    def resolve(self, name: str, ref: str) -> str:
        """The full commit id that ``ref`` (a commit id, short or full; a tag; ``latest``) names for
        dataset ``name``; :class:`DatasetNotFound` naming the dataset or the revision otherwise."""
        validate_dataset_name(name)
        validate_ref(ref)
        latest = self._latest(name)
        if latest is None:
            raise DatasetNotFound(f"dataset {name!r} does not exist", field="dataset")
        if ref == LATEST:
            return latest
        sha = self._git_ok("rev-parse", "-q", "--verify", f"refs/tags/{name}/{ref}^{{commit}}")
        if sha is None and REVISION.match(ref):
            sha = self._git_ok("rev-parse", "-q", "--verify", f"{ref}^{{commit}}")
        if sha is None:
            raise DatasetNotFound(
                f"dataset {name!r} has no revision {ref!r} (neither a commit id nor a tag of it)", field="rev"
            )
        if self._git_ok("cat-file", "-e", f"{sha}:{self._data_path(name)}.dvc") is None:
            raise DatasetNotFound(f"dataset {name!r} does not exist at revision {ref!r} ({sha[:12]})",
                                  field="rev")
        return sha

    # -- writing ---------------------------------------------------------------------------------

    def rules_text(self, name: str, rev: str = "HEAD") -> str | None:
        validate_dataset_name(name)
        if not self.exists():
            return None
        return self._git_ok("show", f"{rev}:rules/{name}.yaml")

    def set_rules(self, name: str, text: str) -> str:
        """Check in ``rules/<name>.yaml`` (refused unless it parses as rules); returns the commit."""
        validate_dataset_name(name)
        checks.parse_rules(text, source=f"rules for {name!r}")
        with self._locked():
            self._ensure_locked()
            target = self.path / "rules" / f"{name}.yaml"
            target.parent.mkdir(exist_ok=True)
            target.write_text(text)
            self._run("git", "add", f"rules/{name}.yaml")
            if self._run("git", "status", "--porcelain", "--", "rules"):
                self._run("git", "commit", "-q", "-m", f"Rules of dataset {name}")
            return self._run("git", "rev-parse", "HEAD")

    def add(
        self, name: str, frame: pd.DataFrame, *, tag: str | None = None, allow_schema_change: bool = False,
        source: str = "dataframe",
    ) -> DatasetVersion:
        """Validate ``frame`` against the dataset's rules and its previous version's schema, then version
        it as ``data/<name>.csv``: pushed to the remote first, committed after, tagged when asked.

        A refusal (:class:`~shipyard_common.errors.ValidationFailed`, every failing rule with its
        figures) happens before anything is written: no commit, no pushed blob, no lock left held.
        Data equal to the latest version adds nothing and returns that version.
        """
        validate_dataset_name(name)
        if tag is not None:
            validate_tag(tag)
        if frame.columns.empty:
            raise InvalidInput(f"dataset {name!r} has no columns")
        content = lists_as_json(frame).to_csv(index=False).encode()
        md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
        stored = pd.read_csv(io.BytesIO(content))  # the frame as every reader will see it
        relative = self._data_path(name)
        with self._locked():
            self._ensure_locked()
            latest = self._latest(name)
            previous = self._meta(name, latest) if latest else None
            if tag is not None:
                tagged = self._git_ok("rev-parse", "-q", "--verify", f"refs/tags/{name}/{tag}^{{commit}}")
                if tagged and not (previous and previous["md5"] == md5 and tagged == latest):
                    raise Conflict(f"tag {tag!r} of dataset {name!r} already names revision {tagged[:12]}",
                                   details={"tag": tag, "rev": tagged})
            if latest and previous and previous["md5"] == md5:
                if tag is not None:
                    self._run("git", "tag", "-f", f"{name}/{tag}", latest)
                return self._version(name, latest, previous, created=False)
            rules_text = self.rules_text(name)
            rules = checks.parse_rules(rules_text, source=f"rules/{name}.yaml") if rules_text else None
            schema = None if allow_schema_change or previous is None else previous["schema"]
            failures = checks.check(stored, rules, schema)
            if failures:
                raise checks.refuse(name, failures)
            meta = {
                "name": name, "path": relative, "rows": len(stored),
                "columns": [str(c) for c in stored.columns],
                "schema": checks.schema_of(stored), "md5": md5, "bytes": len(content), "source": source,
                "added_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "stats": stats.summarize(stored),
            }
            self._write_version(name, content, meta, tag)
            FrameCache(self.path).keep(md5, stored)  # readers of this version skip parsing its CSV
            rev = self._run("git", "rev-parse", "HEAD")
            return self._version(name, rev, meta, created=True)

    def _write_version(self, name: str, content: bytes, meta: dict[str, Any], tag: str | None) -> None:
        relative = self._data_path(name)
        paths = [f"{relative}.dvc", "data/.gitignore", f"meta/{name}.json", ".dvc/config"]
        existed = self._git_ok("cat-file", "-e", f"HEAD:{relative}.dvc") is not None
        (self.path / "data").mkdir(exist_ok=True)
        (self.path / "meta").mkdir(exist_ok=True)
        try:
            (self.path / relative).write_bytes(content)
            meta_text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
            (self.path / "meta" / f"{name}.json").write_text(meta_text)
            self._dvc("add", "-q", relative)
            self._dvc("push", "-q", "-r", self.remote_name, f"{relative}.dvc")
            self._run("git", "add", "--", *[p for p in paths if (self.path / p).exists()])
            self._run("git", "commit", "-q", "-m", f"Dataset {name} ({meta['md5'][:8]}, {meta['rows']} rows)")
            if tag is not None:
                self._run("git", "tag", f"{name}/{tag}")
        except Exception:
            self._undo(name, paths, existed)
            raise

    def _undo(self, name: str, paths: list[str], existed: bool) -> None:
        """Put the working tree back as HEAD has it, after a write failed half way."""
        self._run("git", "reset", "-q", "HEAD", "--", *paths, check=False)
        self._run("git", "checkout", "HEAD", "--", *paths, check=False)
        if existed:
            self._run(sys.executable, "-m", "dvc", "checkout", "-q", "-f", f"{self._data_path(name)}.dvc",
                      check=False)
        else:
            for path in (self._data_path(name), f"{self._data_path(name)}.dvc", f"meta/{name}.json"):
                (self.path / path).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def _meta(self, name: str, rev: str) -> dict[str, Any]:
        raw = self._git_ok("show", f"{rev}:meta/{name}.json")
        if raw:
            meta: dict[str, Any] = json.loads(raw)
            return meta
        # A version from before metadata was kept: compute it from the data.
        frame = self._read_exact(name, rev)
        content = frame.to_csv(index=False).encode()
        return {
            "name": name, "path": self._data_path(name), "rows": len(frame),
            "columns": [str(c) for c in frame.columns], "schema": checks.schema_of(frame),
            "md5": hashlib.md5(content, usedforsecurity=False).hexdigest(), "bytes": len(content),
            "source": "unknown", "added_at": None, "stats": stats.summarize(frame),
        }

    def _version(self, name: str, rev: str, meta: dict[str, Any], *, created: bool) -> DatasetVersion:
        return DatasetVersion(
            name=name, rev=rev, path=self._data_path(name), rows=int(meta["rows"]),
            columns=list(meta["columns"]), md5=str(meta["md5"]),
            tags=self._tags_at(name, rev), created=created,
        )

    def names(self) -> list[str]:
        """The datasets the repository holds now, by name."""
        if not self.exists():
            return []
        listed = self._git_ok("ls-tree", "--name-only", "HEAD", "data/") or ""
        return sorted(Path(p).name[: -len(".csv.dvc")] for p in listed.splitlines() if p.endswith(".csv.dvc"))

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of the dataset, newest first: rev, time, tags, rows, content hash."""
        validate_dataset_name(name)
        if self._latest(name) is None:
            raise DatasetNotFound(f"dataset {name!r} does not exist", field="dataset")
        log = self._git_ok("log", "--format=%H %cI", "--", f"{self._data_path(name)}.dvc") or ""
        out = []
        for line in log.splitlines():
            rev, at = line.split(" ", 1)
            raw = self._git_ok("show", f"{rev}:meta/{name}.json")
            meta = json.loads(raw) if raw else {}
            out.append({"rev": rev, "committed_at": at, "tags": self._tags_at(name, rev),
                        "rows": meta.get("rows"), "md5": meta.get("md5")})
        return out

    def info(self, name: str, ref: str = LATEST) -> dict[str, Any]:
        """One version: its schema, rows, content hash, statistics, tags, and the rules it passed."""
        rev = self.resolve(name, ref)
        meta = self._meta(name, rev)
        return {**meta, "name": name, "rev": rev, "tags": self._tags_at(name, rev),
                "latest": rev == self._latest(name), "rules": self.rules_text(name, rev)}

    def diff(self, name: str, a: str, b: str) -> dict[str, Any]:
        rev_a, rev_b = self.resolve(name, a), self.resolve(name, b)
        result = stats.diff(self._read_exact(name, rev_a), self._read_exact(name, rev_b))
        return {"name": name, "a": rev_a, "b": rev_b, **result}

    def read(self, name: str, rev: str) -> pd.DataFrame:
        """The dataset at ``rev`` (a commit id, a tag, ``latest``), fetched from the remote if not cached."""
        validate_dataset_name(name)
        validate_ref(rev)
        if not self.exists():
            raise NotFound(f"no data repository at {self.path}; add a dataset first")
        return self._read_exact(name, self.resolve(name, rev))

    def _read_exact(self, name: str, sha: str) -> pd.DataFrame:
        import dvc.api
        from dvc.exceptions import DvcException

        if not FULL_SHA.match(sha):
            raise InvalidInput(f"{sha!r} is not a full commit id")
        frames, md5 = FrameCache(self.path), self._content_md5(name, sha)
        kept = frames.get(md5)
        if kept is not None:
            return kept
        try:
            with _lock:
                raw = dvc.api.read(
                    self._data_path(name), repo=str(self.path), rev=sha, mode="rb",
                    remote_config=self.remote_config(),
                )
        except (DvcException, FileNotFoundError) as exc:
            raise NotFound(f"dataset {name!r} does not exist at revision {sha[:12]}: {exc}") from exc
        except Exception as exc:  # scmrepo and the filesystems raise their own errors
            raise Unavailable(f"dataset {name!r} at revision {sha[:12]} cannot be read: {exc}") from exc
        frame = pd.read_csv(io.BytesIO(raw))
        frames.keep(md5 or hashlib.md5(raw, usedforsecurity=False).hexdigest(), frame)
        return frame

    def _content_md5(self, name: str, sha: str) -> str | None:
        """The md5 of the version's CSV bytes, as its metadata records it (None for a version without)."""
        try:
            md5 = json.loads(self._git_ok("show", f"{sha}:meta/{name}.json") or "{}").get("md5")
        except (ValueError, AttributeError):
            return None
        return md5 if isinstance(md5, str) else None


def lists_as_json(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with list cells (a Parquet list column: sequences) as their JSON text, which CSV keeps
    exactly and the trainer reads back (data.sequence); a frame without any is returned as it is."""
    listed = [c for c in frame.columns if frame[c].dtype == object and _is_list(_first_value(frame[c]))]
    if not listed:
        return frame
    return frame.assign(**{str(c): frame[c].map(lambda v: json.dumps(_plain(v)) if _is_list(v) else v)
                           for c in listed})


def _first_value(column: pd.Series) -> Any:
    """The column's first non-null cell (a list column's cells are all lists), None when all are null."""
    first = column.first_valid_index()
    return None if first is None else column.loc[first]


def _is_list(value: Any) -> bool:
    import numpy as np

    return isinstance(value, list | tuple | np.ndarray)


def _plain(value: Any) -> Any:
    """Nested lists, tuples and numpy arrays of numbers as plain lists of Python numbers."""
    import numpy as np

    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value
