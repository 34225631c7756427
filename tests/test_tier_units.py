"""Issue 20: the tier's pure parts without a broker: late (reordered) updates, partials, the root's rules."""

from __future__ import annotations

import asyncio
import tracemalloc
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from nats.js.errors import KeyWrongLastSequenceError

from coordinator.aggregation import agent_capped_weights
from coordinator.staleness import Polynomial
from coordinator.strategies import FedBuff
from coordinator.validation import UpdateValidator
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, UpdateMessage, encode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.topics import Topics
from tier.lease import Fenced, FencedRecord
from tier.mqtt_link import Link, parse_urls
from tier.partial import Partial, PartialSum, decode_partial, encode_partial
from tier.steps import RootFedAsync, RootFedBuff, capped_sum
from tier.root import Root
from tier.worker import Worker

TOPICS = Topics("u")
RNG = np.random.default_rng(0)


def _payload(seq: int) -> bytes:
    return encode_update(UpdateMessage("a", seq, 0, 10, codec.encode(np.ones(4) * 0.1, "float32", RNG)))


@pytest.mark.parametrize("window", [0, 8])
def test_an_update_delivered_after_a_newer_one_counts_once_within_the_reorder_window(window):
    v = UpdateValidator(TOPICS, 4, reorder_window=window)
    topic = TOPICS.update("a")
    assert v.check(topic, _payload(1), 0).reason is None
    assert v.check(topic, _payload(4), 0).reason is None  # 2 and 3 redelivered later
    assert v.gaps_ == 2
    late = v.check(topic, _payload(2), 0).reason
    assert late == (None if window else "replay")
    assert v.check(topic, _payload(2), 0).reason == "replay"  # once only
    assert v.check(topic, _payload(4), 0).reason == "replay"
    assert v.gaps_ == (1 if window else 2)


def test_the_reorder_window_is_bounded_per_agent():
    v = UpdateValidator(TOPICS, 4, reorder_window=8)
    topic = TOPICS.update("a")
    v.check(topic, _payload(1), 0)
    v.check(topic, _payload(1000), 0)  # a hole of 998: only the newest 8 stay open
    assert len(v.missing["a"]) == 8
    assert v.check(topic, _payload(500), 0).reason == "replay"
    assert v.check(topic, _payload(995), 0).reason is None


def test_an_agents_first_updates_delivered_after_a_newer_one_count_once_within_the_window():
    """A device's resend (or a redelivery) can bring an agent's first updates after its later ones: those are
    not replays (nothing of it was accepted below them), but an update outside the window or seen before is."""
    v = UpdateValidator(TOPICS, 4, reorder_window=8)
    topic = TOPICS.update("a")
    assert v.check(topic, _payload(3), 0).reason is None  # 1 and 2 resent later
    assert v.check(topic, _payload(4), 0).reason is None
    assert v.check(topic, _payload(1), 0).reason is None
    assert v.gaps_ == 1  # 2, between 1 and 3, has not arrived yet
    assert v.check(topic, _payload(2), 0).reason is None
    assert v.gaps_ == 0
    for seq in (1, 2, 3, 4):
        assert v.check(topic, _payload(seq), 0).reason == "replay"
    restored = UpdateValidator(TOPICS, 4, reorder_window=8)  # the open head survives a change of owner
    restored.restore({"a": 20}, first={"a": 20})
    assert restored.check(topic, _payload(15), 0).reason is None
    assert restored.check(topic, _payload(11), 0).reason == "replay"  # more than the window below 20
    v.check(topic, _payload(13), 0)  # the head closes once the window has moved past it
    assert "a" not in v.first
    lone = UpdateValidator(TOPICS, 4)  # without a window (one coordinator, ordered broker) nothing changes
    lone.check(topic, _payload(3), 0)
    assert lone.check(topic, _payload(1), 0).reason == "replay" and not lone.first


