"""Issue 20: secure aggregation inside partitions, real processes on a real 3-node JetStream cluster.

The real agent (`--secure-aggregation`, unchanged) speaks MQTT 3.1.1 to the NATS listeners; its
shares, masked inputs and reveals are mapped to its partition (tier/cluster.py), its key announcement
is read by the worker that owns that partition, so every cohort is drawn from one partition. Six
agents, three in each of two partitions, cohorts of K=3 (threshold 2), the root at --buffer-size 3.
The owner of a partition with a round in flight (read from its checkpoint) is killed -9 and a new
worker takes the partition over: the round state is in the checkpoint. At the end:

- rounds completed inside both partitions, before and after the kill; every partial the root was sent
  (tapped on its subjects) is a cohort sum: a round id, at least t members, all of one partition;
- the attack: no combination of everything the root received (and its audit log, which has no values)
  isolates one agent's delta, since every delta is in exactly one partial, of at least t members;
  no update travelled in the clear;
- the model advanced (digits accuracy of the published model) and (agent, n-th cohort) is counted once;
- central DP keeps working: each partial names the clip C the members used, no release takes an agent
  twice, and the root's epsilon equals the coordinator's accountant over the same releases.

The partition's side alone, broker-free (the worker's Partition, real agents' SecAggClient): a round's
messages go out only after the checkpoint holding it, and a new owner completes it from the checkpoint.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet import spawn, stop_all
from coordinator.privacy import CentralDP
from coordinator.strategies import FedBuff
from protocol.model_spec import ModelSpec, build_estimator
from protocol.privacy import GaussianMechanism
from protocol.tabular import write_csv
from tier.cluster import TIER_USER, partition_of, tier_password
from tier.lease import FencedRecord
from tier.nats_io import Nats
from tier.partial import decode_partial
from tier.fleet import FLEET, TOPICS, ModelWatch, Tier, read_audit, wait_until

pytest.importorskip("cryptography")

K, T = 3, 2
CLIP, SIGMA = 5.0, 0.1  # central DP at the root: the agents clip to C, the root noises each release


def test_partition_of_is_the_servers_mapping_for_updates_and_secagg_messages(nats_node):
    """The worker's hash (which partition's rounds take a key announcement) is the server's partition(N, agent)."""
    port = nats_node.nodes[0].mqtt_port
    got, done = [], threading.Event()
    ids = [f"a{i}" for i in range(24)] + ["x.y", "dev-3.b.c", "Z_9"]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-hash", protocol=mqtt.MQTTv311)
    client.username_pw_set(TIER_USER, tier_password())  # reads the partitions' subjects: a tier process

    def on_message(c, u, msg):
        got.append(msg.topic)
        if len(got) == 4 * len(ids):
            done.set()

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe([(f"fedmq/{FLEET}/upd/+/+", 1), (f"fedmq/{FLEET}/psecagg/+/+/+", 1)])
        assert subscribed.wait(20), "no SUBACK"
        for agent in ids:
            for topic in (TOPICS.update(agent), TOPICS.secagg("share", agent), TOPICS.secagg("masked", agent),
                          TOPICS.secagg("reveal", agent)):
                client.publish(topic, b"x", qos=1).wait_for_publish(10)
        assert done.wait(20), f"{len(got)} of {4 * len(ids)} arrived: {got[:10]}"
    finally:
        client.loop_stop()
        client.disconnect()
    for topic in got:
        levels = topic.split("/")
        assert levels[2] in ("upd", "psecagg"), topic  # mapped: nothing arrives on the agent's own topic
        assert int(levels[3]) == partition_of(levels[-1], nats_node.partitions), topic
    assert {t.split("/")[3] for t in got} == {"0", "1", "2", "3"}


def _agents(partitions: int) -> dict[str, int]:
    """Three agent ids in each of two partitions."""
    by_partition = collections.defaultdict(list)
    for i in range(200):
        by_partition[partition_of(f"sa{i}", partitions)].append(f"sa{i}")
    chosen = [p for p in sorted(by_partition) if len(by_partition[p]) >= K][:2]
    return {a: p for p in chosen for a in by_partition[p][:K]}


