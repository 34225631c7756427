"""The acks the next group commit sends: per agent, the highest seq accepted since the last commit.

Coalesced (one ack per agent per commit, however many of its updates the commit holds) and taken
only by a commit that made them durable (coordinator/session.py, tier/worker.py); protocol/acks.py
says what an ack is and why.
"""

from __future__ import annotations


class PendingAcks:
    """agent -> highest accepted seq not yet acknowledged."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}

    def note(self, agent: str, seq: int) -> None:
        """An update of `agent` at `seq` was accepted."""
        if seq > self.pending.get(agent, -1):
            self.pending[agent] = seq

    def take(self) -> dict[str, int]:
        """What the commit being made acknowledges; empties the pending set."""
        taken, self.pending = self.pending, {}
        return taken

    def put_back(self, taken: dict[str, int]) -> None:
        """A commit failed: its acks wait for the next one (merged with what came meanwhile)."""
        for agent, seq in taken.items():
            self.note(agent, seq)
