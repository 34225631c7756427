"""The broker/ config against a real mosquitto: credentials, ACL, TLS, and fedmq through all three."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sklearn.datasets import load_digits

from fleet import ROOT, TopicWatcher, spawn, stop
from protocol.tabular import write_csv
from protocol.topics import Topics
from protocol.transport import BrokerError, BrokerSettings, connect, make_client
from simulation.mosquitto import Mosquitto, free_port

BROKER_DIR = Path(__file__).resolve().parent.parent / "broker"
T = Topics("sec")


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("creds")
    subprocess.run([str(BROKER_DIR / "make-credentials.sh"), str(out), "--fleet", T.fleet, "a1", "a2"],
                   check=True, capture_output=True)
    other = tmp_path_factory.mktemp("other-ca")
    subprocess.run([str(BROKER_DIR / "make-credentials.sh"), str(other)], check=True, capture_output=True)
    return out, other


@pytest.fixture(scope="module")
def secure_broker(creds, tmp_path_factory):
    out, _ = creds
    tls_port = free_port()
    conf = "\n".join([
        f"password_file {out}/passwd",
        f"acl_file {out}/acl",
        f"listener {tls_port} 127.0.0.1",
        f"cafile {out}/certs/ca.crt",
        f"certfile {out}/certs/server.crt",
        f"keyfile {out}/certs/server.key",
    ])
    broker = Mosquitto(tmp_path_factory.mktemp("secure"), extra_conf=conf, allow_anonymous=False)
    broker.start(also=(tls_port,))
    broker.tls_port = tls_port
    yield broker
    broker.stop()


def client_for(broker, creds, user, *, tls=False, ca=None):
    out, _ = creds
    url = f"mqtts://127.0.0.1:{broker.tls_port}" if tls else broker.url
    settings = BrokerSettings.from_url(url, username=user, password_file=str(out / "secrets" / f"{user}.password"),
                                       ca_file=ca or (str(out / "certs" / "ca.crt") if tls else None))
    client = make_client(settings, f"test-{user}-{tls}", persistent=False)
    return client, settings


class Inbox:
    def __init__(self, client, topic_filter):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self.subscribed.set()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def wait_for(self, topic, payload, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: (topic, payload) in self.messages, timeout), f"{topic} {payload} not received"


def connected(broker, creds, user, topic_filter=None, **kw):
    client, settings = client_for(broker, creds, user, **kw)
    inbox = Inbox(client, topic_filter) if topic_filter else None
    connect(client, settings, timeout=10)
    if inbox:
        assert inbox.subscribed.wait(10)
    return client, inbox


def test_anonymous_and_wrong_password_are_refused(secure_broker, tmp_path):
    settings = BrokerSettings.from_url(secure_broker.url)
    with pytest.raises(BrokerError, match="refused"):
        connect(make_client(settings, "anon", persistent=False), settings, timeout=10)
    (tmp_path / "pw").write_text("wrong")
    bad = BrokerSettings.from_url(secure_broker.url, username="a1", password_file=str(tmp_path / "pw"))
    with pytest.raises(BrokerError, match="refused"):
        connect(make_client(bad, "bad", persistent=False), bad, timeout=10)


def test_acl_confines_each_agent_to_its_own_topics(secure_broker, creds):
    coordinator, updates = connected(secure_broker, creds, "coordinator", "fedmq/+/update/+")
    monitor, everything = connected(secure_broker, creds, "monitor", "fedmq/#")
    a1, models = connected(secure_broker, creds, "a1", T.model)
    try:
        a1.publish(T.update("a2"), b"forged", qos=1).wait_for_publish(5)
        a1.publish(T.model, b"forged-model", qos=1, retain=True).wait_for_publish(5)
        a1.publish(T.coordinator_status, b"forged-status", qos=1).wait_for_publish(5)
        a1.publish(T.update("a1"), b"marker", qos=1).wait_for_publish(5)
        updates.wait_for(T.update("a1"), b"marker")
        everything.wait_for(T.update("a1"), b"marker")
        assert (T.update("a2"), b"forged") not in updates.messages
        assert all(p not in (b"forged", b"forged-model", b"forged-status") for _, p in everything.messages)
        # the coordinator may publish the model, and agents receive it
        coordinator.publish(T.model, b"real-model", qos=1).wait_for_publish(5)
        models.wait_for(T.model, b"real-model")
        assert (T.model, b"forged-model") not in models.messages
    finally:
        for c in (coordinator, monitor, a1):
            c.disconnect()
            c.loop_stop()


def test_tls_with_the_dev_ca_and_refused_with_another(secure_broker, creds):
    client, _ = connected(secure_broker, creds, "a1", tls=True)
    assert client.is_connected()
    client.disconnect()
    client.loop_stop()
    _, other = creds
    with pytest.raises(BrokerError, match="TLS"):
        connected(secure_broker, creds, "a1", tls=True, ca=str(other / "certs" / "ca.crt"))


def test_fleet_runs_over_tls_with_credentials(secure_broker, creds, tmp_path):
    out, _ = creds
    X, y = load_digits(return_X_y=True)
    write_csv(tmp_path / "a1.csv", X[:300], y[:300])
    tls = ["--broker", f"mqtts://127.0.0.1:{secure_broker.tls_port}", "--ca-file", out / "certs" / "ca.crt", "--fleet", "sec"]
    coordinator = spawn("coordinator", *tls, "--username", "coordinator", "--password-file", out / "secrets" / "coordinator.password",
                        "--model", "sgd-classifier", "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9",
                        "--publish-interval", "0.3", log=tmp_path / "coordinator.log")
    agent = spawn("edge_agent", *tls, "--id", "a1", "--username", "a1", "--password-file", out / "secrets" / "a1.password",
                  "--data", tmp_path / "a1.csv", log=tmp_path / "agent.log")
    monitor, statuses = connected(secure_broker, creds, "monitor", T.coordinator_status)
    try:
        with statuses.cond:
            assert statuses.cond.wait_for(
                lambda: any(b'"accepted": ' in p and b'"accepted": 0,' not in p for _, p in statuses.messages), 30
            ), "no update accepted over TLS"
    finally:
        monitor.disconnect()
        monitor.loop_stop()
        assert stop(agent) == 0
        assert stop(coordinator) == 0


@pytest.mark.parametrize("tool", ["edge_agent", "coordinator"])
@pytest.mark.parametrize("failure, message", [("wrong password", "refused the connection"),
                                              ("another CA", "TLS handshake")])
def test_refused_login_or_untrusted_broker_is_one_line_and_exit_1(secure_broker, creds, tmp_path, tool, failure, message):
    out, other = creds
    password, ca = out / "secrets" / "a1.password", out / "certs" / "ca.crt"
    if failure == "wrong password":
        password = tmp_path / "wrong.password"
        password.write_text("wrong\n")
    else:  # a broker whose certificate this CA did not sign: as good as an impostor
        ca = other / "certs" / "ca.crt"
    write_csv(tmp_path / "a1.csv", np.eye(3), np.arange(3))
    role = (["--id", "a1", "--data", tmp_path / "a1.csv"] if tool == "edge_agent"
            else ["--model", "sgd-classifier", "--n-features", "3", "--classes", "0,1,2"])
    argv = ["--broker", f"mqtts://127.0.0.1:{secure_broker.tls_port}", "--ca-file", ca, "--fleet", "sec",
            "--username", "a1", "--password-file", password, "--connect-timeout", "10", *role]
    proc = subprocess.run([sys.executable, "-m", tool, *map(str, argv)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    name = "fedmq-agent" if tool == "edge_agent" else "fedmq-coordinator"
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{name}: error: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def mutual_tls_broker(creds, tmp_path):
    """A TLS listener that requires a client certificate signed by the dev CA (plain port: anonymous, for watching)."""
    out, _ = creds
    tls_port = free_port()
    conf = "\n".join([f"listener {tls_port} 127.0.0.1", "allow_anonymous true", "require_certificate true",
                      f"cafile {out}/certs/ca.crt", f"certfile {out}/certs/server.crt", f"keyfile {out}/certs/server.key"])
    with Mosquitto(tmp_path / "mtls", extra_conf=conf) as broker:
        broker.tls_port = tls_port
        yield broker


def test_mutual_tls_with_a_client_certificate(mutual_tls_broker, creds, tmp_path):
    out, _ = creds
    certs = out / "certs"
    tls = ["--broker", f"mqtts://127.0.0.1:{mutual_tls_broker.tls_port}", "--ca-file", certs / "ca.crt", "--fleet", "sec"]
    model = ["--model", "sgd-classifier", "--n-features", "3", "--classes", "0,1,2"]
    watcher = TopicWatcher(mutual_tls_broker.port, T.model)
    coordinator = spawn("coordinator", *tls, *model, "--cert-file", certs / "client-coordinator.crt",
                        "--key-file", certs / "client-coordinator.key",
                        "--no-feature-stats",  # no agent here: the first model at once
                        log=tmp_path / "coordinator.log")
    try:
        watcher.wait_for(lambda: watcher.latest.get(T.model), 30, "the model published over mutual TLS")
    finally:
        assert stop(coordinator) == 0
        watcher.close()


@pytest.mark.parametrize("tool", ["edge_agent", "coordinator", "monitor"])
def test_mutual_tls_without_a_client_certificate_is_one_line_naming_it(mutual_tls_broker, creds, tmp_path, tool):
    # TLS 1.3 lets the handshake finish on our side; the broker's "certificate required" alert
    # arrives on paho's first read in its network thread, where paho only logs it and retries.
    # The tool must still say so in one line, and at once rather than at the timeout (60 s).
    out, _ = creds
    url = f"mqtts://127.0.0.1:{mutual_tls_broker.tls_port}"
    write_csv(tmp_path / "a1.csv", np.eye(3), np.arange(3))
    role = {"edge_agent": ["--id", "a1", "--data", tmp_path / "a1.csv"],
            "coordinator": ["--model", "sgd-classifier", "--n-features", "3", "--classes", "0,1,2"],
            "monitor": ["--once"]}[tool]
    argv = ["--broker", url, "--ca-file", out / "certs" / "ca.crt", "--fleet", "sec", "--connect-timeout", "60", *role]
    proc = subprocess.run([sys.executable, "-m", tool, *map(str, argv)], capture_output=True, text=True, timeout=50, cwd=ROOT)
    name = {"edge_agent": "fedmq-agent", "coordinator": "fedmq-coordinator", "monitor": "fedmq-monitor"}[tool]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert len(problems) == 1, proc.stderr  # no "lost the broker" warnings before it
    assert problems[0].startswith(f"{name}: error: TLS error from broker {url}: "), proc.stderr
    for part in ("refused the connection during the TLS handshake", "certificate required",
                 "TLSV13_ALERT_CERTIFICATE_REQUIRED", "give --cert-file and --key-file signed by the broker's CA"):
        assert part in problems[0], proc.stderr


def tls12_client(settings):
    """A paho client limited to TLS 1.2, where the broker's alert ends the handshake in connect()."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls12", protocol=mqtt.MQTTv311)
    client.tls_set_context(context)
    return client


