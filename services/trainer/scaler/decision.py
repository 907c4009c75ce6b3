"""The scaling decision: plain numbers in, a replica count and its reason out; no I/O, no clock.

Rules, in order:

- **Up at once**: the workers that queued + running jobs need (``jobs_per_replica`` jobs each), at
  least ``minimum`` and at most ``maximum``; a job waiting is never held back by the cooldown.
- **Never below running**: a scale down stops at the workers the running jobs occupy, even above
  ``maximum`` (removing a busy worker would stop a job that is training).
- **Down only after the cooldown**: fewer workers only once the current ones have not all been needed
  for ``cooldown_s`` seconds, so that a job submitted right after another ends finds a warm worker.
- **Zero when idle**: nothing queued or running, ``minimum`` 0 and the cooldown over: no worker
  (no GPU held for nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True)
class Decision:
    """``replicas`` to set (the current count when ``action`` is hold), why, and ``needed``: the
    fewest workers the jobs allow now, the cooldown aside (the controller's idle clock restarts
    whenever ``needed`` reaches the replicas)."""

    replicas: int
    action: Action
    reason: str
    needed: int


def _ceil_div(jobs: int, per_replica: int) -> int:
    return -(-jobs // per_replica)


def _check(**numbers: float) -> None:
    negative = [name for name, value in numbers.items() if value < 0]
    if negative:
        raise ValueError(f"decide() takes no negative numbers; got {', '.join(negative)} below 0")


def decide(
    *,
    queued: int,
    running: int,
    current: int,
    minimum: int,
    maximum: int,
    seconds_since_needed: float,
    cooldown_s: float,
    jobs_per_replica: int = 1,
) -> Decision:
    """The replicas for ``queued`` and ``running`` jobs given ``current`` workers.

    ``seconds_since_needed``: how long since the replica count last changed or was last all needed
    (queued + running filling every worker); a scale down waits until it reaches ``cooldown_s``.
    """
    _check(queued=queued, running=running, current=current, minimum=minimum,
           seconds_since_needed=seconds_since_needed, cooldown_s=cooldown_s)
    if minimum > maximum or jobs_per_replica < 1:
        raise ValueError(f"need 0 <= minimum <= maximum and jobs_per_replica >= 1; got minimum={minimum}, "
                         f"maximum={maximum}, jobs_per_replica={jobs_per_replica}")
    jobs = f"{queued} queued + {running} running"
    demand = _ceil_div(queued + running, jobs_per_replica)
    wanted = min(max(demand, minimum), maximum)
    busy = _ceil_div(running, jobs_per_replica)
    needed = max(wanted, busy)
    if wanted > current:
        capped = f", capped at the maximum {maximum}" if demand > maximum else ""
        return Decision(wanted, Action.UP, f"scale up from {current} to {wanted}: {jobs}{capped}", needed)
    if needed >= current:
        capped = f", the maximum is {maximum}" if demand > current else ""
        return Decision(current, Action.HOLD, f"hold at {current}: {jobs}{capped}", needed)
    if seconds_since_needed < cooldown_s:
        left = cooldown_s - seconds_since_needed
        return Decision(current, Action.HOLD,
                        f"hold at {current}: {jobs} need {needed}, cooldown {left:.0f} s left", needed)
    if needed == 0:
        reason = f"scale to zero from {current}: nothing queued or running, cooldown {cooldown_s:.0f} s over"
    else:
        reason = f"scale down from {current} to {needed}: {jobs}, cooldown {cooldown_s:.0f} s over"
    return Decision(needed, Action.DOWN, reason, needed)
