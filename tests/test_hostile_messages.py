"""One hostile message against real processes: the coordinator and an agent keep their memory.

Issue 10: a 4 MiB update made of empty msgpack arrays took the coordinator from 128 to 438 MB,
an 8 MB model message of the same kind took an agent to 749 MB. Each test starts the real
process on a real mosquitto, reads its peak RSS (VmHWM) once it is up, sends the payload,
waits for the process to have handled it (an event on the broker, not a sleep), and reads the
peak again. Set FEDMQ_PRINT_RSS=1 to print the figures.
"""

from __future__ import annotations

import json
import os

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet import TopicWatcher, spawn, stop
from protocol.messages import MAX_MESSAGE_BYTES, ModelMessage, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from protocol.topics import Topics

T = Topics("hostile")
MIB = 1024 * 1024
TIMEOUT = 60


def empty_arrays(size: int) -> bytes:
    """One array32 of empty arrays, `size` bytes in all."""
    n = size - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def nested_empty_arrays(size: int) -> bytes:
    """An array32 of fixarrays of 15 empty arrays: no container longer than 15 below the top."""
    n = (size - 5) // 16
    return b"\xdd" + n.to_bytes(4, "big") + (b"\x9f" + b"\x90" * 15) * n


def tree_of_empty_arrays(size: int) -> bytes:
    """Fixarrays of 15 all the way down (no long container at all), cut to about `size` bytes."""
    leaf = b"\x9f" + b"\x90" * 15  # 16 bytes, 16 values
    level = leaf
    while len(level) * 15 + 1 <= size:
        level = b"\x9f" + level * 15
    return level


def hostile_model_map(size: int) -> bytes:
    """A model map with a valid header whose spec's classes fill `size` bytes with small integers."""
    pack = lambda v: msgpack.packb(v, use_bin_type=True)  # noqa: E731
    head = b"\x87" + b"".join(pack(k) + pack(v) for k, v in (
        ("format", 2), ("type", "model"), ("fleet", T.fleet), ("version", 1), ("time", 0.0), ("params", b"")))
    head += pack("spec") + b"\x84" + b"".join(pack(k) + pack(v) for k, v in (
        ("estimator", "sgd-classifier"), ("n_features", 2), ("hyperparameters", {}))) + pack("classes")
    n = size - len(head) - 5
    return head + b"\xdd" + n.to_bytes(4, "big") + b"\x00" * n


PAYLOADS = {"empty-arrays": empty_arrays, "nested-empty-arrays": nested_empty_arrays,
            "tree-of-empty-arrays": tree_of_empty_arrays}


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process has had, in MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def report(name: str, before: float, after: float) -> None:
    if os.environ.get("FEDMQ_PRINT_RSS"):
        print(f"\n{name}: peak RSS {before:.1f} MB before, {after:.1f} MB after (+{after - before:.1f})")


