"""requirements.lock against pyproject.toml and against the venv that make install built from it.

No network, no servers: the lock, pyproject.toml and the installed distributions' metadata.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_lock", ROOT / "tools" / "check_lock.py")
assert _spec and _spec.loader
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)

# Installer tooling the lock pins too, though nothing of shipyard's may need it.
TOOLING = {"pip", "setuptools", "wheel"}


def test_pyproject_and_lock_agree() -> None:
    assert check_lock.check() == []


def _write(tmp_path: Path, deps: list[str], lock: list[str]) -> tuple[Path, Path]:
    pyproject = tmp_path / "pyproject.toml"
    listed = ", ".join(f'"{d}"' for d in deps)
    pyproject.write_text(
        f'[project]\nname = "x"\ndependencies = [{listed}]\n'
        '[project.optional-dependencies]\ndev = ["pytest==8.0.0"]\ntf = []\n'
    )
    lockfile = tmp_path / "requirements.lock"
    lockfile.write_text("# header\n" + "\n".join([*lock, "pytest==8.0.0"]) + "\n")
    return pyproject, lockfile


def test_a_local_version_satisfies_the_plain_pin(tmp_path: Path) -> None:
    pyproject, lockfile = _write(tmp_path, ["torch==2.13.0", "celery[redis]==5.7.0"],
                                 ["torch==2.13.0+cpu", "celery==5.7.0"])
    assert check_lock.check(lockfile, pyproject) == []


@pytest.mark.parametrize(
    ("deps", "lock", "expected"),
    [
        (["mlflow==3.17.2"], ["mlflow==3.17.1"], "mlflow==3.17.1 does not satisfy"),
        (["mlflow==3.17.2"], [], "mlflow (pyproject.toml: 'mlflow==3.17.2') is missing"),
        (["redis"], ["redis==7.0.0"], "redis is not pinned exactly"),
        (["numpy>=2"], ["numpy==2.3.0"], "numpy is not pinned exactly"),
        (["rich==14.0.0"], ["rich>=14"], "'rich>=14' is not an exact pin"),
        (["rich==14.0.0"], ["rich==14.0.0", "Rich==14.0.0"], "rich is pinned twice"),
    ],
)
def test_a_disagreement_names_the_package(
    tmp_path: Path, deps: list[str], lock: list[str], expected: str
) -> None:
    pyproject, lockfile = _write(tmp_path, deps, lock)
    errors = check_lock.check(lockfile, pyproject)
    assert any(expected in e for e in errors), errors


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions these requirements pull in, extras followed."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    todo = [r for r in map(Requirement, requirements) if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            try:
                dist = next(metadata.distributions(name=req.name, path=_site_packages()))
            except StopIteration:
                raise AssertionError(f"{req.name} is required but not installed; run make install") from None
            for text in dist.requires or []:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return names


def _installed() -> list[metadata.Distribution]:
    """The venv's own distributions: once setuptools is imported, the copies it vendors (an older
    ``wheel``, ``zipp`` …) are on ``sys.path`` too, and they are not what pip installed."""
    return list(metadata.distributions(path=_site_packages()))


def _site_packages() -> list[str]:
    return sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in make install's venv")
def test_the_venv_is_the_lock_and_the_lock_is_complete() -> None:
    pins, errors = check_lock.read_lock()
    assert errors == []
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in _installed()}
    differ = {n: (str(v), str(installed.get(n))) for n, v in pins.items() if installed.get(n) != v}
    assert differ == {}, f"the venv is not requirements.lock (lock, venv); run make install: {differ}"
    needed = _closure(check_lock.project_requirements())
    missing = sorted(needed - set(pins))
    assert missing == [], f"requirements.lock lacks transitive dependencies {missing}; run make lock"
    unused = sorted(set(pins) - needed - TOOLING)
    assert unused == [], f"requirements.lock pins packages nothing requires {unused}; run make lock"
