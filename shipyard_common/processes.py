"""Local processes: a free TCP port to start a server on, and stopping a process group.

The CLI's stack and the tests start servers on free ports, each in its own process group
(``start_new_session=True``), and stop them with :func:`stop_process_group`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group ``pid`` leads (a process started with ``start_new_session=True``),
    then SIGKILL what is still there after ``timeout`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):  # reap our own child: no zombie lingers
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
