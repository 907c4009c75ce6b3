"""The local stack's supervisor: ``shipyard up`` leaves it running beside the components it started.

Every second it reads the stack's records (``<state_dir>/run/*.json``); a component whose process died
is started again from its record after a backoff (1 s, then twice the last, at most
``SHIPYARD_SUPERVISOR_MAX_BACKOFF_S``; back to 1 s once it has stayed up a minute), as supervisord's
``autorestart`` or a systemd ``Restart=on-failure`` would. Each death and restart is a line in
``logs/supervisor.log``, and the record counts the restarts and says how the last process ended, which
``shipyard status`` shows. ``shipyard down`` stops the supervisor first, so that it starts nothing again
while the stack stops; ``up``, ``restart`` and the supervisor take a component's lock to start it, so
that no two of them start it twice.

Run as ``python -m shipyard_cli.supervisor`` with the stack's environment (the settings it was started
with); it stops on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from shipyard_cli.processes import ProcessRecord, stop_leftovers
from shipyard_cli.stack import SUPERVISOR, Stack
from shipyard_common.settings import PlatformSettings

log = logging.getLogger("shipyard.supervisor")

FIRST_BACKOFF_S = 1.0
# A component that stayed up this long before dying gets its first backoff again.
STABLE_AFTER_S = 60.0


@dataclass
class Crashes:
    """One component's run of deaths: how many in a row, and when its next start is due."""

    count: int = 0
    due: float = 0.0
    exit: str = ""


@dataclass
class Supervisor:
    """Starts again the components of ``stack`` whose processes died; :meth:`tick` is one look."""

    stack: Stack
    max_backoff_s: float = 30.0
    crashes: dict[str, Crashes] = field(default_factory=dict)

    def backoff(self, count: int) -> float:
        """The wait before the ``count``-th start in a row (1 s, 2 s, 4 s … up to the cap)."""
        return float(min(self.max_backoff_s, FIRST_BACKOFF_S * 2 ** (count - 1)))

    def tick(self) -> list[str]:
        """Look at every component once: note the new deaths, start those whose wait is over; return
        the names started again."""
        restarted = []
        now = time.monotonic()
        for record in self.stack.records():
            if record.name == SUPERVISOR:
                continue
            if record.alive():
                if time.time() - record.started_at >= STABLE_AFTER_S:
                    self.crashes.pop(record.name, None)
                continue
            crashes = self.crashes.get(record.name)
            if crashes is None or not crashes.due:
                self._noticed(record, now)
            elif now >= self.crashes[record.name].due and self._start_again(record.name):
                restarted.append(record.name)
        return restarted

    def _noticed(self, record: ProcessRecord, now: float) -> None:
        """Record a death just seen (unless ``restart`` or ``up`` is replacing the process): when the
        component starts again, in its record and the log."""
        with self.stack.lock(record.name):
            current = self.stack.record(record.name)
            if current is None or current.pid != record.pid:
                return  # stopped by down, or replaced meanwhile
            crashes = self.crashes.setdefault(record.name, Crashes())
            if time.time() - record.started_at >= STABLE_AFTER_S:
                crashes.count = 0
            crashes.count += 1
            wait = self.backoff(crashes.count)
            crashes.due, crashes.exit = now + wait, self.stack.exit_of(record)
            log.warning("%s (pid %d) died: %s; starting it again in %.0f s (restart %d)",
                        record.name, record.pid, crashes.exit, wait, record.restarts + 1)
            current.note = f"died ({crashes.exit}); starting again in {wait:.0f} s"
            self.stack.write_record(current)

    def _start_again(self, name: str) -> bool:
        """Start component ``name`` from its record unless someone else did meanwhile (``up``,
        ``restart``); whether this call started it."""
        crashes = self.crashes[name]
        crashes.due = 0.0  # the next death, if any, is noticed afresh
        with self.stack.lock(name):
            record = self.stack.record(name)
            if record is None or record.alive():
                return False  # stopped by down, or started again by someone else
            stop_leftovers(record.pid)
            try:
                started = self.stack.start_component(
                    record.component(), restarts=record.restarts + 1, last_exit=crashes.exit
                )
            except Exception as exc:  # its port still taken, say: try again after the next backoff
                log.warning("could not start %s again: %s", name, exc)
                return False
        log.warning("started %s again as pid %d (restart %d; the last one %s)",
                    name, started.pid, started.restarts, crashes.exit)
        return True


def run(stack: Stack, stop: threading.Event, *, interval_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
    """Supervise ``stack`` every ``interval_s`` until ``stop`` is set."""
    supervisor = Supervisor(stack, max_backoff_s=max_backoff_s)
    log.info("supervising the stack in %s", stack.state_dir)
    while not stop.wait(interval_s):
        try:
            supervisor.tick()
        except Exception:  # a bad record or a full disk must not end the supervision for good
            log.exception("supervising the stack failed; trying again")


def main() -> None:
    """``python -m shipyard_cli.supervisor``: the stack of the environment's settings until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    interval = float(os.environ.get("SHIPYARD_SUPERVISOR_INTERVAL_S", "1"))
    max_backoff = float(os.environ.get("SHIPYARD_SUPERVISOR_MAX_BACKOFF_S", "30"))
    run(Stack(PlatformSettings()), stop, interval_s=interval, max_backoff_s=max_backoff)
    log.info("supervisor stopped")


if __name__ == "__main__":
    main()