class Tap:
    """Everything of the fleet on one node, as an eavesdropper with read on fedmq/<fleet>/# sees it."""

    def __init__(self, port: int) -> None:
        self.history: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-tap", protocol=mqtt.MQTTv311)
        self.client.username_pw_set(TIER_USER, tier_password())  # the tap reads everything: the tier user
        self.client.on_connect = lambda c, *a: c.subscribe(f"fedmq/{FLEET}/#", 1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(20), "the tap could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.history.append((msg.topic, msg.payload))

    def topics(self, kind: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.history if t.split("/")[2] == kind]

    def partials(self) -> list[tuple[str, bytes]]:
        """The partial aggregates, not the partitions' counts beside them (partial/<P>/counts)."""
        return [(t, p) for t, p in self.topics("partial") if not t.endswith("/counts")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _round_in_flight(nats: Nats, partitions: set[int]) -> tuple[int, str] | None:
    """(partition, owner) of a populated partition whose checkpoint holds a round in flight."""
    for p in sorted(partitions):
        try:
            state = FencedRecord(nats, f"p{p}").read(timeout=2) or {}
        except Exception:
            continue
        rounds = ((state.get("secagg") or {}).get("rounds") or {})
        if rounds.get("round") is not None:
            return p, state["owner"]
    return None


def _identifiable(partials: list) -> list:
    """The contributions (agent, n-th cohort) some linear combination of the partials isolates."""
    columns = sorted({(a, s) for p in partials for a, s, _ in p.covers})
    index = {c: i for i, c in enumerate(columns)}
    m = np.zeros((len(partials), len(columns)))
    for row, p in enumerate(partials):
        for a, s, _ in p.covers:
            m[row, index[(a, s)]] = 1
    rank = np.linalg.matrix_rank(m)
    return [c for c, i in index.items() if np.linalg.matrix_rank(np.vstack([m, np.eye(len(columns))[i]])) == rank]


def test_cohorts_inside_partitions_the_root_sees_only_their_sums_and_a_takeover_resumes_the_round(
        tmp_path, nats_cluster):
    from simulation.datasets import load_dataset
    from simulation.partition import partition

    ds = load_dataset("digits", seed=0)
    agents = _agents(nats_cluster.partitions)
    populated = set(agents.values())
    shards = partition(ds.y_train, len(agents), "iid", seed=0)
    for agent, idx in zip(agents, shards):
        write_csv(tmp_path / f"{agent}.csv", ds.X_train[idx], ds.y_train[idx])
    spec = ModelSpec("sgd-classifier", ds.n_features, tuple(int(c) for c in ds.classes))
    tier = Tier(nats_cluster, tmp_path, partitions=nats_cluster.partitions, buffer_size=K,
                spec_args=("--model", "sgd-classifier", "--n-features", ds.n_features,
                           "--classes", ",".join(map(str, spec.classes))),
                root_args=("--secure-aggregation", "--secagg-threshold", T, "--secagg-timeout", "5",
                           "--dp-mode", "central", "--dp-clip", CLIP, "--dp-noise", SIGMA))
    watch = ModelWatch(nats_cluster)
    tap = Tap(nats_cluster.nodes[0].mqtt_port)
    nats = Nats(nats_cluster.nats_urls, FLEET, replicas=nats_cluster.replicas)
    procs = []
    try:
        tier.start_root()
        tier.start_worker()
        tier.start_worker()
        assert watch.wait_version_above(-1, 120) is not None, "no retained model from the root\n" + tier.logs()
        urls = nats_cluster.mqtt_urls
        procs = [spawn("edge_agent", "--broker", urls[i % len(urls)], "--fleet", FLEET, "--id", agent,
                       "--data", tmp_path / f"{agent}.csv", "--secure-aggregation", "--poll-interval", "0.2",
                       log=tmp_path / f"{agent}.log") for i, agent in enumerate(agents)]

        def cohorts():
            return (watch.status.get("secure_aggregation") or {}).get("cohorts", 0)

        assert wait_until(lambda: cohorts() >= 2, 180), f"no cohort completed: {watch.status}\n" + tier.logs()
        found = []
        assert wait_until(lambda: found.append(_round_in_flight(nats, populated)) or found[-1], 60), \
            "no round in flight seen in a checkpoint\n" + tier.logs()
        partition_killed, owner = found[-1]
        at_kill, killed_at = cohorts(), time.time()
        tier.kill(owner)
        tier.start_worker()

        def after_kill() -> set[int]:
            return {q.partition for q in (decode_partial(p, spec.n_params) for _, p in tap.partials())
                    if q.created > killed_at}

        assert wait_until(lambda: cohorts() >= at_kill + 4 and populated <= after_kill(), 180), \
            f"rounds did not go on in both partitions after the kill: {watch.status}\n" + tier.logs()
        stop_all(procs)
        procs = []

        def settled() -> bool:  # the root's status names every release in the audit log (the last buffer's too)
            releases = (watch.status.get("privacy") or {}).get("releases")
            return releases is not None and releases == len({r["version"] for r in read_audit(tier.audit)})

        assert wait_until(settled, 30), f"the status never caught up with the audit log: {watch.status}"
        status = watch.status
    finally:
        stop_all(procs)
        tier.stop()
        watch.close()
        tap.close()
        nats.close()

    partials = [decode_partial(p, spec.n_params) for _, p in tap.partials()]
    partials = list({(p.partition, p.seq): p for p in partials}.values())  # a republished partial is one
    assert partials, "the tap saw no partial"
    for p in partials:  # a cohort sum, of one partition's agents
        assert p.round is not None and len(p.round) == 16, p
        assert p.count >= T and p.weight == p.count and p.clip == CLIP, p
        assert {partition_of(a, nats_cluster.partitions) for a, _, _ in p.covers} == {p.partition}, p.covers
    assert {p.partition for p in partials} == populated
    assert not tap.topics("upd") and not tap.topics("update"), "an update travelled in the clear"
    assert _identifiable(partials) == [], "the root's inputs isolate an agent's delta"

    records = read_audit(tier.audit)
    counted = collections.Counter((r["agent"], r["seq"]) for r in records)
    assert records and max(counted.values()) == 1, [k for k, v in counted.items() if v > 1]
    assert all(r["partition"] == agents[r["agent"]] for r in records)
    log = (tmp_path / f"{owner}.log").read_text(errors="replace")
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("worker*.log"))
    assert "resumed round" in logs, f"the round in flight in partition {partition_killed} was not resumed\n{log[-2000:]}"

    # central DP: the root's epsilon is the coordinator's accountant over the same releases (version -> members)
    releases = collections.defaultdict(list)
    for r in records:
        releases[r["version"]].append(r["agent"])
    twin = CentralDP(FedBuff(K), GaussianMechanism(CLIP, SIGMA), 1e-5)
    for version in sorted(releases):
        assert len(set(releases[version])) == len(releases[version]), f"release {version} takes an agent twice"
        twin.release(np.zeros(1), releases[version])
    privacy = status["privacy"]
    assert privacy["releases"] == twin.releases and privacy["epsilon"] == pytest.approx(twin.report()["epsilon"])

    model = watch.latest
    est = build_estimator(model.spec, model.params)
    accuracy = float(np.mean(est.predict(ds.X_test) == ds.y_test))
    print(f"{len(partials)} cohort sums from partitions {sorted(populated)}, killed the owner of p{partition_killed} "
          f"mid-round, model version {model.version}, accuracy {accuracy:.3f}")
    assert accuracy >= 0.8, accuracy


SECAGG = {"k": K, "threshold": T, "clip": 1.0, "clip_target": None, "timeout": 5.0, "grace": 2.0, "backoff": 30.0,
          "l2_clip": None, "dp": None}


class _Record:
    """A partition checkpoint whose writes can be made to fail (a node down), msgpack round-tripped as in KV."""

    def __init__(self) -> None:
        self.fail = False
        self.written: list[dict] = []

    def write(self, state: dict) -> None:
        import msgpack

        if self.fail:
            raise TimeoutError("no quorum")
        self.written.append(msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False))