def test_partial_round_trip_and_hostile_partials():
    p = Partial(3, 7, 12, np.arange(5.0), 20.0, 2, [("a", 1, 0), ("b", 9, 1)], 1.0, 0.5)
    q = decode_partial(encode_partial(p), 5)
    assert (q.partition, q.epoch, q.seq, q.weight, q.count, q.covers) == (3, 7, 12, 20.0, 2, p.covers)
    assert np.array_equal(q.weighted_sum, p.weighted_sum)
    bad = [b"\x00junk", encode_partial(p)[:-3], encode_partial(Partial(3, 7, 12, np.arange(4.0), 20.0, 2, p.covers)),
           encode_partial(Partial(3, 7, 12, np.array([np.nan] * 5), 20.0, 2, p.covers)),
           encode_partial(Partial(3, 7, 12, np.arange(5.0), 20.0, 3, p.covers))]
    for data in bad:
        with pytest.raises(ProtocolError):
            decode_partial(data, 5)


def test_a_partial_carries_its_partitions_refusals_and_the_root_sums_them_by_reason():
    """What the partition workers refuse (device messages; secure-aggregation members left out of cohorts)
    reaches the root's status (tests/test_tier_hostile.py, through the tier, for the first)."""
    from tier.root import rejected_by_reason

    p = Partial(3, 7, 12, np.arange(5.0), 20.0, 0, [], rejected={"norm": 2, "decode": 1}, excluded={"bad_shares": 1})
    q = decode_partial(encode_partial(p), 5)
    assert (q.rejected, q.excluded) == ({"norm": 2, "decode": 1}, {"bad_shares": 1})
    old = msgpack.unpackb(encode_partial(p), raw=False)
    del old["rejected"], old["excluded"]  # a worker from before: nothing refused said
    q = decode_partial(msgpack.packb(old, use_bin_type=True), 5)
    assert (q.rejected, q.excluded) == ({}, {})
    assert rejected_by_reason({"1": {"norm": 2, "decode": 1}, "3": {"decode": 4}}) == {"decode": 5, "norm": 2}


def test_a_partitions_counts_alone_decode_beside_partials_and_merge_without_adding_twice():
    """A commit without a partial sends the partition's cumulative counts alone (tests/test_tier_hostile.py
    through the tier); the root keeps the larger of each, so a repeated or an older one changes nothing."""
    from tier.partial import Counts, decode_message, encode_counts, merge_counts

    c = decode_message(encode_counts(Counts(2, {"decode": 3}, {"no_shares": 1})), 5)
    assert c == Counts(2, {"decode": 3}, {"no_shares": 1})
    p = Partial(3, 7, 12, np.arange(5.0), 20.0, 0, [], rejected={"norm": 2})
    assert decode_message(encode_partial(p), 5).rejected == {"norm": 2}  # a partial still decodes as one
    with pytest.raises(ProtocolError):
        decode_message(msgpack.packb({"kind": "counts", "rejected": {"x": 1}}), 5)  # no partition
    assert merge_counts({"decode": 3, "norm": 1}, {"decode": 3}) == {"decode": 3, "norm": 1}
    assert merge_counts({"decode": 3}, {"decode": 4, "shape": 1}) == {"decode": 4, "shape": 1}


@pytest.mark.parametrize("field, value", [
    ("rejected", {"decode": float("inf")}), ("rejected", {"decode": 1e300}), ("rejected", {"decode": -1}),
    ("rejected", {"decode": "7"}), ("rejected", {"decode": True}), ("rejected", {"decode": 2 ** 60}),
    ("excluded", {"x" * 65: 1}), ("excluded", {f"r{i}": 1 for i in range(33)}), ("rejected", [1, 2]),
    ("partition", float("inf")), ("partition", -1), ("partition", 1.5)])
def test_counts_and_partials_with_numbers_no_worker_sends_are_refused(field, value):
    """What the root keeps (max-merged for ever, checkpointed as msgpack) is bounded: an Inf count raised
    OverflowError out of the root's fold (a crash loop), a 1e300 one would make its checkpoint unpackable
    (tests/test_tier_forged_counts.py through the tier)."""
    from tier.partial import Counts, decode_message, encode_counts

    counts = msgpack.unpackb(encode_counts(Counts(1, {"decode": 1})))
    partial = msgpack.unpackb(encode_partial(Partial(1, 1, 1, np.zeros(5), 1.0, 0, [])))
    for message in (counts, partial):
        if field in message:
            with pytest.raises(ProtocolError):
                decode_message(msgpack.packb(dict(message, **{field: value}), use_bin_type=True), 5)


