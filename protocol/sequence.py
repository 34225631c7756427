"""Update sequence numbers: a run (agent start) in the high bits, a count in the low bits.

An agent starts each run at the next multiple of 2**RUN_BITS microseconds of its clock and
adds one per update, so seq stays a time in microseconds (increasing across restarts with
no state file on the device) while the coordinator can tell an agent's restart (a new run)
from an update that never arrived (a hole inside one run). Pure functions, shared by both sides.
"""

from __future__ import annotations

RUN_BITS = 20  # 2**20 us ~ 1.05 s: two starts of one agent within that would share a run
_INDEX_MASK = (1 << RUN_BITS) - 1


def first_seq(now_us: int) -> int:
    """The seq before an agent's first update of a run that starts at `now_us` (index 0)."""
    return ((now_us >> RUN_BITS) + 1) << RUN_BITS


def missing_between(last: int, seq: int) -> int:
    """Updates made between an accepted `last` and a newer `seq` of the same agent that never
    arrived: the hole within one run, or the new run's earlier updates after a restart (the
    old run's tail, if lost, cannot be seen)."""
    if seq >> RUN_BITS == last >> RUN_BITS:
        return max(0, seq - last - 1)
    return max(0, (seq & _INDEX_MASK) - 1)
