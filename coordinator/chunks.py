"""Agents' chunked updates on the coordinator: assembled whole, a bounded number of acks held.

A chunk's acknowledgement is held back with its partial update, so a crash before the
assembled update is committed leaves the chunks with the broker to redeliver. But every
held ack takes a slot of the broker's in-flight window for the coordinator's session (20 on
a default mosquitto): held without bounds, one agent's partial set froze every update of
the fleet. So the acks held are bounded, per agent (half the total) and in total
(`max_held`, below the broker's window): past a bound, the acks of the agent's set (or of the
oldest set) are released at once and its chunks kept, so the update still assembles; only
its durability across a crash is lost (the agent sends it again when it sees the restart or
after --resend-after). A partial set is dropped (its acks released, counted by reason) on
a malformed chunk from its agent (``chunk``), a chunk of a set larger than an update may be
(``chunk_oversize``), a newer set from the same agent (``chunk_superseded``), after
`timeout` seconds (``chunk_timeout``), when the whole set fails its checksum
(``chunk_checksum``) and when the collector's memory bounds evict it (``chunk_evicted``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol import chunking
from protocol.errors import ProtocolError

Ack = tuple[int, int, int]  # (connection, mid, qos), as coordinator/session.py holds them
MAX_HELD = 10  # acks held in total: half of mosquitto's default max_inflight_messages (20)
TIMEOUT_S = 60.0  # a partial update older than this is dropped (4 MB over a 1 Mbit/s uplink takes 32 s)


@dataclass
class Taken:
    """What one chunk (or a timeout sweep) did: the assembled update and the acks that go with its
    commit, the acks to release now without effect, and the reasons of the partial sets dropped."""

    update: bytes | None = None
    acks: list[Ack] = field(default_factory=list)
    release: list[Ack] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def tally(self, core) -> str | None:
        """Count each partial set dropped as one handled, rejected payload of `core` (a Coordinator),
        by reason; the last reason (for the rejection log), or None."""
        for reason in self.dropped:
            core.handled_ += 1
            core.rejected_[reason] += 1
        return self.dropped[-1] if self.dropped else None


class UpdateChunks:
    """Per-agent partial updates (protocol/chunking.py's Collector) and the bounded acks they hold."""

    def __init__(self, max_update_bytes: int, *, max_held: int = MAX_HELD, timeout: float = TIMEOUT_S,
                 max_bytes: int = 64 * 1024 * 1024, max_partial: int = 4096) -> None:
        if max_held < 1 or not timeout > 0:
            raise ValueError("--max-held-chunks must be >= 1 and --chunk-timeout > 0")
        self.max_update_bytes = max_update_bytes
        self.max_held = max_held
        self.per_agent = max(1, max_held // 2)
        self.timeout = timeout
        self._collector = chunking.Collector(max_bytes=max(max_bytes, 2 * max_update_bytes), max_partial=max_partial,
                                             need_manifest=False)
        self._acks: OrderedDict[tuple, list[Ack]] = OrderedDict()  # (agent, digest) -> held acks, oldest set first
        self._started: dict[tuple, float] = {}  # (agent, digest) -> monotonic time of its first chunk
        self._current: dict[str, bytes] = {}  # agent -> digest of its one partial set
        self.held = 0  # acks held back now (each one a slot of the broker's in-flight window)
        self.released_ = 0  # acks released before their update completed (its chunks kept)
        self.seen_ = 0

    def add(self, agent: str, payload: bytes, ack: Ack, now: float | None = None) -> Taken:
        """Take one chunk of `agent`'s update (its message's `ack`)."""
        now = time.monotonic() if now is None else now
        self.seen_ += 1
        out = Taken()
        try:
            chunk = chunking.decode_chunk(payload, max_bytes=self.max_update_bytes)
        except ProtocolError:
            return self._refuse(agent, ack, "chunk", out)
        if len(chunk.data) * (chunk.count - 1) >= self.max_update_bytes:
            return self._refuse(agent, ack, "chunk_oversize", out)
        key = (agent, chunk.digest)
        self._drop_agent(agent, chunk.digest, "chunk_superseded", out)  # the agent moved on: that one never completes
        if self._collector.counts.get(key, chunk.count) != chunk.count:  # the same checksum, another chunk count
            self._drop(key, "chunk", out)
        self._acks.setdefault(key, []).append(ack)
        self.held += 1
        self._started.setdefault(key, now)
        self._current[agent] = chunk.digest
        update = self._collector.add(chunk, key=agent)  # its own bounds are above the ones checked here
        for k in self._collector.take_dropped():
            self._drop(k, "chunk_checksum" if k == key else "chunk_evicted", out)
        if update is not None:
            out.update, out.acks = update, self._forget(key)
            return out
        self._bound(key, out)
        return out

    def expire(self, now: float | None = None) -> Taken:
        """Drop the partial updates older than `timeout` (call it now and then)."""
        now = time.monotonic() if now is None else now
        out = Taken()
        for key in [k for k, t in self._started.items() if now - t > self.timeout]:
            self._drop(key, "chunk_timeout", out)
        return out

    def summary(self) -> dict | None:
        """For the coordinator status (None until a chunk came): partial sets, acks held and released."""
        if not self.seen_:
            return None
        return {"partial": len(self._started), "held_acks": self.held, "max_held_acks": self.max_held,
                "acks_released": self.released_}

    # -- inside --------------------------------------------------------------------------

    def _bound(self, key: tuple, out: Taken) -> None:
        """Keep the held acks within the bounds: the agent's set first, then the oldest sets."""
        if len(self._acks.get(key, ())) > self.per_agent:
            self._release(key, out)
        while self.held > self.max_held:
            self._release(next(iter(self._acks)), out)

    def _release(self, key: tuple, out: Taken) -> None:
        acks = self._acks.pop(key, [])
        out.release += acks
        self.released_ += len(acks)
        self.held -= len(acks)

    def _refuse(self, agent: str, ack: Ack, reason: str, out: Taken) -> Taken:
        """A chunk that is no part of any update: counted, released, and the agent's partial set with it."""
        self._drop_agent(agent, None, "chunk_superseded", out)
        out.release.append(ack)
        out.dropped.append(reason)
        return out

    def _drop_agent(self, agent: str, keep: bytes | None, reason: str, out: Taken) -> None:
        digest = self._current.get(agent)
        if digest is not None and digest != keep:
            self._drop((agent, digest), reason, out)

    def _drop(self, key: tuple, reason: str, out: Taken) -> None:
        self._collector.drop(key)
        self._collector.take_dropped()
        if key in self._started:
            out.release += self._forget(key)
            out.dropped.append(reason)

    def _forget(self, key: tuple) -> list[Ack]:
        self._started.pop(key, None)
        if self._current.get(key[0]) == key[1]:
            del self._current[key[0]]
        acks = self._acks.pop(key, [])
        self.held -= len(acks)
        return acks
