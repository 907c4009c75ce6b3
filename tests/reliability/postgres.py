"""A PostgreSQL server of a test's own, which it stops and starts again: never the machine's.

The machine's PostgreSQL serves every other test (and maybe a developer's stack), so a restart is
played on a private cluster: ``initdb`` into a fresh folder, ``pg_ctl`` on a free port with its socket
in that folder. PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres``
user and its commands run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import free_port

SERVER_USER = "postgres"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb`` and ``pg_ctl``, else PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def why_unavailable() -> str | None:
    """Why a private cluster cannot be made here (to skip saying so), or None."""
    if postgres_bin() is None:
        return "no initdb/pg_ctl (/usr/lib/postgresql/*/bin or PATH): install the postgresql package"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and no {SERVER_USER!r} user to run PostgreSQL as (it refuses root)"
        if shutil.which("runuser") is None:
            return "running as root and no runuser to run PostgreSQL as another user"
    return None


class PrivatePostgres:
    """A throw-away cluster on 127.0.0.1:<free port> with trust auth and a database ``shipyard``."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        assert binaries is not None, why_unavailable()
        self.bin = binaries
        self.port = free_port()
        # Under /tmp, not pytest's tmp_path: the postgres user must be able to reach it.
        self.home = Path(tempfile.mkdtemp(prefix="shipyard-pg-"))
        self.data = self.home / "data"
        self.log = self.home / "server.log"
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.home, account.pw_uid, account.pw_gid)
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/shipyard"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.home)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def init(self) -> None:
        """Make the cluster, start it and create the database ``shipyard``."""
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "shipyard")

    def start(self) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w``)."""
        options = f"-p {self.port} -h 127.0.0.1 -k {self.home} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: every session is ended, as an operator's restart does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        """Stop it (immediately) if it runs, and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)
