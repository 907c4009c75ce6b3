"""Retraining policies and the triggers they fire."""

from __future__ import annotations

from services.monitor.context import Monitor


def check_policies(*, monitor: Monitor) -> int:
    """Start a retraining for every model whose policy fires; how many started."""
    return 0


def follow_triggers(*, monitor: Monitor) -> int:
    """Read the state of running retrainings and record how they ended; how many changed."""
    return 0