def publisher(broker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{os.getpid()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_4_mib_hostile_update_keeps_the_coordinator_under_200_mb(mosquitto, tmp_path, kind):
    watcher = TopicWatcher(mosquitto.port, T.coordinator_status)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                        "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9", "--publish-interval", "0.2",
                        "--no-feature-stats",  # hand-made updates, no agent sends statistics: without this the first model waits for them
                        log=tmp_path / "coordinator.log")
    client = publisher(mosquitto)
    try:
        watcher.wait_for(lambda: watcher.json(T.coordinator_status), TIMEOUT, "the coordinator's status")
        before = peak_rss_mb(coordinator.pid)
        payload = PAYLOADS[kind](4 * MIB)
        assert len(payload) <= 4 * MIB
        client.publish(T.update("a1"), payload, qos=1).wait_for_publish(TIMEOUT)
        status = watcher.wait_for(
            lambda: (s := watcher.json(T.coordinator_status)) and sum(s["rejected"].values()) and s, TIMEOUT,
            "the hostile update counted as rejected")
        after = peak_rss_mb(coordinator.pid)
        report(f"coordinator, 4 MiB update of {kind}", before, after)
        assert set(status["rejected"]) == {"decode"}, status
        assert after < 200, f"coordinator peak RSS {after:.0f} MB (was {before:.0f} MB before the update)"
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        assert stop(coordinator) == 0


@pytest.mark.parametrize("kind", sorted(PAYLOADS) + ["model-map-with-8-mb-of-classes"])
def test_an_8_mb_hostile_model_keeps_an_agent_under_its_floor_plus_40_mb(mosquitto, tmp_path, kind):
    rng = np.random.default_rng(0)
    write_csv(tmp_path / "a1.csv", rng.normal(size=(50, 4)), rng.integers(0, 3, 50))
    watcher = TopicWatcher(mosquitto.port, f"{T.prefix}/{T.fleet}/#")
    agent = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", T.fleet, "--id", "a1",
                  "--data", tmp_path / "a1.csv", "--status-interval", 0, log=tmp_path / "agent.log")
    client = publisher(mosquitto)
    try:
        watcher.wait_for(lambda: watcher.json(T.agent_status("a1")), TIMEOUT, "the agent's status")
        floor = peak_rss_mb(agent.pid)
        size = MAX_MESSAGE_BYTES  # the broker's size limit: the largest message that can reach the agent
        payload = hostile_model_map(size) if kind.startswith("model-map") else PAYLOADS[kind](size)
        assert len(payload) <= size
        client.publish(T.model, payload, qos=1).wait_for_publish(TIMEOUT)
        # then a real model: once the agent's update for it arrives, the hostile one was handled
        spec = ModelSpec("sgd-classifier", 4, (0, 1, 2))
        real = encode_model(ModelMessage(T.fleet, 1, spec, np.zeros(spec.n_params)))
        client.publish(T.model, real, qos=1).wait_for_publish(TIMEOUT)
        watcher.wait_for(lambda: T.update("a1") in watcher.latest, TIMEOUT, "the agent's update for the real model")
        after = peak_rss_mb(agent.pid)
        report(f"agent, 8 MiB model of {kind}", floor, after)
        assert after < floor + 40, f"agent peak RSS {after:.0f} MB, floor {floor:.0f} MB"
        assert agent.poll() is None
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        assert stop(agent) == 0
    assert "ignoring an unusable model message" in (tmp_path / "agent.log").read_text()


# --- odd models: refused in one line, the agent keeps waiting for a usable one ----------------

def raw_model(version: int, classes: list, hyperparameters: dict, n_features: int = 4) -> bytes:
    """A model message built by hand: ModelSpec itself refuses what these tests send."""
    rows = 1 if len(classes) == 2 else len(classes)
    params = np.zeros(rows * n_features + rows, dtype="<f4").tobytes()
    return msgpack.packb({"format": 2, "type": "model", "fleet": T.fleet, "version": version, "time": 0.0,
                          "spec": {"estimator": "sgd-classifier", "n_features": n_features, "classes": classes,
                                   "hyperparameters": hyperparameters}, "params": params}, use_bin_type=True)


def wait_for_log(path, text: str, timeout: float = TIMEOUT) -> None:
    """Poll the process's log for a line: the refusal of a model is said only there."""
    import time

    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s: {path.read_text()[-2000:]}"
        time.sleep(0.05)  # a log file has no event to wait on


def start_agent(mosquitto, tmp_path, *flags, rows: int = 50):
    rng = np.random.default_rng(0)
    write_csv(tmp_path / "a1.csv", rng.normal(size=(rows, 4)), rng.integers(0, 3, rows))
    watcher = TopicWatcher(mosquitto.port, f"{T.prefix}/{T.fleet}/#")
    agent = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", T.fleet, "--id", "a1",
                  "--data", tmp_path / "a1.csv", "--status-interval", 0, *flags,
                  log=tmp_path / "agent.log")
    watcher.wait_for(lambda: watcher.json(T.agent_status("a1")), TIMEOUT, "the agent's status")
    return agent, watcher


