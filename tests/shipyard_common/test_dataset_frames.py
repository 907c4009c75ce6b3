"""A dataset version read through the frame cache (shipyard_common/datasets/frames.py) is exactly the frame
``pd.read_csv`` makes of its CSV bytes, as every reader saw it before the cache: a differential test on a
real DVC repository, for the shapes datasets hold (ints, floats at full precision, -0.0, ±inf, nulls,
strings, empty strings, booleans, JSON list columns, numbers too big for int64, dates as text)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shipyard_common.datasets import DataRepo
from shipyard_common.datasets.frames import FrameCache

ROWS = 2_000
TEXTS = ["paris", "lyon", "été", "1", "NA", "a,b", 'say "hi"']  # "NA" reads back as null, "1" as text


def every_shape() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    floats = rng.normal(size=ROWS) * 10.0 ** rng.integers(-8, 8, ROWS)  # 17 significant digits in the CSV
    floats[:4] = [-0.0, np.inf, -np.inf, np.nan]
    holes = rng.random(ROWS) < 0.1
    return pd.DataFrame({
        "int": rng.integers(-10**12, 10**12, ROWS),
        "float": floats,
        "float32": rng.normal(size=ROWS).astype(np.float32),
        "int_with_nulls": pd.Series(rng.integers(0, 100, ROWS), dtype="Int64").where(~holes, None),
        "text": np.where(holes, None, rng.choice(TEXTS, ROWS)),
        "empty_text": rng.choice(["", "x"], ROWS),
        "flag": rng.random(ROWS) > 0.5,
        "flag_with_nulls": np.where(holes, None, rng.random(ROWS) > 0.5),
        "steps": [rng.normal(size=int(rng.integers(1, 5))).round(5).tolist() for _ in range(ROWS)],
        "pairs": [rng.normal(size=(2, 2)).tolist() for _ in range(ROWS)],
        "huge": [str(10**20 + i) if i % 7 else i for i in range(ROWS)],
        "when": pd.date_range("2026-01-01", periods=ROWS, freq="h").astype(str),
        "all_null": [None] * ROWS,
    })


def parsed_as_before(repo: DataRepo, name: str, rev: str) -> pd.DataFrame:
    """The reader before the cache: ``pd.read_csv`` of the version's bytes, fetched through DVC."""
    import dvc.api

    raw = dvc.api.read(f"data/{name}.csv", repo=str(repo.path), rev=rev, mode="rb",
                       remote_config=repo.remote_config())
    return pd.read_csv(io.BytesIO(raw))


def assert_identical(read: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(read, expected, check_exact=True)
    for column in expected.columns:  # what assert_frame_equal lets pass: None for NaN, -0.0 for 0.0
        assert [type(v) for v in read[column]] == [type(v) for v in expected[column]], column
        if expected[column].dtype.kind == "f":
            assert np.array_equal(np.signbit(read[column]), np.signbit(expected[column])), column


@pytest.fixture
def repo(tmp_path: Path) -> DataRepo:
    return DataRepo(tmp_path / "data", tmp_path / "remote")


def test_a_version_read_from_the_cache_is_the_frame_its_csv_parses_to(repo):
    version = repo.add("shapes", every_shape())
    md5 = json.loads((repo.path / "meta" / "shapes.json").read_text())["md5"]
    kept = FrameCache(repo.path).path(md5)
    assert kept.is_file()  # kept when the version was added

    expected = parsed_as_before(repo, "shapes", version.rev)
    assert expected["steps"].dtype == object and expected["huge"].dtype == object  # text, as before
    assert_identical(repo.read("shapes", version.rev), expected)

    kept.unlink()  # an older version: parsed from its CSV, and kept then
    assert_identical(repo.read("shapes", "latest"), expected)
    assert kept.is_file()
    assert_identical(repo.read("shapes", "latest"), expected)


def test_a_broken_cache_file_is_ignored_and_the_csv_parsed(repo):
    version = repo.add("shapes", every_shape().head(50))
    md5 = json.loads((repo.path / "meta" / "shapes.json").read_text())["md5"]
    FrameCache(repo.path).path(md5).write_bytes(b"PAR1 not parquet at all")

    assert_identical(repo.read("shapes", version.rev), parsed_as_before(repo, "shapes", version.rev))


def test_a_frame_parquet_would_change_is_not_kept(tmp_path: Path):
    cache = FrameCache(tmp_path)
    mixed = pd.DataFrame({"a": np.array([1, "1", None], dtype=object)})  # read_csv never makes it

    assert not cache.keep("0" * 32, mixed)
    assert cache.get("0" * 32) is None and not list(cache.folder.glob("*"))
