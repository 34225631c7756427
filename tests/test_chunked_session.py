"""The coordinator session's chunk paths without a broker: update chunks' acks wait for the commit
of the update they assemble; the retained chunked model is assembled at start-up."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from coordinator.server import Coordinator
from coordinator.session import CoordinatorSession
from coordinator.strategies import make_strategy
from coordinator.validation import UpdateValidator
from protocol import chunking, codec
from protocol.messages import ModelMessage, UpdateMessage, decode_model, encode_model, encode_update
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