def test_subject_partition_reads_the_partials_and_the_counts_subjects():
    from tier.partial import subject_partition

    assert subject_partition("fedmq.f.partial.3") == (3, False)
    assert subject_partition("fedmq.f.partial.12.counts") == (12, True)
    assert subject_partition("fedmq.f.partial.x.counts") is None
    assert subject_partition("fedmq.f.partial.3.other") is None
    assert subject_partition("fedmq.f.upd.3") is None


@pytest.mark.parametrize("sep", [".", "/"])
def test_every_tier_subject_kind_round_trips_through_the_table(sep):
    """protocol/topics.py's TIER_SUBJECTS builds and parses every tier subject: each kind built from sample values
    reads back as that kind with those values, as a NATS subject and as an MQTT topic (seen red with updc's level
    set to upd: update_chunk read back as update)."""
    from protocol.topics import AGENT, PARTITION, SECAGG_KIND, TIER_SUBJECTS, parse_tier, tier_subject

    sample = {PARTITION: "7", AGENT: "dev-1", SECAGG_KIND: "share"}
    for kind, shape in TIER_SUBJECTS.items():
        values = [sample[s] for s in shape if s in sample]
        subject = tier_subject(f"fedmq{sep}f", kind, *values, sep=sep)
        assert parse_tier(subject.split(sep)[2:]) == (kind, 7, tuple(values[1:])), subject
    assert {shape[0] for shape in TIER_SUBJECTS.values()} == {"upd", "updc", "psecagg", "partial"}  # the wire's names
    assert tier_subject("fedmq.f", "partial_counts", 3) == "fedmq.f.partial.3.counts"
    with pytest.raises(ValueError):
        tier_subject("fedmq.f", "partial", 3, "x")


def test_root_fedbuff_over_partials_equals_one_coordinators_fedbuff():
    deltas = [RNG.normal(size=6) for _ in range(6)]
    # counts within the core's weight cap (the buffer's lower median, issue 18) and each partial's, and one row per
    # agent: a partial caps at its own lower median, which may be below the buffer's, and the repeat rule needs the
    # whole buffer's rows, so only there are the two equal (capped: test_one_agents_claimed_counts_...)
    samples = [5, 3, 5, 5, 5, 5]
    stale = [0, 1, 3, 0, 2, 5]
    weight = Polynomial(0.5)
    single = FedBuff(6, 0.5, weight)
    params = np.ones(6)
    for d, n, s in zip(deltas, samples, stale):
        out = single.add(params, d, n, s)
    assert not single.bounded_  # neither bound acted: the premise of the equality
    parts = [PartialSum(6, weight), PartialSum(6, weight)]  # two partitions, uneven split
    for i, (d, n, s) in enumerate(zip(deltas, samples, stale)):
        parts[i % 3 == 0].add(None, d, n, s)
    root = RootFedBuff(6, 6, 0.5)
    for part in parts:
        root.add(*part.take())
    assert root.ready()
    assert np.allclose(root.step(params), out)
    assert root.count == 0 and not root.ready()
    fa = RootFedAsync(6, 0.5)
    fa.add(np.full(6, 4.0), 2.0, 1)
    assert np.allclose(fa.step(np.zeros(6)), 1.0)


def _share_of(step: np.ndarray, evil: np.ndarray, honest: np.ndarray) -> float:
    """The weight of `evil` in a step that mixes it with `honest` (both unit directions, opposite)."""
    return float((honest @ step - 1) / (honest @ evil - 1))


