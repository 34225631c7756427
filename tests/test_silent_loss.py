"""No silent loss under the broker's ACL (issue 22 point 1): real mosquitto with broker/'s
config and ACL, real agent processes, the statuses read back as the read-only monitor reads them.

- `--id` other than `--username` is refused at start (one line naming both);
- MQTT 5: the broker's PUBACK refusing an update (not authorized) is said once and shown as
  `state: unheard` with the reason;
- 3.1.1 cannot say so: no model within --unheard-after says `unheard` with the reason;
- a session that kept another fleet's subscription (same broker account, another --fleet) is
  said once and unsubscribed, not warned about on every model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet import ROOT, spawn, stop
from protocol.messages import ModelMessage, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from test_broker_acl import make_credentials, start_production_broker

FLEET = "acl"
SPEC = ModelSpec("sgd-classifier", 4, (0, 1))
TIMEOUT = 30
STARTUP = 120  # bound on processes starting (imports) on a loaded machine


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    return make_credentials(tmp_path_factory.mktemp("creds"), "a1", "a2", fleet=FLEET)


def password(creds: Path, user: str) -> Path:
    return creds / "secrets" / f"{user}.password"


class Client:
    """A paho client logged in as `user` that keeps the newest payload per topic."""

    def __init__(self, broker, creds: Path, user: str, subscribe: str | None = None) -> None:
        self.latest: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user)
        self.client.username_pw_set(user, password(creds, user).read_text().strip())
        ready = threading.Event()
        self.client.on_connect = lambda c, *a: (c.subscribe(subscribe, qos=1) if subscribe else ready.set())
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(10), f"{user} could not connect"

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.latest[msg.topic] = msg.payload
            self.cond.notify_all()

    def wait_json(self, topic: str, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                payload = self.latest.get(topic)
                doc = json.loads(payload) if payload else None
                if doc is not None and predicate(doc):
                    return doc
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {doc}")
                self.cond.wait(0.5)

    def publish_model(self, fleet: str, version: int) -> None:
        payload = encode_model(ModelMessage(fleet, version, SPEC, np.zeros(SPEC.n_params)))
        self.client.publish(f"fedmq/{fleet}/model", payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    path = tmp_path / "a.csv"
    write_csv(path, X, (X[:, 0] > 0).astype(int))
    return path


def agent_args(broker, creds, user, data, *extra) -> list[str]:
    return ["--broker", broker.url, "--username", user, "--password-file", password(creds, user),
            "--data", data, "--poll-interval", "0.2", "--resend-after", "0", *extra]


def wait_log(log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{log.name} never said {text!r} within {timeout} s:\n{content[-3000:]}")


def test_id_other_than_username_is_refused_in_one_line(data):
    out = subprocess.run([sys.executable, "-m", "edge_agent", "--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET,
                          "--id", "pi-1", "--username", "pi-2", "--data", str(data)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "'pi-1'" in lines[0] and "'pi-2'" in lines[0] and "--username" in lines[0], out.stderr


def deny_updates_of_a1(tmp_path: Path, creds: Path) -> Path:
    """A copy of the credentials whose ACL drops a1's updates but lets its status through (deny wins
    over the grant)."""
    creds_copy = tmp_path / "c"
    subprocess.run(["cp", "-r", str(creds), str(creds_copy)], check=True)
    (creds_copy / "acl").write_text((creds / "acl").read_text() + f"\nuser a1\ntopic deny fedmq/{FLEET}/update/a1\n")
    return creds_copy


def test_mqtt5_refused_updates_are_said_once_and_shown_unheard(tmp_path, creds, data):
    creds_copy = deny_updates_of_a1(tmp_path, creds)
    broker = start_production_broker(tmp_path / "broker", creds_copy)
    coordinator = Client(broker, creds_copy, "coordinator")
    monitor = Client(broker, creds_copy, "monitor", subscribe=f"fedmq/{FLEET}/agent/+/status")
    log = tmp_path / "agent.log"
    agent = spawn("edge_agent", *agent_args(broker, creds_copy, "a1", data, "--fleet", FLEET, "--id", "a1",
                                            "--mqtt-version", "5"), log=log)
    try:
        for version in (1, 2, 3):
            coordinator.publish_model(FLEET, version)
            wait_log(log, f"update: version {version},", TIMEOUT)  # a fresh model each time: three refused updates
        status = monitor.wait_json(f"fedmq/{FLEET}/agent/a1/status", lambda d: d["state"] == "unheard", TIMEOUT,
                                   "the status to say unheard")
        assert "Not authorized" in status["reason"] and "a1" in status["reason"], status
    finally:
        assert stop(agent) == 0
        coordinator.close()
        monitor.close()
        broker.stop()
    text = log.read_text()
    assert text.count("sent update") >= 2, text  # it did send more than one
    refusals = [line for line in text.splitlines() if "refused update" in line]
    assert len(refusals) == 1 and "Not authorized" in refusals[0], text


def test_311_updates_the_coordinator_never_acks_are_unheard_while_an_honest_agent_is_heard(tmp_path, creds, data):
    """The broker drops a1's updates (its ACL) and answers PUBACK all the same; a2 keeps the model moving, so
    no newer-model rule can tell. The coordinator's per-agent acks can: a1 goes unheard naming its last
    ack, a2 stays working, and once the ACL lets a1 through (SIGHUP) its first ack makes it heard again."""
    creds_copy = deny_updates_of_a1(tmp_path, creds)
    broker = start_production_broker(tmp_path / "broker", creds_copy)
    monitor = Client(broker, creds_copy, "monitor", subscribe=f"fedmq/{FLEET}/agent/+/status")
    coordinator = spawn("coordinator", "--broker", broker.url, "--username", "coordinator", "--password-file",
                        password(creds_copy, "coordinator"), "--fleet", FLEET, "--model", "sgd-classifier",
                        "--n-features", "4", "--classes", "0,1", "--publish-interval", "0.3", "--no-feature-stats",
                        log=tmp_path / "coordinator.log")
    logs = {a: tmp_path / f"{a}.log" for a in ("a1", "a2")}
    agents = {a: spawn("edge_agent", *agent_args(broker, creds_copy, a, data, "--fleet", FLEET, "--id", a,
                                                 "--unheard-after", "3", "--no-feature-stats"), log=logs[a])
              for a in ("a1", "a2")}
    status = lambda a: f"fedmq/{FLEET}/agent/{a}/status"  # noqa: E731
    try:
        for a in agents:  # start-up first (seconds of imports on a loaded machine), then the behaviour's bounds
            wait_log(logs[a], "sent update", STARTUP)
        unheard = monitor.wait_json(status("a1"), lambda d: d["state"] == "unheard", TIMEOUT, "a1 to say unheard")
        assert "acknowledged no update since seq" in unheard["reason"] and "last ack on" in unheard["reason"] \
            and f"fedmq/{FLEET}/ack/a1" in unheard["reason"], unheard
        honest = monitor.wait_json(status("a2"), lambda d: d["updates_sent"] >= 3, TIMEOUT, "a2 to send 3 updates")
        assert honest["state"] in ("online", "training", "idle") and honest["version"] >= 1, honest
        # the ACL fixed and reloaded: a1's next update is accepted and acked
        (creds_copy / "acl").write_text((creds / "acl").read_text())
        broker.proc.send_signal(signal.SIGHUP)
        heard = monitor.wait_json(status("a1"), lambda d: d["state"] != "unheard", TIMEOUT, "a1 to be heard again")
        assert heard["state"] in ("online", "training", "idle"), heard
    finally:
        codes = {a: stop(p) for a, p in agents.items()}
        code = stop(coordinator)
        monitor.close()
        broker.stop()
    assert codes == {"a1": 0, "a2": 0} and code == 0, (codes, code)
    assert "acknowledged no update" not in logs["a2"].read_text(), logs["a2"].read_text()[-2000:]
    assert "heard again" in logs["a1"].read_text()


def test_311_no_model_within_the_bound_is_unheard_with_the_reason(tmp_path, creds, data):
    broker = start_production_broker(tmp_path / "broker", creds)
    monitor = Client(broker, creds, "monitor", subscribe="fedmq/+/agent/+/status")
    log = tmp_path / "agent.log"
    # a fleet with no coordinator (the typo'd fleet's ACL would hide even the status; see the log test below)
    agent = spawn("edge_agent", *agent_args(broker, creds, "a1", data, "--fleet", FLEET, "--id", "a1",
                                            "--unheard-after", "2"), log=log)
    try:
        status = monitor.wait_json(f"fedmq/{FLEET}/agent/a1/status", lambda d: d["state"] == "unheard", TIMEOUT,
                                   "the status to say unheard")
        assert f"fedmq/{FLEET}/model" in status["reason"] and "--fleet" in status["reason"], status
    finally:
        assert stop(agent) == 0
        monitor.close()
        broker.stop()
    assert log.read_text().count("no model on") == 1, log.read_text()


def test_a_typo_fleet_says_so_in_the_log(tmp_path, creds, data):
    broker = start_production_broker(tmp_path / "broker", creds)
    log = tmp_path / "agent.log"
    agent = spawn("edge_agent", *agent_args(broker, creds, "a1", data, "--fleet", "acl-typo", "--id", "a1",
                                            "--unheard-after", "2"), log=log)
    try:
        line = [x for x in wait_log(log, "no model on", TIMEOUT).splitlines() if "no model on" in x][0]
        assert "fedmq/acl-typo/model" in line and "check --fleet" in line, line
    finally:
        assert stop(agent) == 0
        broker.stop()


def test_an_old_subscription_of_another_fleet_is_said_once_and_dropped(tmp_path, creds, data):
    broker = start_production_broker(tmp_path / "broker", creds)
    coordinator = Client(broker, creds, "coordinator")
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    first = spawn("edge_agent", *agent_args(broker, creds, "a1", data, "--fleet", FLEET, "--id", "a1"), log=log1)
    try:
        coordinator.publish_model(FLEET, 1)
        wait_log(log1, "sent update", TIMEOUT)
    finally:
        assert stop(first) == 0
    # the same account under another fleet: the broker's session (client id = username) keeps fedmq/acl/model
    second = spawn("edge_agent", *agent_args(broker, creds, "a1", data, "--fleet", "other", "--id", "a1"), log=log2)
    try:
        wait_log(log2, "connected to", TIMEOUT)
        for version in range(2, 8):
            coordinator.publish_model(FLEET, version)
            time.sleep(0.3)
        text = wait_log(log2, "delivers fedmq/acl/model", TIMEOUT)
    finally:
        assert stop(second) == 0
        coordinator.close()
        broker.stop()
    text = log2.read_text()
    assert text.count("delivers fedmq/acl/model") == 1 and "'other'" in text, text
    assert "unusable model" not in text, text
