"""A secure-aggregation fleet over a real broker with the real coordinator process, and one hostile
member (issue 18.7): what tests/test_secagg.py attacks with and bench/secagg_hostile.py measures.

Each agent is its own paho client on its own network thread driving the real edge_agent/secagg.py
`SecAggClient` as edge_agent/session.py does (replies at QoS 1 from the network thread). Agents do
not train: as soon as a cohort spends an agent's delta it holds a fresh random one and announces
its key, as a real agent would after retraining, so rounds follow one another as fast as the
protocol allows. A hostile member answers like the others except for its attack:

- `garbage-shares`: its shares are random bytes (they open for nobody);
- `join-and-leave`: named in a cohort, it says it is offline and disconnects, then comes back with
  a fresh key a second later, again and again;
- `no-masked-input`: it sends its shares but never its masked input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edge_agent.secagg import SecAggClient
from protocol import secagg as sa
from protocol.topics import Topics
from protocol.transport import BrokerSettings, connect, make_client

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = ("garbage-shares", "join-and-leave", "no-masked-input")
N_PARAMS = 650  # the digits model: 64 features x 10 classes + 10 intercepts


class LiveAgent:
    """One member: a paho client and a `SecAggClient`, re-announcing a fresh delta whenever one is spent."""

    def __init__(self, agent_id: str, topics: Topics, settings: BrokerSettings, attack: str | None = None,
                 seed: int = 0) -> None:
        if attack not in (None, *ATTACKS):
            raise ValueError(f"unknown attack {attack!r}: use {', '.join(ATTACKS)}")
        self.agent_id, self.topics, self.settings, self.attack = agent_id, topics, settings, attack
        self.secure = SecAggClient(agent_id, topics)
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.leaves = 0
        self.closed = False
        self._connect()

    def _connect(self) -> None:
        self.subscribed.clear()
        self.client = make_client(self.settings, f"live-{self.topics.fleet}-{self.agent_id}", persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        connect(self.client, self.settings, timeout=10)

    def _on_connect(self, client, *args) -> None:
        client.subscribe([(t, 1) for t in self.secure.subscriptions])
        client.publish(self.topics.agent_status(self.agent_id), json.dumps({"state": "training"}), qos=1, retain=True)
        with self.lock:
            message = self.secure.announcement() or self.secure.hold(self.rng.normal(0, 0.1, N_PARAMS), 0)
        client.publish(*message[:2], qos=1, retain=message[2])

    def _on_message(self, client, userdata, msg) -> None:
        if not self.secure.owns(msg.topic) or self.closed:
            return
        kind = self.topics.secagg_of(msg.topic)
        if self.attack == "no-masked-input" and kind and kind[0] == "inbox":
            return
        with self.lock:
            replies = self.secure.on_message(msg.topic, msg.payload)
        named = msg.topic == self.topics.secagg_cohort and bool(replies)
        if named and self.attack == "join-and-leave":
            threading.Thread(target=self._leave_and_return, daemon=True).start()
            return
        if named and self.attack == "garbage-shares":
            m = sa.decode(replies[0][1], "share")
            m["to"] = {peer: os.urandom(len(v)) for peer, v in m["to"].items()}
            replies = [(replies[0][0], sa.encode("share", **{k: v for k, v in m.items() if k != "type"}), False)]
        for topic, payload, retain in replies:
            client.publish(topic, payload, qos=1, retain=retain)
        if named:  # the delta is spent: "train" a fresh one and announce it
            with self.lock:
                message = self.secure.hold(self.rng.normal(0, 0.1, N_PARAMS), 0)
            client.publish(*message[:2], qos=1, retain=message[2])

    def _leave_and_return(self) -> None:
        self.leaves += 1
        old = self.client
        old.publish(self.topics.agent_status(self.agent_id), json.dumps({"state": "offline"}), qos=1,
                    retain=True).wait_for_publish(5)
        old.disconnect()
        old.loop_stop()
        time.sleep(1.0)  # away for a second (the attack's rhythm, not a synchronisation)
        if not self.closed:
            with self.lock:
                self.secure.hold(self.rng.normal(0, 0.1, N_PARAMS), 0)  # back with a fresh key
            self._connect()

    def close(self) -> None:
        self.closed = True
        self.client.disconnect()
        self.client.loop_stop()


class StatusWatcher:
    """The newest coordinator status and every cohort's members, with a condition to wait on."""

    def __init__(self, topics: Topics, settings: BrokerSettings) -> None:
        self.topics = topics
        self.cond = threading.Condition()
        self.status: dict = {}
        self.cohorts: list[list[str]] = []
        self.client = make_client(settings, f"live-{topics.fleet}-watcher", persistent=False)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in self.filters()])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        connect(self.client, settings, timeout=10)
        if not subscribed.wait(10):
            raise TimeoutError("the watcher could not subscribe")

    def filters(self) -> list[str]:
        """What it subscribes to (a subclass may add topics and `take` them)."""
        return [self.topics.secagg_cohort, self.topics.coordinator_status]

    def take(self, topic: str, payload: bytes) -> None:
        """One message, under the condition's lock."""
        if topic == self.topics.coordinator_status and payload:
            self.status = json.loads(payload)
        elif topic == self.topics.secagg_cohort:
            self.cohorts.append([m[0] for m in sa.decode(payload, "cohort")["members"]])

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.take(msg.topic, msg.payload)
            self.cond.notify_all()

    def secagg(self) -> dict:
        with self.cond:
            return dict(self.status.get("secure_aggregation") or {})

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
                self.cond.wait(left)
            return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_coordinator(broker_url: str, topics: Topics, k: int, log_path: Path, *extra: str) -> subprocess.Popen:
    """The real coordinator process, fedbuff over secure aggregation with cohorts of `k`."""
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--broker", broker_url, "--fleet", topics.fleet, "--model", "sgd-classifier",
         "--classes", ",".join(map(str, range(10))), "--n-features", "64", "--strategy", "fedbuff",
         "--buffer-size", str(k), "--secure-aggregation", "--publish-interval", "0.2", *extra],
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_fleet(broker_url: str, host: str, port: int, workdir: Path, *, fleet: str, n_agents: int, k: int,
              attack: str | None, seconds: float, extra: tuple[str, ...] = (), probe=None) -> dict:
    """Rounds completed in `seconds` (from the first completed round on) by `n_agents` members, one
    of them (`a00`) running `attack` (None: all honest); the final secure-aggregation status, and
    what `probe()` returns when called before the coordinator stops."""
    topics = Topics(fleet)
    settings = BrokerSettings(host=host, port=port)
    coordinator = start_coordinator(broker_url, topics, k, workdir / f"coordinator-{fleet}.log", *extra)
    watcher = StatusWatcher(topics, settings)
    agents = []
    try:
        watcher.wait(lambda: watcher.status, 60, "the coordinator's status")
        agents = [LiveAgent(f"a{i:02d}", topics, settings, attack if i == 0 else None, seed=i) for i in range(n_agents)]
        watcher.wait(lambda: watcher.secagg().get("completed", 0) >= 1, 60, "a first completed round")
        first = watcher.secagg()["completed"]
        time.sleep(seconds)  # the measurement window, not a synchronisation
        sec = watcher.secagg()
        return {"attack": attack, "completed": sec["completed"] - first, "seconds": seconds, "status": sec,
                "cohorts": list(watcher.cohorts), "leaves": agents[0].leaves,
                "probe": probe() if probe is not None else None}
    finally:
        for a in agents:
            a.close()
        watcher.close()
        coordinator.terminate()
        coordinator.wait(30)
