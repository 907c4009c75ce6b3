"""Datasets in a real DVC repository: a local-folder remote, and S3 on a moto server over HTTP."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import SecretStr
from sklearn.datasets import load_iris

from shipyard_common.datasets import DataRepo, DatasetNotFound, S3Remote
from shipyard_common.errors import Conflict, InvalidInput, NotFound, ValidationFailed

RULES = """
max_null_fraction: 0.05
rows: {min: 20}
columns:
  sepal length (cm): {min: 0, max: 20}
label: {column: target, classes: [0, 1, 2], min_share: 0.1, max_share: 0.8}
"""


@pytest.fixture
def repo(tmp_path: Path) -> DataRepo:
    return DataRepo(tmp_path / "data", tmp_path / "remote")


@pytest.fixture
def s3_repo(tmp_path: Path, moto_endpoint: str) -> DataRepo:
    s3 = S3Remote(bucket="shipyard-datasets", prefix=f"t-{tmp_path.name}", endpoint_url=moto_endpoint,
                  access_key_id="test-key", secret_access_key=SecretStr("test-secret"), region="us-east-1")
    return DataRepo(tmp_path / "data", tmp_path / "unused", s3=s3)


def iris() -> pd.DataFrame:
    return load_iris(as_frame=True).frame


def state_of(repo: DataRepo) -> tuple[str, str, str, list[Path]]:
    """HEAD, tags, working tree status and the remote's files: what a refusal must leave alone."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo.path, capture_output=True, text=True).stdout

    remote = sorted(p for p in repo.remote.rglob("*") if p.is_file()) if repo.remote.exists() else []
    return git("rev-parse", "HEAD"), git("tag"), git("status", "--porcelain", "--ignored"), remote


def add_change_and_read_back(repo: DataRepo) -> None:
    frame = iris()
    first = repo.add("iris", frame, tag="v1")
    second = repo.add("iris", frame.head(120))
    assert first.rev != second.rev and first.rows == 150 and second.rows == 120
    assert first.tags == ["v1"] and len(first.rev) == 40
    # Without the local cache the data must come from the remote.
    shutil.rmtree(repo.path / ".dvc" / "cache")
    assert repo.read("iris", first.rev).shape == (150, 5)
    assert repo.read("iris", "v1").equals(repo.read("iris", first.rev[:8]))
    assert repo.read("iris", "latest").equals(frame.head(120).reset_index(drop=True))
    unchanged = repo.add("iris", frame.head(120))
    assert unchanged.rev == second.rev and not unchanged.created
    # Any machine that reaches the remote: a fresh clone of the repository, no cache at all.
    clone = repo.path.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(clone)], check=True)
    elsewhere = DataRepo(clone, repo.remote, s3=repo.s3)
    assert elsewhere.read("iris", first.rev).shape == (150, 5)
    assert [v["rev"] for v in repo.versions("iris")] == [second.rev, first.rev]


def test_versions_read_back_from_the_remote(repo):
    add_change_and_read_back(repo)


def test_versions_read_back_from_an_s3_remote(s3_repo):
    add_change_and_read_back(s3_repo)
    config = (s3_repo.path / ".dvc" / "config").read_text()
    assert "s3://shipyard-datasets/" in config and "test-secret" not in config
    tracked = subprocess.run(["git", "grep", "-I", "test-secret", "HEAD"], cwd=s3_repo.path,
                             capture_output=True, text=True)
    assert tracked.stdout == ""  # the secret lives in the ignored config.local only


def test_a_version_from_before_metadata_was_kept_is_read_and_followed(repo):
    """A repository an older release wrote holds no meta/<name>.json: adding the next version reads
    the older data itself (under the write lock, which that read takes again)."""
    first = repo.add("iris", iris())

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo.path, check=True, capture_output=True)

    git("rm", "-q", "meta/iris.json")
    pointer = repo.path / "data" / "iris.csv.dvc"  # the version's commit must be one without metadata
    pointer.write_text(pointer.read_text() + "# written by an older release\n")
    git("commit", "-q", "-am", "as an older release left it")
    second = repo.add("iris", iris().head(120))
    assert second.created and second.rows == 120 and second.rev != first.rev
    assert repo.read("iris", second.rev).shape == (120, 5)


