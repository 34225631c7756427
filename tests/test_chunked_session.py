"""The coordinator session's chunk paths without a broker: update chunks' acks wait for the commit
of the update they assemble; the retained chunked model is assembled at start-up."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import numpy as np

from coordinator.chunks import UpdateChunks
from coordinator.server import Coordinator
from coordinator.session import CoordinatorSession
from coordinator.strategies import make_strategy
from coordinator.validation import UpdateValidator
from protocol import chunking, codec
from protocol.messages import ModelMessage, UpdateMessage, decode_model, decode_update, encode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.topics import Topics
from protocol.transport import BrokerSettings

T = Topics("chunks")
SPEC = ModelSpec("sgd-classifier", 500, (0, 1, 2))
LIMIT = 2048


def session() -> tuple[CoordinatorSession, list]:
    core = Coordinator(T, SPEC, make_strategy("fedasync"), UpdateValidator(T, SPEC.n_params))
    s = CoordinatorSession(core, BrokerSettings.from_url("mqtt://127.0.0.1:1"), max_packet_bytes=LIMIT)
    acked: list = []
    s.client.ack = lambda mid, qos: acked.append(mid)
    return s, acked


def deliver(s: CoordinatorSession, topic: str, payload: bytes, mid: int) -> None:
    s._on_message(s.client, None, SimpleNamespace(topic=topic, payload=payload, mid=mid, qos=1, retain=False))


def update_chunks(agent: str, seq: int) -> list[bytes]:
    delta = codec.encode(np.full(SPEC.n_params, 0.01), "float32", np.random.default_rng(0))
    payload = encode_update(UpdateMessage(agent, seq, 0, 10, delta, {}))
    return chunking.split(payload, chunking.capacity(LIMIT, T.update_chunk(agent)))


def test_update_chunks_are_acknowledged_only_after_the_assembled_update_is_committed():
    s, acked = session()
    s._early = None  # start-up is over
    chunks = update_chunks("a1", 7)
    n = len(chunks)
    assert n >= 3
    for mid, c in enumerate(chunks[:-1], 1):
        deliver(s, T.update_chunk("a1"), c, mid)
    assert s.core.handled_ == 0 and not s._unacked  # a partial update: nothing handled, nothing to ack
    s.step()
    assert acked == []  # a commit meanwhile acknowledges none of the held chunks
    deliver(s, T.update_chunk("a1"), chunks[-1], n)
    assert s.core.accepted_ == 1 and acked == []
    s.step()  # the commit that covers the assembled update
    assert sorted(acked) == list(range(1, n + 1))


def test_an_abandoned_partial_update_is_acknowledged_without_effect():
    s, acked = session()
    s._early = None
    first, second = update_chunks("a1", 7), update_chunks("a1", 8)
    deliver(s, T.update_chunk("a1"), first[0], 1)  # the rest of seq 7 never comes
    for mid, c in enumerate(second, 2):
        deliver(s, T.update_chunk("a1"), c, mid)
    s.step()
    assert s.core.accepted_ == 1 and sorted(acked) == list(range(1, len(second) + 2))
    assert s.core.validator.highest_seq["a1"] == 8


def test_the_retained_chunked_model_is_assembled_at_start_up():
    s, _ = session()
    payload = encode_model(ModelMessage(T.fleet, 9, SPEC, np.full(SPEC.n_params, 0.5)))
    chunks = chunking.split(payload, chunking.capacity(LIMIT, T.model_chunk(chunking.MAX_CHUNKS - 1)))
    manifest = chunking.encode_manifest(chunking.manifest(payload, T.fleet, 9, len(chunks)))
    deliver(s, T.model, manifest, 1)  # retained messages of several topics come in any order
    for mid, c in enumerate(chunks, 2):
        assert s._retained is None
        deliver(s, T.model_chunk(mid - 2), c, mid)
    assert s._retained == payload and decode_model(s._retained).version == 9


def hostile(digest: bytes, index: int, count: int, size: int = 100) -> bytes:
    return msgpack.packb([2, "chunk", digest, index, count, b"x" * size], use_bin_type=True)


def test_held_acks_are_bounded_per_agent_and_in_total_and_the_chunks_still_assemble():
    """Seen red on acks held without bounds: 40 held by one agent's partial set."""
    chunks = UpdateChunks(4 << 20, max_held=6)
    released = []
    for i in range(40):  # one agent's partial set, its chunks sent again and again
        taken = chunks.add("evil", hostile(b"e" * 32, i % 9, 10), (0, i, 1), now=0.0)
        released += taken.release
        assert chunks.held <= 3 and not taken.dropped  # one agent: half of the bound
    assert len(released) >= 37 and chunks.summary()["acks_released"] == len(released)
    held = [chunks.add(f"a{i}", update_chunks(f"a{i}", 1)[0], (0, 100 + i, 1), now=0.0) for i in range(8)]
    assert chunks.held <= 6  # in total, across agents: the oldest sets' acks went first
    assert sum(len(t.release) for t in held) >= 2
    parts = update_chunks("a7", 1)
    for i, c in enumerate(parts[1:], 1):  # a7's set completes: its update assembles whole
        taken = chunks.add("a7", c, (0, 200 + i, 1), now=0.0)
    assert taken.update is not None and decode_update(taken.update, "a7").seq == 1