def _partition(partials: list, published: list):
    from types import SimpleNamespace

    from coordinator.staleness import Constant
    from protocol.messages import ModelMessage
    from tier.worker import Partition

    spec = ModelSpec("sgd-regressor", 9, ())
    nats = SimpleNamespace(prefix="fedmq", fleet=FLEET, call=lambda fn, timeout: fn(),
                           js=SimpleNamespace(publish=lambda subject, body, headers=None: partials.append(body)))
    worker = SimpleNamespace(topics=TOPICS, model=ModelMessage(FLEET, 0, spec, np.zeros(spec.n_params)),
                             staleness=Constant(), max_staleness=10, max_norm=1e6, dp=None, secagg=SECAGG, nats=nats,
                             worker_id="w", max_held_chunks=64, chunk_timeout=60.0, partitions=1)
    part = Partition(worker, 0, SimpleNamespace(epoch=1, revision=1, valid=True))
    part.adopt(worker.model)
    part.record = _Record()
    acked = []
    part.link = SimpleNamespace(connection=1, client=SimpleNamespace(
        publish=lambda topic, payload, qos, retain: published.append((topic, payload, retain)),
        ack=lambda mid, qos: acked.append(mid)))
    return part, spec, acked


_MIDS = itertools.count(1)


def _to_partition(part, replies) -> list[int]:
    """Agents' secure-aggregation messages as the cluster maps them to the partition's session; their mids."""
    from types import SimpleNamespace

    mids = []
    for topic, payload, _ in replies:
        kind, agent = TOPICS.secagg_of(topic)
        mids.append(next(_MIDS))
        part._on_message(None, None, SimpleNamespace(topic=f"fedmq/{FLEET}/psecagg/0/{kind}/{agent}", payload=payload,
                                                     retain=False, mid=mids[-1], qos=1))
    return mids


