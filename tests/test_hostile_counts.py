"""Issue 18, point 3: one agent's claimed sample counts own neither the fleet evaluation nor a buffer.

Before: the 4x-median cap on claimed counts starts once 10 agents were seen, so in a fleet of
6 one agent claiming 10^9 samples reported the fleet evaluation (accuracy 0.99999) and owned
the fedbuff mean. Now the fleet evaluation is the median over agents of each agent's newest
report (one vote per agent), and a fedbuff buffer takes each agent once (its newer update
replaces the older) with a weight of at most the buffer's lower median count
(coordinator.aggregation.capped_weights). Real mosquitto, the real coordinator and 5 real agents on
digits; the hostile agent is a client sending, for every model, 3 updates that flip the model
(delta = -2 x params) with 10^9 samples and eval_accuracy 0.99999. And with the default flags
one real agent of 6 whose deltas are sign-flipped costs under 2 points (the relative norm bound
is on by default), and so does one whose flip hides inside the bound and claims 10^9 samples.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import numpy as np
import pytest
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import TopicWatcher, real_fleet, spawn, stop_all, write_shards
from protocol import codec
from protocol.messages import UpdateMessage, decode_model, encode_update
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.mosquitto import free_port
from simulation.partition import partition

FLEET = "counts"
T = Topics(FLEET)
HONEST = 5
WAIT = 90


class HostileAgent:
    """Answers every model with `per_model` flipping updates claiming 10^9 samples and a perfect evaluation."""

    def __init__(self, port: int, per_model: int = 3) -> None:
        self.per_model = per_model
        self.sent = 0
        self.seq = int(time.time() * 1e6)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"evil-{os.getpid()}")
        self.client.on_connect = lambda c, *a: c.subscribe(T.model, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.publish(T.agent_status("evil"), json.dumps({"agent": "evil", "state": "training"}), qos=1, retain=True)
        self.client.loop_start()
        self.lock = threading.Lock()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            model = decode_model(msg.payload, fleet=FLEET)
        except Exception:
            return
        enc = codec.encode(-2.0 * np.asarray(model.params), "float32", np.random.default_rng(0))
        for _ in range(self.per_model):
            self.seq += 1
            update = UpdateMessage("evil", self.seq, model.version, 10**9, enc, {"eval_accuracy": 0.99999, "eval_loss": 0.0})
            client.publish(T.update("evil"), encode_update(update), qos=1)
            self.sent += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_one_agent_claiming_a_billion_samples_owns_neither_the_evaluation_nor_the_buffer(tmp_path, mosquitto):
    ds = load_dataset("digits", seed=0)
    shards = write_shards(tmp_path, ds, partition(ds.y_train, HONEST, "iid", seed=0))
    port = free_port()
    watcher = TopicWatcher(mosquitto.port, T.coordinator_status)
    evil = HostileAgent(mosquitto.port)
    status = lambda: watcher.json(T.coordinator_status) or {}  # noqa: E731
    try:
        with real_fleet(mosquitto, tmp_path, FLEET, ds, shards, "--strategy", "fedbuff", "--eval-csv", tmp_path / "eval.csv",
                        "--publish-interval", "0.3", "--metrics-port", port,
                        "--no-feature-stats",  # the sample claims alone, as written before statistics were the default
                        ) as run:
            # the flips do not own the mean: the fleet learns as one would without them
            final = watcher.wait_for(lambda: (s := status()).get("version", 0) >= 12
                                     and (s.get("accuracy") or 0) >= 0.85 and s, WAIT, "12 versions and accuracy >= 0.85")
            assert evil.sent >= 3 * 6, f"the hostile agent sent only {evil.sent} updates"
            # the honest agents' reports follow the held-out accuracy a version or more behind (each scores the
            # model it trained from): fresh-clone CI read 0.725 against 0.896 at version 13 while the fleet climbed
            watcher.wait_for(lambda: (s := status()).get("fleet_eval", {}).get("accuracy") is not None
                                       and abs(s["fleet_eval"]["accuracy"] - (s.get("accuracy") or 0)) < 0.15 and s,
                                       WAIT, "the agents' reported accuracy within 0.15 of the held-out one")
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        evil.close()
        watcher.close()
    assert run.code == 0
    print(f"\nversion {final['version']}: accuracy {final['accuracy']}, fleet_eval {final['fleet_eval']}, "
          f"bounded {final.get('bounded')}, hostile updates sent {evil.sent}")
    assert final["fleet_eval"]["accuracy"] < 0.99, final["fleet_eval"]  # the hostile claim is one vote of 6
    assert final["bounded"]["repeat_agent"] > 0 and final["bounded"]["weight_cap"] > 0, final["bounded"]
    assert f'fedmq_updates_bounded_total{{fleet="{FLEET}",reason="repeat_agent"}}' in metrics


@pytest.mark.timeout(7 * WAIT)  # its own waits: 3 x WAIT for 11 agents' imports, 2 x WAIT for the coordinators', WAIT
@pytest.mark.parametrize("attack, strategy, window, points", [("sign-flip", "fedasync", (60, 200), 2),
                                                             ("inflated-flip", "fedbuff", (12, 30), 2)])  # one step per buffer
def test_one_sign_flipping_agent_of_6_costs_the_default_fleet_a_few_points(tmp_path, mosquitto, monkeypatch,
                                                                           attack, strategy, window, points):
    """Default flags (the relative norm bound on): 5 honest agents and one real agent whose updates
    are distorted (tests/sign_flip_agent.py) against the same 5 honest agents alone, side by side
    on one broker. `sign-flip` (deltas x-4) under fedasync, the default strategy: with the bound off
    (`--norm-factor 0`, the old default) the flip won from about version 40 on: 0.538 against 0.958
    over versions 20-200; with it, over versions 60-120 the fleet lost 0.2-1.3 points in 9 runs here and
    2.03 once in a fresh-clone CI, over 60-200 -0.15 to 1.0 in 5 (which fleet's coordinator refused
    honest a2's outlying shard, 20-44 of its updates, moved the two means apart by about a point; in
    the flip fleet the flipper's refused norms lifted the median that judges a2. Since NormBound.shrink_to
    takes an update over the bound that agrees with the fleet's heading at the median norm, a2 had 0 of 42
    refused in the first run: bench/results/norm_lockout.json). `inflated-flip` (x-1.5, inside the bound at first, claiming 10^9 samples) under
    fedbuff: once the bound starts the flipper is refused as `norm` (its shard never enters the model, its
    honest delta grows); its cost is its 3 to 5 rows accepted in the first buffers. At 2x the buffer's median
    each held a third of a step: -1.88, -2.03, -1.42, -1.55, -3.46, -1.46 (and, with the old start order, +0.14
    to -1.87 in 6 runs; the fresh-clone CI once -2.11); at the buffer's lower median (a fifth): -1.12, -0.62,
    -1.49, -0.60, -0.44, -1.01, -0.54, alternating runs at load 12-36, so this case is held to the issue's 2
    points (seen red twice on the 2x cap). It timed out in 2
    of 4 runs while the buffer waited --buffer-timeout for a refused honest agent (Coordinator._fit_buffer).
    Without the buffer's weight cap the 10^9 claim owns every step."""
    monkeypatch.setenv("FEDMQ_TEST_ATTACK", attack)
    ds = load_dataset("digits", seed=0)
    parts = partition(ds.y_train, 6, "iid", seed=0)
    write_shards(tmp_path, ds, parts)  # a0..a5.csv and eval.csv
    # `window`: versions compared, the same stretch in both fleets (fedasync: without the bound the flip wins from ~40 on)
    watcher = TopicWatcher(mosquitto.port, "fedmq/+/coordinator/status")
    agents = TopicWatcher(mosquitto.port, "fedmq/+/agent/+/status")
    fleets = {"honest": 5, "flip": 6}
    procs = [spawn("tests.sign_flip_agent" if i == 5 else "edge_agent", "--broker", mosquitto.url, "--fleet", fleet,
                   "--id", f"a{i}", "--data", tmp_path / f"a{i}.csv", log=tmp_path / f"{fleet}-a{i}.log")
             for fleet, n in fleets.items() for i in range(n)]

    def coordinator(fleet: str):
        return spawn("coordinator", "--broker", mosquitto.url, "--fleet", fleet, "--model", "sgd-classifier",
                     "--classes", ",".join(map(str, ds.classes)), "--n-features", ds.n_features,
                     "--eval-csv", tmp_path / "eval.csv", "--publish-interval", "0.3", "--strategy", strategy,
                     "--audit-log", tmp_path / f"{fleet}-audit.jsonl",  # who was refused, with norm and limit
                     *os.environ.get("HOSTILE_TEST_COORDINATOR_ARGS", "").split(),  # seen red with "--norm-factor 0"
                     log=tmp_path / f"{fleet}-coordinator.log")

    def accuracies(fleet: str) -> list[float]:
        statuses = [json.loads(p) for t, p in watcher.history if t == Topics(fleet).coordinator_status]
        return [s["accuracy"] for s in statuses if window[0] <= s["version"] <= window[1] and s.get("accuracy") is not None]

    def versions() -> dict:
        return {f: (watcher.json(Topics(f).coordinator_status) or {}).get("version", 0) for f in ("honest", "flip")}

    try:  # the coordinators once every agent waits for the first model: at load ~28 the flip fleet's first 7
        # versions came from a1 and the hostile a5 alone, the 4 others still importing (one hostile of 2, no
        # norm bound before 3 agents: it fell to 0.118), which is not the fleet of 6 compared
        agents.wait_for(lambda: len(agents.latest) == sum(fleets.values()), 3 * WAIT, "every agent connected")
        procs += [coordinator(fleet) for fleet in fleets]
        watcher.wait_for(lambda: min(versions().values()) > 0, 2 * WAIT, "a first version in both fleets")
        watcher.wait_for(lambda: min(versions().values()) > window[1], WAIT, f"both fleets past version {window[1]}")
        flip = watcher.json(Topics("flip").coordinator_status)
    finally:
        stop_all(procs)
        watcher.close()
        agents.close()
    honest, hostile = accuracies("honest"), accuracies("flip")
    assert honest and hostile, "no scored status in the window"
    print(f"\nmean accuracy over versions {window}: honest {np.mean(honest):.4f} ({len(honest)} statuses), "
          f"with one {attack} agent {np.mean(hostile):.4f} ({len(hostile)}); flip fleet rejected {flip['rejected']}, "
          f"bounded {flip.get('bounded')}")
    assert np.mean(hostile) >= np.mean(honest) - points / 100, (np.mean(honest), np.mean(hostile))
    if attack == "sign-flip":
        assert flip["rejected"].get("norm", 0) > 0, flip["rejected"]  # the bound did it, counted