@pytest.mark.parametrize("together", [False, True])
def test_one_agents_claimed_counts_own_no_more_than_a_typical_row_of_the_roots_step(together):
    """Issue 18 point 3 on the tier: 4 honest updates of 50 samples and one claiming 10^9 (within a sample cap
    before its warm-up), its delta the honest one's opposite. Alone in its partial the root caps its row at the
    buffer's lower median, in a partial with honest ones the partition does: either way it owns a fifth of the
    step, as one of K = 5 rows of the single coordinator's FedBuff. Seen red: the root's cap off, alone 0.99999980;
    the partition's off, together 0.39999998 (the root scales a partial as a whole); both off, 0.99999980 either way."""
    honest, evil = np.ones(6) / np.sqrt(6), -np.ones(6) / np.sqrt(6)
    layout = [[(evil, 10 ** 9), (honest, 50)], [(honest, 50)]] if together else [[(evil, 10 ** 9)], [(honest, 50)] * 2]
    parts = [PartialSum(6) for _ in range(3)]
    for part, rows in zip(parts, layout + [[(honest, 50)] * 2]):
        for d, n in rows:
            part.add(None, d, n, 0)
    root = RootFedBuff(6, 5)
    for part in parts:
        root.add(*part.take())
    step = root.step(np.zeros(6))
    assert _share_of(step, evil, honest) == pytest.approx(0.2)
    single = FedBuff(5)
    for i, (d, n) in enumerate([(evil, 10 ** 9)] + [(honest, 50)] * 4):
        out = single.add(np.zeros(6), d, n, 0, agent=f"a{i}")
    assert np.allclose(step, out)  # the single coordinator's step
    assert root.weight_capped + sum(p.weight_capped for p in parts) == 1


def test_a_partial_without_row_weights_counts_evenly_and_a_forged_one_is_refused():
    """A partial from a worker that sent no per-update weights counts its weight evenly over its updates; one whose
    weights do not fit its count or weight is refused: the root caps those weights, so they must be the sum's."""
    rows = np.array([2.0, 3.0])
    p = Partial(1, 1, 1, np.ones(5), 5.0, 2, [("a", 1, 0), ("b", 1, 0)], rows=rows)
    assert np.array_equal(decode_partial(encode_partial(p), 5).rows, rows)
    old = msgpack.unpackb(encode_partial(p), raw=False)
    del old["rows"]
    assert decode_partial(msgpack.packb(old, use_bin_type=True), 5).rows is None
    for bad in ([2.0, 4.0], [5.0], [6.0, -1.0], [float("inf"), 3.0], [float("nan"), 5.0]):
        with pytest.raises(ProtocolError):
            decode_partial(encode_partial(Partial(1, 1, 1, np.ones(5), 5.0, 2, p.covers, rows=np.array(bad))), 5)
    root = RootFedBuff(5, 3)
    root.add(np.full(5, 8.0), 4.0, 2)  # no rows: 2 and 2
    root.add(np.full(5, -100.0), 100.0, 1)  # one update claiming 100: capped at the lower median, 2
    assert np.allclose(root.step(np.zeros(5)), (8.0 - 2.0) / 6.0)


def test_the_roots_checkpointed_buffer_is_one_partial_of_its_capped_rows():
    """The buffer goes into the root's checkpoint the size of one partial (its rows capped as of the commit), and a
    root that takes over steps it with the partials that follow, still bounded."""
    honest, evil = np.ones(6) / np.sqrt(6), -np.ones(6) / np.sqrt(6)
    root = RootFedBuff(6, 5)
    root.add(evil * 10 ** 9, 10 ** 9, 1)
    for _ in range(2):
        root.add(honest * 50, 50.0, 1)
    state = root.state()
    assert len(state["sum"]) == 6 * 8 and state["weight"] == 150.0
    taken = RootFedBuff(6, 5)
    taken.restore(msgpack.unpackb(msgpack.packb(state)))
    for _ in range(2):
        taken.add(honest * 50, 50.0, 1)
    assert taken.ready() and _share_of(taken.step(np.zeros(6)), evil, honest) == pytest.approx(0.2)
    old = RootFedBuff(6, 5)  # a checkpoint from before the rows: its weight even over its count
    old.restore({"sum": state["sum"], "weight": 150.0, "count": 3})
    assert old.count == 3


