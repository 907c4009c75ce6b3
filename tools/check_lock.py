#!/usr/bin/env python3
"""Fail when pyproject.toml and requirements.lock disagree.

    python3 tools/check_lock.py          # CI runs it before make test; no network, no venv needed

Checks, each failure naming the package:
- every line of the lock is one exact pin `name==version`, each package once;
- every requirement of pyproject.toml (dependencies and the extras that make install installs) is an
  exact `==` pin, its package is in the lock, and the lock's version satisfies it (`torch==2.13.0` is
  satisfied by the lock's `torch==2.13.0+cpu`: PEP 440 ignores a local version the pin doesn't name).

That the lock is complete (every transitive dependency pinned) is what `pip check` proves after
`make install`, and what tests/test_lock.py checks against the installed venv.
The fix for a failure: edit pyproject.toml, run `make lock`, `make test`, commit both (CONTRIBUTING.md).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare Python: pip carries its own copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
# The extras that make install installs (and tools/lock.py resolves).
EXTRAS = ("dev", "tf")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def read_lock(path: Path = LOCK) -> tuple[dict[str, Version], list[str]]:
    """The lock's pins by canonical name, and what is wrong with its lines."""
    pins: dict[str, Version] = {}
    errors: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if not match:
            errors.append(f"{path.name}:{number}: {line!r} is not an exact pin name==version")
            continue
        name = canonicalize_name(match.group(1))
        try:
            version = Version(match.group(2))
        except InvalidVersion:
            errors.append(f"{path.name}:{number}: {line!r}: not a valid version")
            continue
        if name in pins:
            errors.append(f"{path.name}:{number}: {name} is pinned twice")
        pins[name] = version
    return pins, errors


def project_requirements(path: Path = PYPROJECT) -> list[str]:
    """pyproject.toml's dependencies and the extras that make install installs."""
    project = tomllib.loads(path.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def check(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> list[str]:
    """Every disagreement between pyproject.toml and the lock, one line each; empty when they agree."""
    pins, errors = read_lock(lock)
    for text in project_requirements(pyproject):
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            errors.append(f"pyproject.toml: {text!r}: {exc}")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            errors.append(
                f"pyproject.toml: {text!r}: {req.name} is not pinned exactly; "
                f"pin it (==) to the lock's version"
                + (f" {pins[name]}" if name in pins else "")
            )
        if name not in pins:
            errors.append(f"{lock.name}: {req.name} (pyproject.toml: {text!r}) is missing; run make lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            errors.append(
                f"{lock.name}: {req.name}=={pins[name]} does not satisfy pyproject.toml's {text!r}; "
                f"run make lock"
            )
    return errors


def main() -> int:
    errors = check()
    if errors:
        print("pyproject.toml and requirements.lock disagree:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        print("Fix: edit pyproject.toml, run `make lock`, `make test`, commit both (CONTRIBUTING.md).",
              file=sys.stderr)
        return 1
    pins, _ = read_lock()
    print(f"tools/check_lock.py: requirements.lock ({len(pins)} pins) agrees with pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
