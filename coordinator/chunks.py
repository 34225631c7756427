"""Agents' chunked updates on the coordinator: assembled whole, each chunk's ack held with it.

A chunk is acknowledged only with the update it belongs to (after that update's group
commit, like any update), or released without effect when its update can never complete:
the agent moved on to another update, or the collector's bounds dropped the partial one.
"""

from __future__ import annotations

from protocol import chunking
from protocol.errors import ProtocolError

Ack = tuple[int, int, int]  # (connection, mid, qos), as coordinator/session.py holds them


class UpdateChunks:
    """Per-agent partial updates (protocol/chunking.py's Collector) and the acks they hold."""

    def __init__(self, max_bytes: int, max_partial: int = 4096) -> None:
        self._collector = chunking.Collector(max_bytes=max_bytes, max_partial=max_partial, need_manifest=False)
        self._acks: dict[tuple, list[Ack]] = {}

    def add(self, agent: str, payload: bytes, ack: Ack) -> tuple[bytes | None, list[Ack], list[Ack]]:
        """Take one chunk: (the assembled update or None, the acks that go with it, the acks to
        release now with no effect). ProtocolError if the chunk itself cannot be decoded."""
        chunk = chunking.decode_chunk(payload)
        for k in self._collector.keys_of(agent):
            if k[1] != chunk.digest:  # the agent moved on: that update will never complete
                self._collector.drop(k)
        key = (agent, chunk.digest)
        self._acks.setdefault(key, []).append(ack)
        try:
            update = self._collector.add(chunk, key=agent)
        except ProtocolError:
            update = None
            self._collector.drop(key)
        released = [a for k in self._collector.take_dropped() for a in self._acks.pop(k, [])]
        return update, (self._acks.pop(key, []) if update is not None else []), released
