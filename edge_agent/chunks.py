"""The agent's side of chunked messages (protocol/chunking.py): models in, updates out. No I/O."""

from __future__ import annotations

import logging
import time

from protocol import chunking
from protocol.errors import ProtocolError
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import Topics

log = logging.getLogger(__name__)


class ModelChunks:
    """Assembles a chunked model: retained chunks on ``model/chunk/<i>``, the manifest on the model topic.

    `on_message` returns a whole model payload (for `Agent.on_model`) or None. A manifest whose
    chunks do not all arrive within `stall_after` seconds (a dropped QoS 0 chunk) makes `stalled`
    true once per that many seconds: the session subscribes again and the broker resends the
    retained chunks.
    """

    def __init__(self, topics: Topics, *, max_bytes: int = MAX_MESSAGE_BYTES, stall_after: float = 5.0) -> None:
        self.topics = topics
        self.collector = chunking.Collector(max_bytes=2 * max_bytes, max_partial=3)
        self.max_bytes = max_bytes
        self.stall_after = stall_after
        self.awaited: chunking.Manifest | None = None
        self.awaited_since = 0.0
        self._chunk_head = f"{topics.base}/model/chunk/"

    def owns(self, topic: str) -> bool:
        """`topic` is a model chunk topic."""
        return topic.startswith(self._chunk_head)

    def on_message(self, topic: str, payload: bytes, now: float | None = None) -> bytes | None:
        """Take a message from the model or a chunk topic; the whole model payload when complete."""
        now = time.monotonic() if now is None else now
        try:
            if self.owns(topic):
                if not payload:  # a cleared chunk topic (the model needs fewer chunks now)
                    return None
                return self._done(self.collector.add(chunking.decode_chunk(payload, max_bytes=self.max_bytes)))
            if not chunking.is_manifest(payload):
                return payload  # a whole model in one message
            m = chunking.decode_manifest(payload, fleet=self.topics.fleet, max_bytes=self.max_bytes)
        except ProtocolError as exc:
            log.warning("ignoring an unusable model chunk or manifest on %s: %s", topic, exc)
            return None
        self.awaited, self.awaited_since = m, now
        done = self._done(self.collector.expect(m.digest))
        if done is None:
            log.debug("manifest of version %d: waiting for its %d chunks", m.version, m.chunks)
        return done

    def _done(self, payload: bytes | None) -> bytes | None:
        if payload is not None:
            log.debug("assembled model version %d from %d chunks", self.awaited.version, self.awaited.chunks)
            self.awaited = None
        return payload

    def stalled(self, now: float | None = None) -> bool:
        """A manifest's chunks are overdue (then the clock restarts: true once per `stall_after`)."""
        now = time.monotonic() if now is None else now
        if self.awaited is None or now - self.awaited_since < self.stall_after:
            return False
        log.info("model version %d: chunks missing after %g s; fetching the retained ones again",
                 self.awaited.version, self.stall_after)
        self.awaited_since = now
        return True


def update_packets(topics: Topics, agent_id: str, payload: bytes, max_packet_bytes: int | None) -> list[tuple[str, bytes]]:
    """(topic, payload) to publish for one update: itself, or its chunks when over the packet limit."""
    topic = topics.update(agent_id)
    if chunking.fits(topic, len(payload), max_packet_bytes):
        return [(topic, payload)]
    chunk_topic = topics.update_chunk(agent_id)
    return [(chunk_topic, c) for c in chunking.split(payload, chunking.capacity(max_packet_bytes, chunk_topic))]