@pytest.mark.parametrize("tls_version", ["1.3", "1.2"])
@pytest.mark.parametrize("certificate, cause", [
    (None, "no client certificate given"),
    ("another CA", "it did not accept the client certificate"),
])
def test_mutual_tls_refusal_names_the_certificate(mutual_tls_broker, creds, tls_version, certificate, cause):
    out, other = creds
    files = {}
    if certificate:
        files = {"cert_file": str(other / "certs" / "client-coordinator.crt"),
                 "key_file": str(other / "certs" / "client-coordinator.key")}
    settings = BrokerSettings.from_url(f"mqtts://127.0.0.1:{mutual_tls_broker.tls_port}",
                                       ca_file=str(out / "certs" / "ca.crt"), **files)
    client = make_client(settings, "mtls", persistent=False) if tls_version == "1.3" else tls12_client(settings)
    with pytest.raises(BrokerError) as refused:
        connect(client, settings, timeout=30)
    message = str(refused.value)
    assert message.startswith(f"TLS error from broker {settings.url}: the broker refused the connection "
                              "during the TLS handshake"), message
    assert cause in message and message.endswith("give --cert-file and --key-file signed by the broker's CA"), message
    assert "\n" not in message and "_ssl.c" not in message
    assert client.on_log is None and client.on_connect_fail is None  # connect() put paho's callbacks back
