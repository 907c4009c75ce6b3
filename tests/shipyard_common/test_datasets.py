"""Datasets in a real DVC repository with a local-folder remote."""

import shutil

import pytest
from sklearn.datasets import load_iris

from shipyard_common.datasets import DataRepo
from shipyard_common.errors import InvalidInput, NotFound


@pytest.fixture
def repo(tmp_path):
    return DataRepo(tmp_path / "data", tmp_path / "remote")


def test_versions_read_back_from_the_remote(repo):
    frame = load_iris(as_frame=True).frame
    first = repo.add("iris", frame)
    second = repo.add("iris", frame.head(50))
    assert first.rev != second.rev and first.rows == 150 and second.rows == 50
    # Without the local cache the data must come from the DVC remote.
    shutil.rmtree(repo.path / ".dvc" / "cache")
    assert repo.read("iris", first.rev).shape == (150, 5)
    assert repo.read("iris", second.rev).equals(frame.head(50).reset_index(drop=True))
    assert repo.add("iris", frame.head(50)).rev == second.rev  # unchanged data, same revision


def test_bad_names_and_revisions_are_refused(repo):
    frame = load_iris(as_frame=True).frame
    with pytest.raises(InvalidInput, match="not allowed"):
        repo.add("../etc/passwd", frame)
    with pytest.raises(InvalidInput, match="not a git commit"):
        repo.read("iris", "HEAD; rm -rf /")
    version = repo.add("iris", frame)
    with pytest.raises(NotFound):
        repo.read("iris", "0" * 40)
    with pytest.raises(NotFound):
        repo.read("wine", version.rev)