def test_a_partition_sends_its_rounds_messages_only_after_the_checkpoint_and_a_new_owner_completes_the_round():
    """Broker-free, the worker's Partition with real agents' SecAggClient: the cohort goes out only once a
    checkpoint holding its round is written; the shares' acks only with it; a new owner restored from the
    checkpoint written at the masked stage resends the inboxes and, from the redelivered masked inputs,
    completes the round once: its partial is the members' sum, weight 1 each, with the round id."""
    from edge_agent.secagg import SecAggClient

    agents = [a for a in (f"u{i}" for i in range(100)) if partition_of(a, 4) == 0][:K]
    clients = {a: SecAggClient(a, TOPICS) for a in agents}
    partials, published = [], []
    part, spec, acked = _partition(partials, published)
    rng = np.random.default_rng(3)
    deltas = {a: rng.normal(0, 0.1, spec.n_params) for a in agents}
    for a in agents:  # the worker hands each key announcement to the partition's rounds; every agent reads all
        topic, payload, _ = clients[a].hold(deltas[a], 0)
        part.secagg.handle(topic, payload)
        for c in clients.values():
            c.on_message(topic, payload)

    def deliver(wire) -> list:
        out = []
        for topic, payload, _ in wire:
            for c in clients.values():
                if c.owns(topic):
                    out += c.on_message(topic, payload)
        return out

    part.record.fail = True
    with pytest.raises(TimeoutError):
        part.commit()  # the cohort is formed, but its checkpoint is not written: nothing goes out
    assert published == [] and part.record.written == []
    part.record.fail = False
    part.commit()
    assert [t for t, _, _ in published] == [TOPICS.secagg_cohort]
    assert part.record.written[-1]["secagg"]["rounds"]["round"]["stage"] == "shares"
    share_mids = _to_partition(part, deliver(published))
    published.clear()
    assert not set(share_mids) & set(acked)
    part.commit()  # the inboxes, after the checkpoint at stage masked; the shares acknowledged with it
    assert sorted(t for t, _, _ in published) == sorted(TOPICS.secagg("inbox", a) for a in agents)
    assert set(share_mids) <= set(acked)
    state = part.record.written[-1]
    assert state["secagg"]["rounds"]["round"]["stage"] == "masked"
    masked = deliver(published)  # the masked inputs reach the session; the owner dies before acking them

    partials2, published2 = [], []
    part2, _, _ = _partition(partials2, published2)
    part2.secagg.restore(state["secagg"])  # what Partition.start does with the checkpoint
    part2.commit()
    assert sorted(t for t, _, _ in published2) == sorted(TOPICS.secagg("inbox", a) for a in agents)  # sent again
    assert deliver(published2) == []  # every agent answers a round once
    _to_partition(part2, masked)  # NATS redelivers them to the new owner
    published2.clear()
    part2.commit()
    assert [t for t, _, _ in published2] == [TOPICS.secagg_unmask]
    _to_partition(part2, deliver(published2))
    part2.commit()
    assert len(partials2) == 1 and partials == []
    p = decode_partial(partials2[0], spec.n_params)
    assert p.round == state["secagg"]["rounds"]["round"]["id"] and p.count == K and p.weight == K
    assert sorted(a for a, _, _ in p.covers) == agents and {s for _, s, _ in p.covers} == {1}
    assert np.allclose(p.weighted_sum, sum(deltas.values()), atol=K / part2.secagg.rounds.scale)


def test_a_root_under_secure_aggregation_folds_only_cohort_sums():
    """The root's side, broker-free: a partial without a round id (a worker folding clear updates) or with
    fewer members than the threshold is dropped, and the partition's next cohort sum is still folded."""
    from types import SimpleNamespace

    from tier.mqtt_link import parse_urls
    from tier.partial import Partial, encode_partial
    from tier.root import Root
    from tier.steps import RootFedBuff

    spec = ModelSpec("sgd-regressor", 9, ())
    root = Root(SimpleNamespace(), parse_urls("mqtt://127.0.0.1:1"), TOPICS, spec, RootFedBuff(spec.n_params, K), root_id="r",
                secagg=SECAGG)
    n = spec.n_params

    def partial(seq, count, round_id):
        covers = [(f"a{i}", seq, 0) for i in range(count)]
        return encode_partial(Partial(0, 1, seq, np.ones(n) * count, float(count), count, covers, round=round_id))

    lines = []
    assert root._fold(partial(1, K, None), lines) == "rejected"  # clear updates' sum: never folded
    assert root._fold(partial(2, T - 1, b"r" * 16), lines) == "rejected"  # one member's "cohort"
    assert root._fold(partial(3, K, b"s" * 16), lines) == "folded"
    assert root.hwm == {"0": 3} and root.rejected == 2 and root.cohorts == 1 and root.folded == K
    assert {line.count('"pseq": 3') for line in lines} == {1}