def test_partial_sets_are_dropped_and_counted_on_each_chunk_attack():
    chunks = UpdateChunks(4 << 20, max_held=10, timeout=5.0)
    assert chunks.add("evil", hostile(b"a" * 32, 0, 50), (0, 1, 1), now=0.0).dropped == []
    t = chunks.add("evil", hostile(b"b" * 32, 0, 50), (0, 2, 1), now=0.0)  # a newer set
    assert t.dropped == ["chunk_superseded"] and t.release == [(0, 1, 1)]
    t = chunks.add("evil", b"\x96\x02\xa5chunk garbage", (0, 3, 1), now=0.0)  # malformed: its set goes too
    assert t.dropped == ["chunk_superseded", "chunk"] and sorted(t.release) == [(0, 2, 1), (0, 3, 1)]
    t = chunks.add("evil", hostile(b"c" * 32, 0, 65_536, 1000), (0, 4, 1), now=0.0)  # 65 MB claimed
    assert t.dropped == ["chunk_oversize"] and t.release == [(0, 4, 1)] and chunks.held == 0
    chunks.add("evil", hostile(b"d" * 32, 0, 3), (0, 5, 1), now=0.0)
    t = chunks.add("evil", hostile(b"d" * 32, 1, 4), (0, 6, 1), now=1.0)  # the same checksum, another count
    assert t.dropped == ["chunk"] and t.release == [(0, 5, 1)]
    assert chunks.expire(now=5.5).dropped == []
    t = chunks.expire(now=6.5)
    assert t.dropped == ["chunk_timeout"] and t.release == [(0, 6, 1)]
    assert chunks.summary() == {"partial": 0, "held_acks": 0, "max_held_acks": 10, "acks_released": 0}
    wrong = hostile(b"f" * 32, 0, 1)  # a whole set whose checksum is not its own
    assert chunks.add("evil", wrong, (0, 7, 1)).dropped == ["chunk_checksum"]


def test_the_session_counts_the_dropped_sets_and_shows_the_held_acks():
    s, acked = session()
    s._early = None
    deliver(s, T.update_chunk("evil"), hostile(b"a" * 32, 0, 50), 1)
    deliver(s, T.update_chunk("evil"), b"not msgpack", 2)
    s.step()
    assert sorted(acked) == [1, 2]
    status = s._status()
    assert status["rejected"] == {"chunk": 1, "chunk_superseded": 1}
    assert status["chunks"] == {"partial": 0, "held_acks": 0, "max_held_acks": 10, "acks_released": 0}
