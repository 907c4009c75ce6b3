"""Print the requirements the images install, one a line: pyproject.toml's dependencies and its `tf`
extra, plus the `dev` entries that the shipped code imports at run time.

The Dockerfiles install these with requirements.lock as constraints (the lock's exact versions, as
`make install`), leaving the other dev tools out. tests/infra/test_docker.py checks that they cover
every module the code imports. Standard library only: it runs before anything is installed.

    python docker/requirements.py [pyproject.toml]
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("tf",)
# Listed under `dev` in pyproject.toml but imported by the services: serving's Open Inference Protocol
# over gRPC (services/serving/api/grpc.py) uses tritonclient's generated stubs.
FROM_DEV = ("tritonclient",)


def requirement_name(requirement: str) -> str:
    """``tritonclient[http]==2.73.0`` -> ``tritonclient``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower()


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    names = {requirement_name(r) for r in wanted}
    dev = project["optional-dependencies"]["dev"]
    wanted += [r for r in dev if requirement_name(r) in FROM_DEV and requirement_name(r) not in names]
    return wanted


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
