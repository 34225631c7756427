"""Issue 18's hostile device, through the scale-out tier (issue 20).

A real 3-node NATS cluster, one partition worker and the root as processes, four honest real agents
(digits, three of them in the hostile device's partition so its per-partition norm bound has
references) and one hostile MQTT 3.1.1 client (paho, through a NATS MQTT listener) publishing on its own
update topic: undecodable bytes, an update nested 1,020 deep, a wrong-shape delta, NaN and Inf, a payload over the listener's
max_payload, a valid update replayed with its (agent, seq), and a huge-norm update. Checked: no tier
process exits, the root's model keeps moving (no gap over GAP_S while the attack runs), every refusal
the worker makes reaches the root's retained status by reason (`updates_rejected`, summed over the
partitions from their partials), the oversize payload never reaches a worker (NATS refuses it and drops
the connection; the device reconnects), and the fleet's accuracy stays near the honest fleet's.
Seen red: with the relative norm bound off in the worker (the huge update folded: no 'norm' count and
the accuracy fell), and with the partials' counts left out (no `updates_rejected` in the status).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import paho.mqtt.client as mqtt

from coordinator.evaluation import score
from fleet import spawn, stop_all
from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from protocol.tabular import write_csv
from test_hostile_wire import HOSTILE_UPDATES
from tier.cluster import partition_of
from tier.fleet import FLEET, START_S, TOPICS, ModelWatch, Tier, device_client, wait_until

EVIL = "evil-1"
HONEST = ("dev-0", "dev-4", "dev-8", "dev-1")  # the first three share the hostile device's partition (of 4)
GAP_S = 8.0  # longest the model may stand still while the attack runs
BEFORE = 8  # versions of the honest fleet alone before the attack: its baseline
ACCURACY_DROP = 0.05  # how far below the median accuracy before the attack any version after it may score
# reason the worker counts -> how many of each the attack sends
EXPECTED = {"decode": 2, "shape": 1, "non_finite": 2, "replay": 1, "norm": 1}


def _hostile_client(port: int) -> tuple[mqtt.Client, threading.Event]:
    client, connected = device_client(EVIL)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    return client, connected


def _payloads(n: int, version: int) -> list[tuple[str, bytes]]:
    """The attack, in order: (what, payload) on the hostile device's own update topic."""
    rng = np.random.default_rng(1)

    def update(seq: int, delta: codec.Encoded) -> bytes:
        return encode_update(UpdateMessage(EVIL, seq, version, 50, delta))

    fine = codec.encode(rng.normal(size=n) * 0.01, "float32", rng)
    nan = codec.Encoded("float32", n, np.full(n, np.nan, dtype="<f4").tobytes())
    inf = codec.Encoded("float32", n, np.full(n, np.inf, dtype="<f4").tobytes())
    valid = update(1, fine)
    return [
        ("undecodable", b"\xc1 not msgpack at all"),
        ("nested 1,020 deep", HOSTILE_UPDATES["quantizer nested 1020 deep"][0]),  # a RecursionError in paho's thread
        ("wrong shape", update(2, codec.encode(rng.normal(size=n + 7) * 0.01, "float32", rng))),
        ("NaN", update(3, nan)),
        ("Inf", update(4, inf)),
        ("valid", valid),
        ("replayed (agent, seq)", valid),
        ("huge norm", update(5, codec.encode(rng.normal(size=n) * 1e3, "float32", rng))),
    ]


class ScoredWatch(ModelWatch):
    """A ModelWatch that scores every new model version on the held-out digits as it arrives."""

    def __init__(self, cluster, X, y) -> None:
        self.X, self.y, self.scores = X, y, {}
        super().__init__(cluster)

    def _on_message(self, i, msg) -> None:
        super()._on_message(i, msg)
        latest = self.latest
        if latest is not None and latest.version not in self.scores:
            self.scores[latest.version] = round(score(latest.spec, latest.params, self.X, self.y)["accuracy"], 3)


def _longest_gap(watch: ModelWatch, after: int, start: float, end: float) -> float:
    """The longest time in [start, end] without a new model version (above `after`) reaching the fleet."""
    first: dict[int, float] = {}
    for seen in watch.versions:
        for t, v in seen:
            if v > after:
                first[v] = min(t, first.get(v, t))
    new = sorted(t for t in first.values() if start <= t <= end)
    steps = [start, *new, end]
    return max(b - a for a, b in zip(steps, steps[1:]))


def _rejected(watch: ModelWatch) -> dict:
    return watch.status.get("updates_rejected") or {}


