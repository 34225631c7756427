"""Per-agent acknowledgements (protocol/acks.py), without a broker: the wire form, the coordinator's
coalesced pending acks, and the agent's pure decision of when it is unheard."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.acks import PendingAcks
from coordinator.server import Coordinator
from coordinator.strategies import FedAsync
from coordinator.validation import UpdateValidator
from edge_agent.acks import AckWatch
from protocol.acks import decode_ack, encode_ack
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ModelSpec
from test_coordinator_core import SPEC, TOPICS, make_core, update

TOPIC = "fedmq/f/ack/a1"


def test_an_ack_round_trips_and_anything_else_is_refused():
    assert decode_ack(encode_ack(1764700000123456)) == 1764700000123456
    for bad in (b"", b"garbage", b"[1]", b'{"seq": -1}', b'{"seq": true}', b'{"seq": 1.5}', b'{"seq": "3"}',
                b'{"seq": 99999999999999999999}', b'{"seq": 1, "pad": "' + b"x" * 300 + b'"}'):
        with pytest.raises(ProtocolError):
            decode_ack(bad)


def test_the_model_says_whether_acks_are_served_and_a_non_bool_is_refused():
    spec = ModelSpec("sgd-classifier", 2, (0, 1))
    model = ModelMessage("f", 3, spec, np.zeros(spec.n_params))
    assert decode_model(encode_model(model)).acks is False  # an older coordinator: no key, no acks expected
    assert decode_model(encode_model(ModelMessage("f", 3, spec, np.zeros(spec.n_params), acks=True))).acks is True
    import msgpack

    wire = msgpack.unpackb(encode_model(model))
    wire["acks"] = 1
    with pytest.raises(ProtocolError, match="acks must be bool"):
        decode_model(msgpack.packb(wire, use_bin_type=True))


def test_pending_acks_coalesce_to_the_highest_seq_per_agent_and_survive_a_failed_commit():
    acks = PendingAcks()
    for agent, seq in (("a1", 5), ("a1", 7), ("a1", 6), ("a2", 1)):
        acks.note(agent, seq)
    taken = acks.take()
    assert taken == {"a1": 7, "a2": 1} and acks.take() == {}
    acks.note("a1", 8)
    acks.put_back(taken)  # the checkpoint failed: the next commit sends them, merged with what came since
    assert acks.take() == {"a1": 8, "a2": 1}


def test_an_ack_interval_sends_an_agents_newest_seq_at_most_once_per_interval():
    acks = PendingAcks(interval=1.0)
    acks.note("a1", 5)
    assert acks.take(now=10.0) == {"a1": 5}  # not acked before: at once
    acks.note("a1", 6)
    acks.note("a2", 1)
    assert acks.take(now=10.5) == {"a2": 1}  # a1 waits; a2, never acked, goes
    acks.note("a1", 7)
    assert acks.take(now=10.9) == {}
    assert acks.take(now=11.0) == {"a1": 7}  # the newest seq, once the interval has passed
    acks.note("a1", 8)
    acks.put_back(acks.take(now=12.5))  # a failed commit: the retry is not held back by the interval
    assert acks.take(now=12.6) == {"a1": 8}


def test_the_core_acks_accepted_updates_only():
    core = make_core(max_staleness=0)
    assert core.handle_update(*update("a1", seq=10)) is None  # version 1 now
    assert core.handle_update(*update("a1", seq=10)) == "replay"
    assert core.handle_update(*update("a2", seq=3, base=99)) == "future_base"
    assert core.handle_update(*update("a3", seq=4, base=0)) == "too_stale"  # heard, its seq taken, not accepted
    assert core.handle_update(*update("a4", seq=4, delta=np.zeros(5))) == "shape"
    assert core.acks.take() == {"a1": 10}


def test_an_update_unacked_for_the_bound_is_overdue_and_an_ack_clears_it():
    watch = AckWatch()
    assert watch.reason(100.0, 5, TOPIC) is None  # nothing sent: nothing to wait for
    watch.sent(1, 0.0)
    watch.sent(2, 3.0)
    assert watch.overdue(4.9, 5) is None
    assert watch.overdue(5.0, 5) == (1, 5.0)
    reason = watch.reason(6.0, 5, TOPIC)
    assert "since seq 1 (6 s" in reason and "last ack on fedmq/f/ack/a1: none yet" in reason, reason
    assert watch.acked(1, 6.0)  # seq 2 still waits, since 3.0
    assert watch.overdue(7.9, 5) is None and watch.overdue(8.0, 5) == (2, 5.0)
    assert "last ack on fedmq/f/ack/a1: seq 1, 4 s ago" in watch.reason(10.0, 5, TOPIC)
    assert not watch.acked(1, 11.0)  # not newer: changes nothing
    assert watch.acked(2, 11.0) and watch.overdue(1000.0, 5) is None


def test_an_older_runs_retained_ack_acknowledges_nothing_of_this_run():
    watch = AckWatch()
    assert watch.acked(500, 0.0)  # retained from before the restart; this run's seqs start higher
    watch.sent(900, 1.0)
    assert watch.overdue(6.0, 5) == (900, 5.0)


def test_seqs_below_the_held_ack_wait_for_a_newer_one():
    watch = AckWatch()
    watch.acked(500, 0.0)  # retained, from a run whose clock was ahead of this one's
    watch.sent(400, 1.0)  # the coordinator refuses it as a replay: no newer ack ever comes
    assert watch.overdue(6.0, 5) == (400, 5.0)
    assert not watch.acked(500, 7.0) and watch.overdue(7.0, 5) == (400, 6.0)


def test_time_offline_does_not_count_and_the_list_is_bounded():
    watch = AckWatch(max_pending=3)
    for seq in range(1, 6):
        watch.sent(seq, float(seq))
    assert [s for s, _ in watch.pending] == [1, 2, 3]  # the oldest wait is the one kept
    watch.resumed(50.0)  # reconnected: no ack could come while away
    assert watch.overdue(54.0, 5) is None and watch.overdue(55.0, 5) == (1, 5.0)


def test_acks_are_bounded_by_the_agents_the_replay_state_admits():
    """The retained acks on the broker are one per agent ever acked: only an accepted update is acked,
    so --max-agents (too_many_agents) bounds them, not the ids a fleet of devices can name."""
    validator = UpdateValidator(TOPICS, SPEC.n_params, max_agents=2)
    core = Coordinator(TOPICS, SPEC, FedAsync(alpha=1.0), validator)
    verdicts = [core.handle_update(*update(f"a{i}", seq=1, base=core.version_)) for i in range(5)]
    assert verdicts == [None, None, "too_many_agents", "too_many_agents", "too_many_agents"]
    assert core.acks.take() == {"a0": 1, "a1": 1}