def test_one_agents_updates_across_partials_weigh_as_one_agent_and_k_counts_agents():
    """Issue 18 point 3 (bounded per agent per buffer) on the tier: a fast agent's 6 updates land in 6 partials of one
    root buffer of K = 5 beside 4 honest agents, its delta their opposite. The buffer steps on the fifth agent, not
    the fifth update, and the agent owns a fifth of the step, as one row of the coordinator's FedBuff. Partials it
    shares with an honest agent keep that agent's weight when its own partials carry its bound. Seen red counting
    updates (ready on its 5 partials alone) and with the cap per update, not per agent (share 0.6)."""
    honest, evil = np.ones(6) / np.sqrt(6), -np.ones(6) / np.sqrt(6)
    root = RootFedBuff(6, 5)
    for _ in range(5):
        root.add(evil * 50, 50.0, 1, np.array([50.0]), ["evil"])
    assert not root.ready() and root.count == 1 and root.repeat_agent == 4
    root.add(evil * 50 + honest * 50, 100.0, 2, np.array([50.0, 50.0]), ["evil", "h0"])  # shared with an honest one
    for i in range(1, 4):
        assert not root.ready()
        root.add(honest * 50, 50.0, 1, np.array([50.0]), [f"h{i}"])
    assert root.ready() and root.updates == 10 and root.repeat_agent == 5
    assert _share_of(root.step(np.zeros(6)), evil, honest) == pytest.approx(0.2)
    assert root.weight_capped == 5 and root.count == 0  # its own partials lowered, the shared one kept


def test_an_agents_many_updates_in_one_partial_neither_own_it_nor_lower_the_others_weight():
    """In one partial an agent's updates share one agent's weight (agent_capped_weights): 9 updates claiming 10^9
    each weigh as the lower median agent, and 9 claiming 1 sample do not pull an honest agent's 50 down to 1. Seen
    red with rows capped per update: the 10^9 rows kept 10^9 each (they are the partial's lower median)."""
    for claim, want in ((10 ** 9, [50.0 / 9] * 9 + [50.0, 50.0]), (1, [1.0] * 9 + [50.0, 50.0])):
        part = PartialSum(3)
        for _ in range(9):
            part.add(None, -np.ones(3), claim, 0, agent="evil")
        for agent in ("a", "b"):
            part.add(None, np.ones(3), 50, 0, agent=agent)
        total, weight, count, rows = part.take()
        assert np.allclose(rows, want) and np.isclose(weight, sum(want)) and count == 11 and part.repeat_agent == 8
        assert np.allclose(total, (100.0 - sum(want[:9])) * np.ones(3))


def test_no_agent_in_several_partials_weighs_more_than_its_bound_and_no_update_gains():
    """2,000 random buffers of 1-7 partials, 1-3 updates each of 6 agents, claims from 1 to 10^6: an agent in several
    partials weighs at most its bound (its capped total, agent_capped_weights), and scaling never raises an update
    (seen red with an agent's several partials unscaled: 1000010 for a bound of 10^6)."""
    rng = np.random.default_rng(1)
    for _ in range(2000):
        sizes = rng.integers(1, 4, size=rng.integers(1, 8))
        rows = [rng.choice([1.0, 10.0, 50.0, 1e6], size=n) for n in sizes]
        agents = [list(rng.choice(list("abcdef"), size=n)) for n in sizes]
        every, who = np.concatenate(rows), [a for names in agents for a in names]
        bound, _ = agent_capped_weights(every, who)
        _, weighed, _ = capped_sum([RNG.normal(size=3) for _ in sizes], rows, agents, 3)
        part = np.repeat(np.arange(len(sizes)), sizes)
        for agent in set(who):
            mine = np.array(who) == agent
            if len(set(part[mine])) > 1:
                assert weighed[mine].sum() <= bound[mine].sum() * (1 + 1e-9)
        assert (weighed <= every * (1 + 1e-12)).all()