def test_one_hostile_device_through_the_tier_is_counted_and_the_fleet_goes_on(tmp_path, nats_cluster):
    from simulation.datasets import load_dataset
    from simulation.partition import partition

    assert all(partition_of(a, nats_cluster.partitions) == partition_of(EVIL, nats_cluster.partitions)
               for a in HONEST[:3])
    ds = load_dataset("digits", seed=0)
    for agent, idx in zip(HONEST, partition(ds.y_train, len(HONEST), "iid", seed=0)):
        write_csv(tmp_path / f"{agent}.csv", ds.X_train[idx], ds.y_train[idx])
    classes = ",".join(str(int(c)) for c in ds.classes)
    tier = Tier(nats_cluster, tmp_path, partitions=nats_cluster.partitions, buffer_size=4,
                spec_args=("--model", "sgd-classifier", "--n-features", ds.n_features, "--classes", classes))
    watch = ScoredWatch(nats_cluster, ds.X_test, ds.y_test)
    procs, evil = [], None
    try:
        tier.start_root()
        tier.start_worker()
        urls = nats_cluster.mqtt_urls
        procs = [spawn("edge_agent", "--broker", urls[i % len(urls)], "--fleet", FLEET, "--id", agent,
                       "--data", tmp_path / f"{agent}.csv", "--seed", i, log=tmp_path / f"{agent}.log")
                 for i, agent in enumerate(HONEST)]
        # the norm bound has its references: every honest agent folded at least once, the model moving
        assert watch.wait_version_above(BEFORE, 120) is not None, tier.logs()
        port = nats_cluster.nodes[1].mqtt_port
        evil, connected = _hostile_client(port)
        assert connected.wait(30)
        model = watch.latest
        attack_from = time.monotonic()
        for what, payload in _payloads(model.spec.n_params, model.version):
            assert connected.wait(30), f"the hostile device cannot reconnect before {what}"
            evil.publish(TOPICS.update(EVIL), payload, qos=1).wait_for_publish(10)
        # over the listener's max_payload: NATS refuses it and closes the connection; it never reaches a worker
        evil.publish(TOPICS.update(EVIL), b"\x00" * (nats_cluster.max_payload + 1024), qos=1)
        assert wait_until(lambda: not connected.is_set(), 20), "NATS kept a connection that sent an oversize packet"
        assert connected.wait(30), "the hostile device never reconnected after its oversize packet"

        def counted() -> bool:
            return all(_rejected(watch).get(r, 0) >= n for r, n in EXPECTED.items())

        assert wait_until(counted, 30), (watch.status, tier.logs())
        attack_to = time.monotonic()
        assert wait_until(lambda: watch.version >= model.version + BEFORE, 60), (watch.status, tier.logs())
        gap = _longest_gap(watch, model.version, attack_from, attack_to)
        assert gap <= GAP_S, f"the model stood still {gap:.1f} s during the attack"
        assert all(p.poll() is None for p in [*tier.roots.values(), *tier.workers.values()]), tier.logs()
        assert not [p.name for p in tmp_path.glob("*.log") if "Traceback" in p.read_text(errors="replace")]
        # the honest baseline: the median accuracy of the same fleet's models before the attack; every model
        # version after it stays near that (a folded huge-norm update costs the next version ~8 points)
        honest = float(np.median([a for v, a in watch.scores.items() if 2 <= v <= model.version]))
        worst = min(a for v, a in watch.scores.items() if v > model.version)
        print(f"tier hostile: versions {model.version} -> {watch.version}, median accuracy {honest:.3f} before the "
              f"attack, worst {worst:.3f} after, longest gap {gap:.1f} s, refused {_rejected(watch)}, "
              f"accuracy by version {watch.scores}")
        assert worst >= honest - ACCURACY_DROP, (honest, worst, watch.scores)
        # the hostile device's valid update counted once, the rest never: only 'valid' is in the fold
        assert _rejected(watch).get("replay") == 1, watch.status
    finally:
        if evil is not None:
            evil.loop_stop()
            evil.disconnect()
        stop_all(procs)
        watch.close()
        tier.stop()


def test_refusals_of_a_partition_that_folds_nothing_reach_the_root_once(tmp_path, nats_node):
    """A hostile client alone (no honest agent anywhere: no partition folds anything, so no partial carries
    its counts and no model is published after the first): its refusals still reach the root's retained
    status, sent on their own by the worker after the checkpoint holding them; after a kill -9 of the worker
    and a new owner restoring the partition, one more refusal adds one, the restored counts are not added
    twice. Seen red before the counts-only messages: the status stayed at version 0 with no refusal."""
    tier = Tier(nats_node, tmp_path, partitions=nats_node.partitions)
    watch = ModelWatch(nats_node)
    evil = None
    try:
        tier.start_root()
        first = tier.start_worker()
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        evil, connected = _hostile_client(nats_node.nodes[0].mqtt_port)
        assert connected.wait(30)
        n = watch.latest.spec.n_params
        wrong = encode_update(UpdateMessage(EVIL, 1, 0, 5, codec.encode(np.ones(n + 3), "float32", np.random.default_rng(0))))
        for topic, payload in ((TOPICS.update(EVIL), b"\xc1 not msgpack"), (TOPICS.update(EVIL), wrong),
                               (TOPICS.update_chunk(EVIL), b"not a chunk")):
            evil.publish(topic, payload, qos=1).wait_for_publish(10)
        want = {"chunk": 1, "decode": 1, "shape": 1}
        assert wait_until(lambda: _rejected(watch) == want, 60), (watch.status, tier.logs())
        assert watch.version == 0, "nothing was folded, yet the model moved"
        tier.kill(first)
        second = tier.start_worker()
        assert tier.wait_up(second, START_S), tier.logs()
        evil.publish(TOPICS.update(EVIL), b"\xc1 again", qos=1).wait_for_publish(10)
        want = dict(want, decode=2)
        assert wait_until(lambda: _rejected(watch).get("decode", 0) >= 2, 90), (watch.status, tier.logs())
        assert _rejected(watch) == want, watch.status
    finally:
        if evil is not None:
            evil.loop_stop()
            evil.disconnect()
        watch.close()
        tier.stop()
