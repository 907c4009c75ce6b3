"""Stopping a test's whole stack (``tests/e2e``, ``tests/pipelines``) at once.

``Stack.down`` stops the components one after the other, each given up to 15 s to exit after its
SIGTERM; each takes its 2 to 6 s (about 26 s for the whole stack on the CI machine). A test stack has
nothing to hand over on its way down, so every component is sent its SIGTERM first and they stop side
by side; ``Stack.down`` then waits for each, SIGKILLs what is left and removes the records, as ever.
"""

from __future__ import annotations

import contextlib
import os
import signal

from shipyard_cli.stack import SUPERVISOR, Stack


def down_at_once(stack: Stack) -> None:
    records = stack.records()
    # A supervisor would start again what stops before it does: then Stack.down's order alone.
    if not any(record.name == SUPERVISOR for record in records):
        for record in records:
            if record.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pid, signal.SIGTERM)
    stack.down()