def test_the_roots_checkpointed_buffer_keeps_its_agents():
    """A root that takes over keeps the buffer's agents: the repeating agent's next partial is still its one weight,
    and K still counts agents (seen red without the agents in the checkpoint: 3 agents restored for 2)."""
    honest, evil = np.ones(6) / np.sqrt(6), -np.ones(6) / np.sqrt(6)
    root = RootFedBuff(6, 5)
    for agent, delta in (("evil", evil), ("evil", evil), ("h0", honest)):
        root.add(delta * 50, 50.0, 1, np.array([50.0]), [agent])
    taken = RootFedBuff(6, 5)
    taken.restore(msgpack.unpackb(msgpack.packb(root.state())))
    assert (taken.count, taken.updates, taken.repeat_agent) == (2, 3, 1)
    taken.add(evil * 50, 50.0, 1, np.array([50.0]), ["evil"])
    for i in (1, 2, 3):
        assert not taken.ready()
        taken.add(honest * 50, 50.0, 1, np.array([50.0]), [f"h{i}"])
    assert taken.ready() and _share_of(taken.step(np.zeros(6)), evil, honest) == pytest.approx(0.2)


class _LateKV:
    """A KV bucket whose writes go unanswered in mode "lost" (the stream was electing a leader; the new leader
    may still commit it: land()) or "stored" (stored, the answer lost with the node)."""

    def __init__(self) -> None:
        self.value, self.revision, self.mode, self.unanswered = None, 0, "answer", []

    async def update(self, key, value, last):
        if last != self.revision:
            raise KeyWrongLastSequenceError()
        if self.mode == "lost":
            self.unanswered.append(value)
            raise asyncio.TimeoutError()
        self.value, self.revision = value, self.revision + 1
        if self.mode == "stored":
            raise asyncio.TimeoutError()
        return self.revision

    async def get(self, key):
        return SimpleNamespace(value=self.value, revision=self.revision)

    def land(self) -> None:
        self.value, self.revision = self.unanswered.pop(), self.revision + 1


def test_a_checkpoint_write_given_up_on_that_lands_later_is_taken_as_ours():
    kv = _LateKV()
    record = FencedRecord(SimpleNamespace(state=kv, call=lambda fn, timeout: asyncio.run(fn())), "p0")
    record.write({"seq": 1})
    kv.mode = "lost"
    with pytest.raises(TimeoutError):  # no answer, and not stored yet: the caller retries
        record.write({"seq": 2})
    kv.land()  # the new leader commits what the old one had replicated
    kv.mode = "answer"
    with pytest.raises(TimeoutError):  # the retry finds our own earlier write there, not another owner's
        record.write({"seq": 3})
    record.write({"seq": 3})
    assert msgpack.unpackb(kv.value) == {"seq": 3}
    kv.mode = "stored"
    record.write({"seq": 4})  # stored, answer lost: confirmed by reading it back
    kv.mode = "answer"
    kv.value, kv.revision = msgpack.packb({"owner": "other"}), kv.revision + 1  # another owner took it over
    with pytest.raises(Fenced):
        record.write({"seq": 5})


def _bare_partition(**worker_options):
    """A worker's Partition without NATS or MQTT, as tests/test_tier_secagg.py builds one."""
    from types import SimpleNamespace

    from coordinator.staleness import Constant
    from coordinator.validation import DEFAULT_NORM_FACTOR
    from protocol.topics import Topics
    from tier.worker import Partition

    spec = ModelSpec("sgd-regressor", 9, ())
    topics = Topics("normfleet")
    options = dict(topics=topics, model=ModelMessage("normfleet", 0, spec, np.zeros(spec.n_params)),
                   staleness=Constant(), max_staleness=10, max_norm=1e6, norm_factor=DEFAULT_NORM_FACTOR, dp=None,
                   secagg=None, nats=SimpleNamespace(prefix="fedmq", fleet="normfleet"), worker_id="w",
                   max_held_chunks=64, chunk_timeout=60.0)
    options.update(worker_options)
    part = Partition(SimpleNamespace(**options), 0, SimpleNamespace(epoch=1, revision=1, valid=True))
    return part, spec, topics


