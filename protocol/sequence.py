"""Update sequence numbers, and telling an agent's restart from updates that never arrived.

An agent starts each run at its clock in microseconds and adds one per update, so seq
increases across restarts with no state file on the device (a restart takes far longer
than an agent's updates add microseconds). Within a run, consecutive updates differ by
one and a hole of k means k updates never arrived; a restart jumps seq by the time since
the previous run began, at least RESTART_JUMP (65 ms: no process restarts faster, and no
agent loses 65,536 updates in a row unnoticed). Pure functions, shared by both sides.
"""

from __future__ import annotations

import time

RESTART_JUMP = 1 << 16


def first_seq(now_us: int | None = None) -> int:
    """The seq before an agent's first update of a run starting now (or at `now_us`)."""
    return time.time_ns() // 1000 if now_us is None else now_us


def missing_between(last: int, seq: int) -> int:
    """Updates made between an accepted `last` and a newer `seq` of one agent that never
    arrived: the hole within one run; 0 across a restart (a lost tail of the old run or
    head of the new one cannot be seen)."""
    hole = seq - last - 1
    return hole if 0 <= hole < RESTART_JUMP else 0
