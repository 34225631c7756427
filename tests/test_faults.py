"""Faults with real processes: broker and coordinator killed with SIGKILL, late agents, bursts,
oversized payloads, bad configuration. Marked slow; CI runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from edge_agent.agent import Agent
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from fleet import ROOT, TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.tabular import write_csv
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.mosquitto import Mosquitto, free_port
from simulation.partition import partition

pytestmark = pytest.mark.slow
FLEET = "faults"
T = Topics(FLEET)
DS = load_dataset("digits", seed=0)
CLASSES = ",".join(map(str, DS.classes))


def write_parts(tmp_path, n):
    paths = []
    for i, rows in enumerate(partition(DS.y_train, n, "iid", seed=1)):
        paths.append(tmp_path / f"a{i}.csv")
        write_csv(paths[-1], DS.X_train[rows], DS.y_train[rows])
    return paths


def coordinator(tmp_path, broker, *extra, name="coordinator"):
    return spawn("coordinator", "--broker", broker.url, "--fleet", FLEET, "--model", "sgd-classifier",
                 "--n-features", 64, "--classes", CLASSES, "--checkpoint-dir", tmp_path / "ckpt",
                 "--audit-log", tmp_path / "audit.jsonl", "--publish-interval", "0.3", "--keepalive", "5",
                 *extra, log=tmp_path / f"{name}.log")


def agents(tmp_path, broker, paths, *extra):
    return [spawn("edge_agent", "--broker", broker.url, "--fleet", FLEET, "--id", f"a{i}", "--data", p,
                  "--keepalive", "5", "--log-level", "INFO", *extra, log=tmp_path / f"a{i}.log")
            for i, p in enumerate(paths)]


def status(watcher):
    return watcher.json(T.coordinator_status) or {}


def model_versions(watcher):
    return [decode_model(p).version for topic, p in watcher.history if topic == T.model and p]


def sent_seqs(tmp_path, n):
    """(agent, seq) of every update the agents handed to the broker, from their logs."""
    sent = set()
    for i in range(n):
        for seq in re.findall(r"sent update seq (\d+)", (tmp_path / f"a{i}.log").read_text()):
            sent.add((f"a{i}", int(seq)))
    return sent


def audit(tmp_path):
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines() if line.strip()]


def test_broker_killed_and_restarted(tmp_path):
    broker = Mosquitto(tmp_path / "broker", persistence=True,
                       extra_conf="autosave_on_changes true\nautosave_interval 1\n")
    broker.start()
    paths = write_parts(tmp_path, 3)
    coord = coordinator(tmp_path, broker)
    fleet = agents(tmp_path, broker, paths)
    watcher = TopicWatcher(broker.port, T.everything)
    try:
        watcher.wait_for(lambda: status(watcher).get("accepted", 0) >= 10, 30, "updates before the crash")
        broker.kill()
        broker.start()  # same port, same persistence file
        before = status(watcher)["version"]
        watcher.wait_for(lambda: status(watcher).get("version", 0) >= before + 10, 60,
                         "training to continue after the broker restart")
    finally:
        for p in fleet:
            stop(p)
        stop(coord)
        watcher.close()
        broker.stop()
    versions = model_versions(watcher)
    assert versions == sorted(versions), "model versions went backwards"
    # every update an agent handed to the broker was accepted once or refused with a reason
    records = audit(tmp_path)
    accepted = Counter((r["agent"], r["seq"]) for r in records if r["outcome"] == "accepted")
    assert max(accepted.values()) == 1, "an update was applied twice"
    outcomes = {(r["agent"], r["seq"]) for r in records if "agent" in r}
    lost = sent_seqs(tmp_path, 3) - outcomes
    assert not lost, f"updates sent but never seen by the coordinator: {sorted(lost)[:5]}"
    assert all(r["outcome"] in ("accepted", "replay") for r in records), Counter(r["outcome"] for r in records)


def test_coordinator_killed_and_restarted(tmp_path, mosquitto):
    paths = write_parts(tmp_path, 3)
    coord = coordinator(tmp_path, mosquitto)
    fleet = agents(tmp_path, mosquitto, paths)
    watcher = TopicWatcher(mosquitto.port, T.everything)
    try:
        watcher.wait_for(lambda: status(watcher).get("version", 0) >= 10, 30, "progress before the crash")
        coord.kill()  # SIGKILL: no final checkpoint
        coord.wait(10)
        last_published = max(model_versions(watcher))
        restarted_at = time.time()
        coord = coordinator(tmp_path, mosquitto, name="coordinator2")
        watcher.wait_for(lambda: status(watcher).get("started_at", 0) >= restarted_at, 30, "the restarted coordinator")
        assert status(watcher)["version"] >= last_published  # resumed from its checkpoint
        resumed = status(watcher)["version"]
        watcher.wait_for(lambda: status(watcher)["version"] >= resumed + 10, 30, "agents to carry on unattended")
    finally:
        for p in fleet:
            stop(p)
        stop(coord)
        watcher.close()
    versions = model_versions(watcher)
    assert versions == sorted(versions), "model versions went backwards"


def _late_update(model_payload: bytes, seed: int) -> bytes:
    """The real agent code path: an update trained on an old model, held back."""
    rows = partition(DS.y_train, 10, "iid", seed=seed)[0]
    agent = Agent(f"late{seed}", T, ArraySource(DS.X_train[rows], DS.y_train[rows]), LocalTrainer(random_state=seed))
    agent.on_model(model_payload)
    assert agent.due()
    return agent.make_update()


def test_late_agents_are_weighted_or_dropped_by_staleness(tmp_path, mosquitto):
    paths = write_parts(tmp_path, 3)
    coord = coordinator(tmp_path, mosquitto, "--max-staleness", "30")
    watcher = TopicWatcher(mosquitto.port, T.everything)
    fleet = []
    try:
        old = watcher.wait_for(lambda: watcher.latest.get(T.model), 20, "the first model")
        v0 = decode_model(old).version
        moderate, too_old = _late_update(old, 1), _late_update(old, 2)
        fleet = agents(tmp_path, mosquitto, paths)
        watcher.wait_for(lambda: status(watcher).get("version", 0) >= v0 + 5, 30, "the fleet to move on")
        watcher.client.publish(T.update("late1"), moderate, qos=1).wait_for_publish(5)
        watcher.wait_for(lambda: status(watcher).get("version", 0) >= v0 + 40, 60, "staleness past the maximum")
        watcher.client.publish(T.update("late2"), too_old, qos=1).wait_for_publish(5)
        watcher.wait_for(lambda: status(watcher).get("rejected", {}).get("too_stale", 0) >= 1, 20, "too_stale counted")
    finally:
        for p in fleet:
            stop(p)
        stop(coord)
        watcher.close()
    outcome = {r["agent"]: r for r in audit(tmp_path) if r.get("agent", "").startswith("late")}
    assert outcome["late1"]["outcome"] == "accepted" and 5 <= outcome["late1"]["staleness"] <= 30
    assert outcome["late2"]["outcome"] == "too_stale" and outcome["late2"]["staleness"] > 30


def test_burst_never_publishes_faster_than_the_interval(tmp_path, mosquitto):
    interval = 1.0
    coord = coordinator(tmp_path, mosquitto, "--publish-interval", str(interval), "--strategy", "fedasync")
    watcher = TopicWatcher(mosquitto.port, T.everything)
    try:
        first = watcher.wait_for(lambda: watcher.latest.get(T.model), 20, "the first model")
        payloads = [_late_update(first, seed) for seed in range(3)]
        # 300 updates from 3 "agents" as fast as possible: rewrap with fresh seqs
        from protocol.messages import decode_update, encode_update
        from dataclasses import replace

        burst = [(T.update(f"late{k}"), encode_update(replace(decode_update(p), seq=decode_update(p).seq + i + 1)))
                 for i in range(100) for k, p in enumerate(payloads)]
        start = time.monotonic()
        for topic, payload in burst:
            watcher.client.publish(topic, payload, qos=1)
        watcher.wait_for(lambda: status(watcher).get("accepted", 0) >= len(burst) - 10, 30, "the burst to be handled")
        watcher.wait_for(lambda: False or status(watcher).get("pending", 0) == 0 and
                         decode_model(watcher.latest[T.model]).version == status(watcher)["version"], 10, "final publish")
        elapsed = time.monotonic() - start
    finally:
        stop(coord)
        watcher.close()
    models = [(t, p) for t, p in watcher.history if t == T.model]
    assert len(models) - 1 <= elapsed / interval + 2, f"{len(models) - 1} models in {elapsed:.1f} s"


def test_oversized_payloads_refused_by_broker_and_coordinator(tmp_path):
    broker = Mosquitto(tmp_path / "broker", extra_conf="message_size_limit 100000\n")
    broker.start()
    coord = coordinator(tmp_path, broker, "--max-message-bytes", "20000")
    watcher = TopicWatcher(broker.port, T.everything)
    try:
        watcher.wait_for(lambda: watcher.latest.get(T.model), 20, "the first model")
        watcher.client.publish(T.update("big"), b"\x00" * 200_000, qos=1)  # over the broker's limit: dropped there
        watcher.client.publish(T.update("big"), b"\x00" * 50_000, qos=1)  # passes the broker, not the coordinator
        watcher.client.publish(T.update("big"), b"marker", qos=1)
        watcher.wait_for(lambda: status(watcher).get("rejected", {}).get("decode", 0) >= 1, 20, "the marker")
        assert status(watcher)["rejected"] == {"oversize": 1, "decode": 1}
    finally:
        stop(coord)
        watcher.close()
        broker.stop()


@pytest.mark.parametrize(
    "module, args, code, message",
    [
        ("coordinator", ["--broker", "mqtt://127.0.0.1:{port}", "--fleet", "f", "--model", "sgd-classifier",
                         "--n-features", "4", "--classes", "0,1"], 1, "cannot reach broker"),
        ("coordinator", ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "svm", "--n-features", "4"], 2, "invalid choice"),
        ("coordinator", ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier",
                         "--n-features", "4", "--staleness", "hinge:1"], 2, "staleness"),
        ("coordinator", ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier",
                         "--n-features", "4", "--classes", "0,1", "--eval-csv", "/nonexistent.csv"], 2, "no such file"),
        ("coordinator", ["--config", "/nonexistent.toml"], 2, "config file not found"),
        ("edge_agent", ["--broker", "http://x", "--fleet", "f", "--id", "a", "--data", "x.csv"], 2, "mqtt://"),
    ],
)
def test_bad_configuration_is_one_line_and_nonzero(module, args, code, message):
    args = [a.format(port=free_port()) for a in args]
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == code
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
