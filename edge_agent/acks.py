"""Which of this agent's updates the coordinator acknowledged (protocol/acks.py): pure, times given.

MQTT 3.1.1 cannot say that a broker dropped a publish; a coordinator that serves acks can say
which updates it took. An update sent and not acknowledged within the bound makes the agent
`unheard` with a reason naming the last acknowledged seq and how long ago it came.
"""

from __future__ import annotations

from collections import deque

MAX_PENDING = 1024  # sends remembered while unacknowledged; far beyond what one bound holds


class AckWatch:
    """The sends not yet acknowledged (oldest first) and the newest acknowledgement."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.pending: deque[tuple[int, float]] = deque()  # (seq, sent at), seq increasing
        self.max_pending = max_pending
        self.acked_seq: int | None = None
        self.acked_at: float | None = None  # when that ack arrived

    def sent(self, seq: int, now: float) -> None:
        """An update left (the oldest pending keeps its time when the list is full: what matters is how long
        the first unacknowledged one has waited). Recorded even at or below the ack held: a device whose
        clock went back sends seqs the coordinator refuses as replays, and only a newer ack clears them."""
        if len(self.pending) < self.max_pending:
            self.pending.append((seq, now))

    def acked(self, seq: int, now: float) -> bool:
        """An ack came; True when it is newer than the one held (it acknowledges this run's sends or a later one)."""
        if self.acked_seq is not None and seq <= self.acked_seq:
            return False
        self.acked_seq, self.acked_at = seq, now
        while self.pending and self.pending[0][0] <= seq:
            self.pending.popleft()
        return True

    def resumed(self, now: float) -> None:
        """Connected again: no ack could come while away, so the waits count from now."""
        self.pending = deque((seq, max(at, now)) for seq, at in self.pending)

    def overdue(self, now: float, bound: float) -> tuple[int, float] | None:
        """(seq, seconds waited) of the oldest update unacknowledged for `bound` seconds or more, else None."""
        if not self.pending:
            return None
        seq, at = self.pending[0]
        return (seq, now - at) if now - at >= bound else None

    def reason(self, now: float, bound: float, topic: str) -> str | None:
        """The status's reason when an update is overdue, else None."""
        late = self.overdue(now, bound)
        if late is None:
            return None
        seq, waited = late
        last = "none yet" if self.acked_seq is None else \
            f"seq {self.acked_seq}, {now - self.acked_at:.0f} s ago"
        return (f"the coordinator acknowledged no update since seq {seq} ({waited:.0f} s, bound {bound:g} s; "
                f"last ack on {topic}: {last}): its updates do not reach it or are refused (check --fleet, that "
                f"--id is the broker account's username, and that the ACL lets this agent read {topic})")