def test_revisions_resolve_by_short_sha_tag_and_latest(repo):
    first = repo.add("iris", iris(), tag="baseline")
    second = repo.add("iris", iris().head(100))
    assert repo.resolve("iris", first.rev[:7]) == first.rev
    assert repo.resolve("iris", "baseline") == first.rev
    assert repo.resolve("iris", "latest") == second.rev
    with pytest.raises(DatasetNotFound, match="'wine' does not exist") as missing:
        repo.resolve("wine", "latest")
    assert missing.value.field == "dataset"
    with pytest.raises(DatasetNotFound, match="no revision 'nope'") as unknown:
        repo.resolve("iris", "nope")
    assert unknown.value.field == "rev"
    with pytest.raises(DatasetNotFound):
        repo.resolve("iris", "0" * 40)
    with pytest.raises(Conflict, match="already names"):
        repo.add("iris", iris().head(90), tag="baseline")


def test_show_and_diff(repo):
    frame = iris()
    first = repo.add("iris", frame)
    shifted = frame.assign(**{"sepal length (cm)": frame["sepal length (cm)"] + 2.0})
    second = repo.add("iris", shifted.head(140))
    info = repo.info("iris", first.rev[:10])
    assert info["rev"] == first.rev and info["rows"] == 150 and info["md5"] == first.md5
    assert info["schema"]["target"] == "int64" and info["stats"]["sepal length (cm)"]["min"] == 4.3
    report = repo.diff("iris", first.rev, "latest")
    assert report["b"] == second.rev and report["rows"] == {"a": 150, "b": 140, "delta": -10}
    assert report["columns"]["sepal length (cm)"]["shift"] > 0.5
    assert report["columns"]["petal width (cm)"]["shift"] < 0.1


def refused(repo: DataRepo, frame: pd.DataFrame) -> ValidationFailed:
    before = state_of(repo)
    with pytest.raises(ValidationFailed) as caught:
        repo.add("iris", frame)
    assert state_of(repo) == before  # no commit, no tag, no file, no pushed blob
    repo.ensure()  # and no lock held
    return caught.value


def rules_failed(error: ValidationFailed) -> set[str]:
    return {failure["rule"] for failure in error.details["failures"]}


def test_a_changed_schema_is_refused(repo):
    repo.add("iris", iris())
    error = refused(repo, iris().drop(columns=["petal width (cm)"]).assign(extra="x"))
    assert rules_failed(error) == {"schema"} and "schema" in error.message
    assert error.details["failures"][0]["figures"]["removed"] == ["petal width (cm)"]
    changed = refused(repo, iris().assign(target=iris()["target"].astype(float) + 0.5))
    figures = changed.details["failures"][0]["figures"]
    assert figures["changed"] == {"target": {"was": "int64", "now": "float64"}}


def test_nulls_over_the_limit_are_refused_with_their_figures(repo):
    repo.set_rules("iris", RULES)
    repo.add("iris", iris())
    frame = iris()
    frame.loc[frame.index[:30], "sepal width (cm)"] = np.nan
    error = refused(repo, frame)
    [failure] = error.details["failures"]
    assert failure["rule"] == "nulls" and failure["column"] == "sepal width (cm)"
    assert failure["figures"]["nulls"] == 30 and failure["figures"]["limit"] == 0.05
    assert "20.0% null" in error.message


def test_a_missing_class_is_refused_also_for_a_first_version(repo):
    repo.set_rules("iris", RULES)
    error = refused(repo, iris()[iris()["target"] != 2])
    assert "label_classes" in rules_failed(error) and "[2]" in error.message
    assert repo.names() == []


def test_other_rules_name_their_figures(repo):
    rules = RULES + "duplicates: {max: 0}\n"
    rules = rules.replace("max: 20}", "max: 7}").replace("rows: {min: 20}", "rows: {min: 200}")
    repo.set_rules("iris", rules)
    error = refused(repo, iris())
    assert rules_failed(error) == {"duplicates", "range", "rows"}
    figures = {f["rule"]: f["figures"] for f in error.details["failures"]}
    assert figures["range"]["outside"] == 12 and figures["rows"]["rows"] == 150
    with pytest.raises(InvalidInput, match="not a valid rules file"):
        repo.set_rules("iris", "rows: {minimum: 3}")


def test_bad_names_and_revisions_are_refused(repo):
    frame = iris()
    with pytest.raises(InvalidInput, match="not allowed"):
        repo.add("../etc/passwd", frame)
    with pytest.raises(InvalidInput, match="not a git commit"):
        repo.read("iris", "HEAD; rm -rf /")
    with pytest.raises(InvalidInput, match="tag"):
        repo.add("iris", frame, tag="latest")
    version = repo.add("iris", frame)
    with pytest.raises(NotFound):
        repo.read("iris", "0" * 40)
    with pytest.raises(NotFound):
        repo.read("wine", version.rev)