def test_a_partition_worker_has_the_relative_norm_bound_by_default():
    """Issue 18 on the tier: an inflated update is refused as `norm` inside a partition as by the single
    coordinator; no bound where the root runs secure aggregation or central DP (seen red with factor None)."""
    from protocol import codec
    from protocol.messages import UpdateMessage, encode_update

    part, spec, topics = _bare_partition()
    rng = np.random.default_rng(0)

    def send(agent, seq, delta):
        payload = encode_update(UpdateMessage(agent, seq, 0, 10, codec.encode(delta, "float32", rng), {}))
        return part.core.handle_update(topics.update(agent), payload)

    for seq, agent in enumerate("abc", 1):
        assert send(agent, seq, np.full(spec.n_params, 0.1)) is None
    assert send("x", 9, np.full(spec.n_params, -0.4)) == "norm"
    secagg = {"k": 3, "threshold": 2, "clip": 1.0, "timeout": 5.0, "grace": 2.0, "backoff": 30.0}
    for settings in (dict(secagg=secagg), dict(dp={"clip": 1.0, "noise": 1.0, "delta": 1e-5}), dict(norm_factor=None)):
        assert _bare_partition(**settings)[0].core.validator.norm.factor is None


def test_a_link_never_fails_over_to_the_node_another_link_is_on():
    """The root's two links must stay on two nodes, or one node's death cuts both (seen: 8.92 s)."""
    nodes = parse_urls("mqtt://127.0.0.1:1,mqtt://127.0.0.1:2,mqtt://127.0.0.1:3")
    other = SimpleNamespace(index=1)
    link = Link(nodes, "test-avoid", persistent=False, start=0, avoid=lambda: other.index)
    link._rotate()
    assert link.index == 2 and link.client._port == 3
    other.index = 0
    link._rotate()
    assert link.index == 1


