"""A replaced or removed version is closed only once the requests running on it are done: every
request holds its version's :class:`Lease` while it runs, and :func:`retire` waits for the
holders to let go (a request that picks a version just as it is retired is answered by the
version now in its place).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.serving.runtimes.base import Runtime

log = logging.getLogger("shipyard.serving.routing")

# A retired version stays open this long for requests that chose it just before the swap and
# have not started running yet; after that, it waits only for the requests holding it.
RETIRE_GRACE_S = 1.0
# A request stuck this long on a retired version (a hung TF Serving call) no longer keeps it open.
RETIRE_DRAIN_TIMEOUT_S = 600.0


# -- leases: close a version only when its requests are done ------------------------------------


class Lease:
    """Counts the requests running on one loaded version; once retired, it takes no new ones."""

    def __init__(self) -> None:
        # acquire/release take the bare lock (a C-level context manager, every request twice);
        # only retire() waits on the condition, and only a retired lease is notified.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._holders = 0
        self._retired = False

    @property
    def holders(self) -> int:
        return self._holders

    def acquire(self) -> bool:
        """Hold the version for one request; False once it is retired (use its successor)."""
        with self._lock:
            if self._retired:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._retired and self._holders <= 0:
                self._cond.notify_all()

    def retire(self, timeout: float) -> bool:
        """Take no new holders and wait until the current ones are done; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retired = True
            while self._holders > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def retire_runtime(
    runtime: Runtime, lease: Lease | None, *, grace_s: float = RETIRE_GRACE_S,
    drain_timeout_s: float = RETIRE_DRAIN_TIMEOUT_S,
) -> None:
    """Close ``runtime`` in the background once the requests running on it are done."""

    def close() -> None:
        if lease is not None and grace_s > 0:
            time.sleep(grace_s)
        if lease is not None and not lease.retire(drain_timeout_s):
            log.warning("closing a replaced %s runtime with %d requests still on it after %ss",
                        runtime.format, lease.holders, drain_timeout_s)
        try:
            runtime.close()
        except Exception as exc:  # closing is best effort; the process keeps serving
            log.warning("closing a replaced %s runtime failed: %s", runtime.format, exc)

    threading.Thread(target=close, name="retire-runtime", daemon=True).start()
