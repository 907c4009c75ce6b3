"""``python -m services.serving`` as a real process, for the tests that signal it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings

REPO = Path(__file__).resolve().parents[3]


@contextmanager
def serving_process(
    platform: PlatformSettings, *, port: int, log_path: Path, **settings: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Start serving on ``port`` with ``SHIPYARD_SERVING_<NAME>`` for each of ``settings``;
    killed (its whole process group) on the way out if the test has not stopped it."""
    env = Stack(platform).child_env()
    env.update({"SHIPYARD_SERVING_PORT": str(port), "SHIPYARD_LOG_JSON": "false"})
    env.update({f"SHIPYARD_SERVING_{name.upper()}": value for name, value in settings.items()})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.serving"], env=env, cwd=str(REPO), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