@pytest.mark.parametrize("csv, message", [
    (None, "no-such.csv: no such file"),
    ("a,b,label\n1,2,0\n", "2 features, the model has 3"),
    ("a,b,c,label\n1,2,3,7\n", "labels [7] are not among --classes"),
    ("a,b,c,y\n1,2,3,0\n", "no column 'label'"),
])
def test_the_roots_eval_csv_is_checked_at_the_start_in_one_line(csv, message, tmp_path, capsys):
    """A missing or unusable --eval-csv stops the root before it connects: one line, exit 2 (the coordinator's
    checks, coordinator.evaluation.load_eval_set; seen red with the file loaded only at the first publish)."""
    from tier import root as tier_root

    path = tmp_path / "eval.csv" if csv is not None else "no-such.csv"
    if csv is not None:
        path.write_text(csv)
    code = tier_root.main(["--nats", "nats://127.0.0.1:1", "--mqtt", "mqtt://127.0.0.1:1", "--fleet", "f",
                           "--model", "sgd-classifier", "--n-features", "3", "--classes", "0,1", "--eval-csv", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tier root: ") and message in err and len(err.splitlines()) == 1, err



HELD = ModelSpec("sgd-classifier", 4, (0, 1, 2))


def hostile_models() -> list[bytes]:
    """A 5 MB int4 model of 10^7 features (~135 MB traced decoded whole) and a model of HELD's features counting
    100,000 classes (~11 MB built from ~150 bytes)."""
    huge = ModelSpec("sgd-regressor", 10_000_000)
    many = encode_model(ModelMessage("f", 2, HELD, np.zeros(HELD.n_params)))
    return [encode_model(ModelMessage("f", 2, huge, np.zeros(huge.n_params), codec="int4")),
            many.replace(msgpack.packb(["sgd-classifier", 4, 3])[1:], msgpack.packb(["sgd-classifier", 4, 100_000])[1:])]


def assert_refused_in_bounded_memory(take, payload: bytes) -> None:
    tracemalloc.start()
    try:
        take(SimpleNamespace(payload=payload, topic="fedmq/f/model"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(payload) + 1_000_000, f"peak {peak} B for a {len(payload)} B model"


def test_a_worker_judges_a_model_by_its_held_spec_before_decoding_its_params():
    """A retained 5 MB int4 model of 10^7 features was decoded whole by every partition worker before its spec was
    looked at: a model of another spec than the held one (the root's checkpoint has a new spec first) is now refused
    on its spec, in one line, and a model of the held spec is still taken."""
    worker = Worker(None, parse_urls("mqtt://127.0.0.1:1"), Topics("f"), partitions=1, worker_id="w")
    worker.model = ModelMessage("f", 1, HELD, np.zeros(HELD.n_params))
    worker.refresh_model = lambda: None  # no root checkpoint here: the held model stays
    for payload in hostile_models():
        assert_refused_in_bounded_memory(lambda msg: worker._on_model(None, None, msg), payload)
        assert worker.model.version == 1
    worker._on_model(None, None, SimpleNamespace(payload=encode_model(ModelMessage("f", 3, HELD, np.ones(HELD.n_params))),
                                                 topic="fedmq/f/model"))
    assert worker.model.version == 3


def test_the_root_judges_a_retained_model_by_its_spec_before_decoding_its_params():
    """The root decodes every model on its topic for the version that came back (its own echo): one of another spec
    is refused on its spec, not decoded whole; its own is still read."""
    root = Root(SimpleNamespace(), parse_urls("mqtt://127.0.0.1:1"), Topics("f"), HELD, RootFedBuff(HELD.n_params, 2),
                root_id="r")
    for payload in hostile_models():
        assert_refused_in_bounded_memory(lambda msg: root._on_retained(None, None, msg), payload)
        assert root.retained_version == -1
    root._on_retained(None, None, SimpleNamespace(payload=encode_model(ModelMessage("f", 3, HELD, np.ones(HELD.n_params))),
                                                  topic="fedmq/f/model"))
    assert root.retained_version == 3


def test_the_roots_status_and_metrics_say_its_uptime():
    """The root's retained status has the coordinator's `uptime_s` (seconds since it started) and its metrics
    `fedmq_uptime_seconds`, read at every scrape though the rest of the status is cached between changes (seen red
    without the field, and with the scrape's uptime left to the cache: 100 s twice)."""
    from tier.metrics import root_metrics

    root = Root(SimpleNamespace(), parse_urls("mqtt://127.0.0.1:1"), Topics("f"), HELD, RootFedBuff(HELD.n_params, 2),
                root_id="r")
    root.started_at -= 100
    status = root.status(None)
    assert 100 <= status["uptime_s"] < 160 and status["uptime_s"] == round(status["time"] - root.started_at, 3)
    first = root.metrics()["uptime_s"]
    root.started_at -= 50  # nothing the cache keys on moved: the next scrape's status is the cached one
    scraped = root.metrics()
    assert 150 <= scraped["uptime_s"] < 210 and scraped["uptime_s"] >= first + 50
    uptime = [f for f in root_metrics(scraped) if f.name == "fedmq_uptime_seconds"]
    assert [s.value for s in uptime[0].samples] == [scraped["uptime_s"]]


def test_a_links_requested_disconnect_is_not_logged_as_a_loss(mosquitto, caplog):
    """scripts/tier-up's own link to the cluster logged `lost mqtt://... (Normal disconnection)` when it closed it on
    a normal start: paho's reason for a disconnect the client asked for. Now only a real loss (the connection dropped
    under it) is a `lost` line (seen red: the close logged it)."""
    from tier.fleet import wait_until

    caplog.set_level("DEBUG", logger="tier.mqtt_link")
    link = Link(parse_urls(mosquitto.url), "test-normal-close", persistent=False)
    link.start()
    try:
        assert link.wait(10)
        link.bounce()  # a loss: the socket shut under paho
        assert wait_until(lambda: any(" lost " in r.getMessage() for r in caplog.records), 10), caplog.text
        assert link.wait(10)  # back (on the one node)
        caplog.clear()
    finally:
        link.close()
    assert not link.connected.is_set()  # on_disconnect ran for the close
    assert not any(" lost " in r.getMessage() for r in caplog.records), caplog.text
    assert any("disconnected from" in r.getMessage() and r.levelname == "DEBUG" for r in caplog.records), caplog.text
