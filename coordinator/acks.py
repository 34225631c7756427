"""The acks the next group commit sends: per agent, the highest seq accepted since the last commit.

Coalesced (one ack per agent per commit, however many of its updates the commit holds) and taken
only by a commit that made them durable (coordinator/session.py, tier/worker.py); protocol/acks.py
says what an ack is and why. With an `interval` (the coordinator's --ack-interval) an agent acked
less than that long ago waits: its newest seq goes with the first commit after the interval (the
session commits at least every second), so a device that sends several updates a second gets about
one ack a second, and one that sends less often still gets each update acked at its commit.
"""

from __future__ import annotations

import time

ACK_INTERVAL_S = 1.0  # the coordinator's --ack-interval: well inside an agent's --unheard-after (120 s)


class PendingAcks:
    """agent -> highest accepted seq not yet acknowledged."""

    def __init__(self, interval: float = 0.0) -> None:
        self.pending: dict[str, int] = {}
        self.interval = interval  # seconds between two acks of one agent at least (0: every commit)
        self._sent_at: dict[str, float] = {}  # agent -> monotonic time of its last ack taken

    def note(self, agent: str, seq: int) -> None:
        """An update of `agent` at `seq` was accepted."""
        if seq > self.pending.get(agent, -1):
            self.pending[agent] = seq

    def take(self, now: float | None = None) -> dict[str, int]:
        """What the commit being made acknowledges: every pending agent not acked within `interval`
        (they leave the pending set; the others wait for a later commit)."""
        if not self.interval:
            taken, self.pending = self.pending, {}
            return taken
        now = time.monotonic() if now is None else now
        taken = {a: s for a, s in self.pending.items() if now - self._sent_at.get(a, -1e18) >= self.interval}
        for agent in taken:
            del self.pending[agent]
            self._sent_at[agent] = now
        if len(self._sent_at) > 4 * max(len(self.pending), 1024):  # bounded: agents gone for long are forgotten
            self._sent_at = {a: t for a, t in self._sent_at.items() if now - t < self.interval or a in self.pending}
        return taken

    def put_back(self, taken: dict[str, int]) -> None:
        """A commit failed: its acks wait for the next one (merged with what came meanwhile)."""
        for agent, seq in taken.items():
            self.note(agent, seq)
            self._sent_at.pop(agent, None)