@pytest.mark.parametrize("hyperparameters", [{"loss": "bogus"}, {"penalty": "l3"}, {"learning_rate": "fast"},
                                             {"alpha": -1.0}, {"learning_rate": "constant", "eta0": 0.0}])
def test_a_model_with_unusable_hyperparameters_is_refused_and_the_agent_waits(mosquitto, tmp_path, hyperparameters):
    """Issue 10: an unknown loss string raised KeyError in the agent, which exited 1 on every restart."""
    agent, watcher = start_agent(mosquitto, tmp_path)
    client = publisher(mosquitto)
    try:
        client.publish(T.model, raw_model(1, [0, 1, 2], hyperparameters), qos=1).wait_for_publish(TIMEOUT)
        wait_for_log(tmp_path / "agent.log", "refused by scikit-learn")
        client.publish(T.model, raw_model(2, [0, 1, 2], {}), qos=1).wait_for_publish(TIMEOUT)
        watcher.wait_for(lambda: T.update("a1") in watcher.latest, TIMEOUT, "an update for the usable model")
        assert agent.poll() is None
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        assert stop(agent) == 0
    log = (tmp_path / "agent.log").read_text()
    refusals = [line for line in log.splitlines() if "refused by scikit-learn" in line]
    assert len(refusals) == 1 and "Traceback" not in log, log
    assert any(f"'{name}' parameter" in refusals[0] for name in hyperparameters), refusals


def test_a_30000_class_model_is_refused_by_max_classes_and_the_agent_stays_responsive(mosquitto, tmp_path):
    """Issue 10: a 30,000-class model wedged an agent (no update in 60 s, SIGTERM ignored)."""
    agent, watcher = start_agent(mosquitto, tmp_path)
    client = publisher(mosquitto)
    try:
        client.publish(T.model, raw_model(1, list(range(30_000)), {}), qos=1).wait_for_publish(TIMEOUT)
        wait_for_log(tmp_path / "agent.log", "(--max-classes)", 30)
        client.publish(T.model, raw_model(2, [0, 1, 2], {}), qos=1).wait_for_publish(TIMEOUT)
        watcher.wait_for(lambda: T.update("a1") in watcher.latest, 30, "an update for the usable model")
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        assert stop(agent) == 0
    log = (tmp_path / "agent.log").read_text()
    assert "the model has 30000 classes, this agent accepts at most 1000 (--max-classes)" in log, log


def test_sigterm_is_honoured_within_the_stop_timeout_even_mid_round(mosquitto, tmp_path):
    """A round allowed to be long (30,000 classes, --max-classes raised): SIGTERM still ends the agent."""
    import time

    agent, watcher = start_agent(mosquitto, tmp_path, "--max-classes", 40_000, "--stop-timeout", 2, rows=400)
    client = publisher(mosquitto)
    try:
        client.publish(T.model, raw_model(1, list(range(30_000)), {}), qos=1).wait_for_publish(TIMEOUT)
        watcher.wait_for(lambda: (watcher.json(T.agent_status("a1")) or {}).get("state") == "training", TIMEOUT,
                         "the agent training")
        asked = time.monotonic()
        agent.terminate()
        code = agent.wait(30)
        took = time.monotonic() - asked
        if os.environ.get("FEDMQ_PRINT_RSS"):
            print(f"\nSIGTERM mid-round: exited {code} after {took:.2f} s (--stop-timeout 2)")
        assert T.update("a1") not in watcher.latest, "the round finished before SIGTERM: make it longer"
        assert code == 0 and took < 2 + 3, f"exit {code} after {took:.1f} s"
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        stop(agent)
    assert "--stop-timeout" in (tmp_path / "agent.log").read_text()
