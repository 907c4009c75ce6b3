"""The import contracts of pyproject.toml ([tool.importlinter]) hold: services never import each other,
the trainer's layers, no import cycles. ``make lint`` and pre-commit run the same ``lint-imports``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The venv's own executable, next to its python: no PATH lookup, no other install.
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_the_import_contracts_hold() -> None:
    assert LINT_IMPORTS.exists(), f"no {LINT_IMPORTS}: import-linter is in the dev extra (make install)"
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
