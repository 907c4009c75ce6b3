"""Print the requirements the images install, one a line: pyproject.toml's dependencies and its `tf`
extra (no `dev` tool: what the shipped code imports is a dependency).

The Dockerfiles install these with requirements.lock as constraints (the lock's exact versions, as
`make install`), leaving the other dev tools out. tests/infra/test_docker.py checks that they cover
every module the code imports. Standard library only: it runs before anything is installed.

    python docker/requirements.py [pyproject.toml]
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

EXTRAS = ("tf",)


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    return wanted


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
