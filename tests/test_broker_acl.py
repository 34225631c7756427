"""broker/ as committed (mosquitto.conf, acl, make-credentials.sh) against a real mosquitto.

The broker runs the production mosquitto.conf with only its paths and ports rewritten, and the
ACL make-credentials.sh writes (broker/acl, then each agent's block for its fleet). A denied
publish is dropped silently (the publisher still gets its PUBACK), so every "not delivered"
below is checked on the subscribers' side, after a marker published later has arrived.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mosquitto import MOSQUITTO, Mosquitto, free_port
from protocol.messages import MAX_MESSAGE_BYTES

BROKER_DIR = Path(__file__).resolve().parent.parent / "broker"
TIMEOUT = 10
FLEET = "acl"
OTHER_FLEET = "other-fleet"  # b1's


def production_conf(creds: Path, data: Path, plain_port: int, tls_port: int, *, size_line: str | None = None,
                    ws_port: int | None = None) -> str:
    """broker/mosquitto.conf with paths and ports for this machine, and no log_dest (stderr, or the helper's file).

    The WebSocket listener (9001) moves to `ws_port`, a free one by default; mosquitto 2.0
    binds it on every interface whatever the address (broker/mosquitto.conf says why)."""
    conf = (BROKER_DIR / "mosquitto.conf").read_text()
    conf = conf.replace("/mosquitto/config/passwd", str(creds / "passwd"))
    conf = conf.replace("/mosquitto/config/acl", str(creds / "acl"))
    conf = conf.replace("/mosquitto/config/certs/", f"{creds}/certs/")
    conf = conf.replace("/mosquitto/data/", f"{data}/")
    conf = re.sub(r"^listener 1883$", f"listener {plain_port} 127.0.0.1", conf, flags=re.M)
    conf = re.sub(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", conf, flags=re.M)
    conf = re.sub(r"^listener 9001$", f"listener {ws_port or free_port()}", conf, flags=re.M)
    conf = re.sub(r"^log_dest stdout$", "", conf, flags=re.M)
    if size_line is not None:
        conf = re.sub(r"^message_size_limit .*$", size_line, conf, flags=re.M)
    assert "/mosquitto/" not in conf, "a production path was left unrewritten"
    return conf


def make_credentials(out: Path, *agents: str, fleet: str = FLEET) -> Path:
    script = BROKER_DIR / "make-credentials.sh"
    fleet_args = ["--fleet", fleet] if agents else []
    subprocess.run([str(script), str(out), *fleet_args, *agents], check=True, capture_output=True, timeout=60)
    return out


def start_production_broker(workdir: Path, creds: Path, **kw) -> Mosquitto:
    plain_port, tls_port, ws_port = free_port(), free_port(), kw.pop("ws_port", None) or free_port()
    (workdir / "data").mkdir(parents=True)
    broker = Mosquitto(workdir, allow_anonymous=False,
                       extra_conf=production_conf(creds, workdir / "data", plain_port, tls_port, ws_port=ws_port, **kw))
    broker.start(also=(plain_port, tls_port, ws_port))
    broker.plain_port, broker.tls_port, broker.ws_port = plain_port, tls_port, ws_port
    return broker


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    out = make_credentials(tmp_path_factory.mktemp("creds"), "a1", "a2")
    return make_credentials(out, "b1", fleet=OTHER_FLEET)


@pytest.fixture
def broker(creds, tmp_path):
    """A fresh production broker per test, so no retained message leaks from one test to another."""
    broker = start_production_broker(tmp_path / "broker", creds)
    yield broker
    broker.stop()


class Client:
    """A paho 2.x client logged in as `user`; records what it receives; every wait is bounded."""

    def __init__(self, broker: Mosquitto, creds: Path | None, user: str | None, *subscriptions: str,
                 port: int | None = None, tls: ssl.SSLContext | None = None, password: str | None = None,
                 clean_session: bool = True, client_id: str | None = None) -> None:
        self.name = user or "anonymous"
        self.received: list[tuple[str, bytes]] = []
        self.connack: mqtt.ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnects = 0
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._pending = len(subscriptions)
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{self.name}-{id(self)}",
                                clean_session=clean_session)
        if user:
            if password is None:
                password = (creds / "secrets" / f"{user}.password").read_text().strip()
            self.paho.username_pw_set(user, password)
        if tls:
            self.paho.tls_set_context(tls)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = self._on_message
        self.paho.on_disconnect = self._on_disconnect
        self._subscriptions = subscriptions
        self.paho.connect(broker.host, port or broker.plain_port)
        self.paho.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.session_present = flags.session_present
        if reason_code.is_failure:
            client.disconnect()  # otherwise paho retries after a second
        else:
            for topic in self._subscriptions:
                client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects += 1

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.received.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def wait_connack(self) -> mqtt.ReasonCode:
        assert self._connected.wait(TIMEOUT), f"{self.name}: no CONNACK within {TIMEOUT} s"
        return self.connack

    def wait_ready(self) -> "Client":
        code = self.wait_connack()
        assert not code.is_failure, f"{self.name} refused: {code}"
        with self._cond:
            assert self._cond.wait_for(lambda: self._pending == 0, TIMEOUT), f"{self.name}: no SUBACK"
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)  # PUBACK: mosquitto has routed or dropped it by now
        assert info.is_published(), f"{self.name}: no PUBACK for {topic}"

    def wait_for(self, topic: str, payload: bytes) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: (topic, payload) in self.received, TIMEOUT), \
                f"{self.name} did not receive {topic} {payload[:40]!r} within {TIMEOUT} s"

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def t(suffix: str) -> str:
    return f"fedmq/{FLEET}/{suffix}"


# (publisher, topic, who may read it if it gets through, whether the ACL lets it through)
MATRIX = [
    ("a1", t("update/a1"), {"coordinator", "monitor"}, True),
    ("a1", t("agent/a1/status"), {"coordinator", "monitor"}, True),
    ("a1", t("update/a2"), set(), False),
    ("a1", t("stats/a1"), {"coordinator", "monitor"}, True),  # its own statistics: the coordinator reads them
    ("a1", t("stats/a2"), set(), False),
    ("a1", f"fedmq/{OTHER_FLEET}/stats/a1", set(), False),
    ("b1", t("stats/b1"), set(), False),
    ("monitor", t("stats/monitor"), set(), False),
    ("coordinator", t("stats/coordinator"), set(), False),
    # schema announcements (protocol/schema.py): an agent writes only its own, the coordinator reads them
    ("a1", t("schema/a1"), {"coordinator", "monitor"}, True),
    ("a1", t("schema/a2"), set(), False),
    ("a1", f"fedmq/{OTHER_FLEET}/schema/a1", set(), False),
    ("monitor", t("schema/monitor"), set(), False),
    ("coordinator", t("schema/coordinator"), set(), False),
    ("a1", t("agent/a2/status"), set(), False),
    ("a1", t("model"), set(), False),
    ("a1", t("coordinator/status"), set(), False),
    ("a1", t("update/a1/extra"), set(), False),
    # chunks (--max-packet-bytes): an agent writes only its own update chunks, only the coordinator model chunks
    ("a1", t("update/a1/chunk"), {"coordinator", "monitor"}, True),
    ("a1", t("update/a2/chunk"), set(), False),
    ("a1", t("model/chunk/0"), set(), False),
    ("monitor", t("update/monitor/chunk"), set(), False),
    ("coordinator", t("update/coordinator/chunk"), set(), False),
    ("coordinator", t("model/chunk/0"), {"a1", "a2", "monitor"}, True),
    ("coordinator", f"fedmq/{OTHER_FLEET}/model/chunk/3", {"b1", "monitor"}, True),
    # fleets are part of the credentials: a1 (fleet acl) cannot write into b1's fleet, nor b1 into a1's
    ("a1", f"fedmq/{OTHER_FLEET}/update/a1", set(), False),
    ("a1", f"fedmq/{OTHER_FLEET}/agent/a1/status", set(), False),
    ("b1", t("update/b1"), set(), False),
    ("b1", t("agent/b1/status"), set(), False),
    ("b1", f"fedmq/{OTHER_FLEET}/update/b1", {"coordinator", "monitor"}, True),
    ("coordinator", f"fedmq/{OTHER_FLEET}/model", {"b1", "monitor"}, True),  # not a1, a2: another fleet's
    ("monitor", t("update/monitor"), set(), False),
    ("monitor", t("agent/monitor/status"), set(), False),
    ("monitor", t("model"), set(), False),
    ("coordinator", t("update/coordinator"), set(), False),
    ("coordinator", t("agent/coordinator/status"), set(), False),
    ("coordinator", t("model"), {"a1", "a2", "monitor"}, True),
    ("coordinator", t("coordinator/status"), {"monitor"}, True),
    # acks (protocol/acks.py): the coordinator writes them, each agent alone reads its own (not the monitor)
    ("coordinator", t("ack/a1"), {"a1"}, True),
    ("coordinator", f"fedmq/{OTHER_FLEET}/ack/b1", {"b1"}, True),
    ("a1", t("ack/a1"), set(), False),  # no agent forges its own ack
    ("a1", t("ack/a2"), set(), False),
    ("monitor", t("ack/a1"), set(), False),
]
SUBSCRIPTIONS = {
    "coordinator": ("fedmq/+/update/#", "fedmq/+/agent/+/status", "fedmq/+/stats/+", "fedmq/+/schema/+"),
    "monitor": ("fedmq/#",),
    "a1": ("fedmq/#",),  # agents may subscribe to everything and still only get the model
    "a2": ("fedmq/#",),
    "b1": ("fedmq/#",),
}


def test_acl_matrix_each_user_publishes_and_reads_only_its_topics(broker, creds):
    clients = {user: Client(broker, creds, user, *subs) for user, subs in SUBSCRIPTIONS.items()}
    try:
        for c in clients.values():
            c.wait_ready()
        for publisher, topic, _, _ in MATRIX:
            clients[publisher].publish(topic, f"{publisher}->{topic}".encode())
        # markers, published after everything above was acknowledged: once a subscriber has its
        # marker, anything above that was going to reach it has reached it (per-client order)
        clients["coordinator"].publish(t("model"), b"end")
        clients["a2"].publish(t("update/a2"), b"end")
        clients["coordinator"].publish(f"fedmq/{OTHER_FLEET}/model", b"end")
        for user in ("a1", "a2", "monitor"):
            clients[user].wait_for(t("model"), b"end")
        for user in ("b1", "monitor"):
            clients[user].wait_for(f"fedmq/{OTHER_FLEET}/model", b"end")
        for user in ("coordinator", "monitor"):
            clients[user].wait_for(t("update/a2"), b"end")

        for user, client in clients.items():
            expected = {(topic, f"{pub}->{topic}".encode())
                        for pub, topic, readers, ok in MATRIX if ok and user in readers}
            expected |= {(t("model"), b"end")} if user in ("a1", "a2", "monitor") else set()
            expected |= {(f"fedmq/{OTHER_FLEET}/model", b"end")} if user in ("b1", "monitor") else set()
            expected |= {(t("update/a2"), b"end")} if user in ("coordinator", "monitor") else set()
            assert set(client.received) == expected, f"{user} received the wrong set"
    finally:
        for c in clients.values():
            c.close()


def test_forged_retained_messages_do_not_replace_real_ones(broker, creds):
    coordinator, a1, a2 = (Client(broker, creds, u).wait_ready() for u in ("coordinator", "a1", "a2"))
    try:
        coordinator.publish(t("model"), b"real model", retain=True)
        a2.publish(t("agent/a2/status"), b"a2 online", retain=True)
        a1.publish(t("model"), b"forged model", retain=True)  # after the real ones: would replace them
        a1.publish(t("agent/a2/status"), b"a2 offline (forged)", retain=True)
        # a topic holds one retained message: a fresh subscriber gets the real one or the forgery
        fresh = Client(broker, creds, "monitor", t("model"), t("agent/a2/status")).wait_ready()
        try:
            fresh.wait_for(t("model"), b"real model")
            fresh.wait_for(t("agent/a2/status"), b"a2 online")
        finally:
            fresh.close()
    finally:
        for c in (coordinator, a1, a2):
            c.close()


@pytest.mark.parametrize("user, password", [(None, None), ("a1", "wrong"), ("intruder", "x")])
def test_anonymous_and_bad_logins_are_refused(broker, creds, user, password):
    client = Client(broker, creds, user, password=password)
    try:
        code = client.wait_connack()
        assert code.is_failure and code.getName() == "Not authorized", code
    finally:
        client.close()


def test_monitor_reads_sys_as_the_docker_healthcheck_does(broker, creds):
    password = (creds / "secrets" / "monitor.password").read_text().strip()
    done = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.plain_port), "-u", "monitor", "-P", password,
         "-t", "$SYS/broker/uptime", "-C", "1", "-W", "4"],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and "seconds" in done.stdout, done


def test_message_size_limit_fits_the_largest_protocol_message(broker, creds):
    conf = (BROKER_DIR / "mosquitto.conf").read_text()
    assert int(re.search(r"^message_size_limit (\d+)$", conf, flags=re.M).group(1)) == MAX_MESSAGE_BYTES
    coordinator = Client(broker, creds, "coordinator", t("update/+")).wait_ready()
    # an agent with a persistent session, as edge agents are: were the limit max_packet_size, the
    # broker would disconnect it and it would resend the oversize update after every reconnect
    a1 = Client(broker, creds, "a1", clean_session=False).wait_ready()
    try:
        a1.publish(t("update/a1"), b"x" * (MAX_MESSAGE_BYTES + 1))  # acknowledged, dropped
        a1.publish(t("update/a1"), b"y" * MAX_MESSAGE_BYTES)
        coordinator.wait_for(t("update/a1"), b"y" * MAX_MESSAGE_BYTES)
        assert [len(p) for _, p in coordinator.received] == [MAX_MESSAGE_BYTES]
        assert a1.disconnects == 0
    finally:
        coordinator.close()
        a1.close()


def wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port: there is no event to wait on
    raise AssertionError(f"mosquitto did not listen on {port} (exit code {proc.poll()})")


SIZE_LIMIT_NOTE = "Note: It is recommended to replace `message_size_limit` with `max_packet_size`."


@pytest.mark.parametrize("size_line", [None, "max_packet_size 8389632"])
def test_production_config_starts_with_only_the_expected_complaints(creds, tmp_path, size_line):
    """Run mosquitto itself (not the helper): what it says while parsing goes to stderr, not the log."""
    (tmp_path / "data").mkdir()
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    as_root = os.geteuid() == 0  # as root mosquitto would switch to user mosquitto, who cannot read tmp_path
    text = production_conf(creds, tmp_path / "data", port, free_port(), size_line=size_line)
    conf.write_text(("user root\n" if as_root else "") + text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=TIMEOUT)[0]
    said = {line.split(": ", 1)[1] for line in output.splitlines() if re.match(r"\d+: (Warning|Error|Note)", line)}
    # no `pattern` line any more (each agent's read of its fleet's model is a `topic` line): no warning
    expected = set()
    if size_line is None:
        expected.add(SIZE_LIMIT_NOTE)  # mosquitto 2.0 prefers max_packet_size; see mosquitto.conf for why not
    if as_root:
        expected.add("Warning: Mosquitto should not be run as root/administrator.")
    assert said == expected, output


def strict_context(cafile: Path) -> ssl.SSLContext:
    """What a careful client (and Python 3.13's default context) does: strict X.509 checks."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def test_tls_listener_with_the_dev_ca(broker, creds):
    tls = strict_context(creds / "certs" / "ca.crt")
    client = Client(broker, creds, "a1", t("model"), port=broker.tls_port, tls=tls)
    try:
        client.wait_ready()
        coordinator = Client(broker, creds, "coordinator").wait_ready()
        try:
            coordinator.publish(t("model"), b"over tls")
            client.wait_for(t("model"), b"over tls")
        finally:
            coordinator.close()
    finally:
        client.close()


def test_tls_refused_with_another_ca(broker, creds, tmp_path):
    other = make_credentials(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker, creds, "a1", port=broker.tls_port, tls=strict_context(other / "certs" / "ca.crt"))


def test_make_credentials_keeps_earlier_agents_and_rejects_reserved_ids(tmp_path):
    out = make_credentials(tmp_path / "c", "a1")
    make_credentials(out, "a2", fleet=OTHER_FLEET)
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert sorted(users) == ["a1", "a2", "coordinator", "health", "monitor", "web"]
    acl = (out / "acl").read_text()
    assert acl.startswith((BROKER_DIR / "acl").read_text())
    assert f"user a1\ntopic write fedmq/{FLEET}/update/a1\n" in acl and f"topic read fedmq/{OTHER_FLEET}/model" in acl
    assert "pattern" not in "".join(l for l in acl.splitlines() if not l.startswith("#"))
    script = str(BROKER_DIR / "make-credentials.sh")
    for argv in ([str(out), "a3"],  # no fleet named
                 [str(out), "--fleet", OTHER_FLEET, "a1"],  # a1 is in FLEET: not moved silently
                 [str(out), "--fleet", "a/b", "a3"]):
        done = subprocess.run([script, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (argv, done)
    assert (out / "acl").read_text() == acl
    for path in [out / "passwd", *(out / "secrets").iterdir(), *(out / "certs").glob("*.key")]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for bad in ("monitor", "coordinator", "health", "web", "a/b", "+"):
        done = subprocess.run([str(BROKER_DIR / "make-credentials.sh"), str(out), "--fleet", FLEET, bad],
                              capture_output=True, text=True)
        assert done.returncode == 2, (bad, done)
    help_ = subprocess.run([str(BROKER_DIR / "make-credentials.sh"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "Usage: make-credentials.sh OUTDIR" in help_.stdout


def test_no_credential_takes_over_another_clients_session(broker, creds):
    """Issue 10: a1's password with the coordinator's (or a2's) client id kicked that client off."""
    coordinator = Client(broker, creds, "coordinator", t("update/+"), client_id=f"fedmq-coordinator-{FLEET}")
    a2 = Client(broker, creds, "a2", t("model"), client_id=f"fedmq-agent-{FLEET}-a2", clean_session=False)
    coordinator.wait_ready()
    a2.wait_ready()
    # a2's persistent session holds a queued model while a2 is offline
    a2.close()
    coordinator.publish(t("model"), b"queued for a2")
    try:
        # a persistent session asked for where a2 has one: a1 must not resume it
        for victim, persistent in ((f"fedmq-coordinator-{FLEET}", False), (f"fedmq-agent-{FLEET}-a2", True)):
            impostor = Client(broker, creds, "a1", t("model"), client_id=victim, clean_session=not persistent)
            try:
                impostor.wait_ready()
                # the broker names the session after the username: a1 gets a fresh one of its own
                assert impostor.session_present is False, f"a1 resumed the session of {victim}"
                impostor.publish(t("update/a1"), victim.encode())
                coordinator.wait_for(t("update/a1"), victim.encode())  # still connected and subscribed
                assert coordinator.disconnects == 0, f"a1 with client id {victim} kicked the coordinator off"
                assert (t("model"), b"queued for a2") not in impostor.received, "a1 read a2's queue"
            finally:
                impostor.close()
        a2_back = Client(broker, creds, "a2", t("model"), client_id=f"fedmq-agent-{FLEET}-a2", clean_session=False)
        try:
            a2_back.wait_ready()
            a2_back.wait_for(t("model"), b"queued for a2")  # still queued, for a2 alone
        finally:
            a2_back.close()
    finally:
        coordinator.close()


def test_our_clients_ask_for_their_username_as_client_id(broker, creds):
    """make_client names the session as the production broker will: after the username."""
    from protocol.transport import BrokerSettings, connect, make_client

    settings = BrokerSettings.from_url(f"mqtt://127.0.0.1:{broker.plain_port}", username="a1",
                                       password_file=str(creds / "secrets" / "a1.password"))
    client = make_client(settings, f"fedmq-agent-{FLEET}-a1")
    assert client._client_id == b"a1"
    connect(client, settings, timeout=TIMEOUT)
    client.disconnect()
    client.loop_stop()
    anonymous = make_client(BrokerSettings.from_url("mqtt://127.0.0.1:1"), "fedmq-sim-x-a1")
    assert anonymous._client_id == b"fedmq-sim-x-a1"


def test_the_web_view_login_reads_the_fleets_and_publishes_nothing(broker, creds):
    """`web` (fedmq-monitor --web's page) has the monitor's read rights under its own session."""
    web = Client(broker, creds, "web", "fedmq/#").wait_ready()
    monitor, coordinator = Client(broker, creds, "monitor", "fedmq/#").wait_ready(), Client(broker, creds, "coordinator").wait_ready()
    try:
        for topic in (t("update/web"), t("agent/web/status"), t("model"), t("coordinator/status")):
            web.publish(topic, b"from web")  # acknowledged and dropped
        coordinator.publish(t("model"), b"end")  # after the above: once it arrives, they would have
        for client in (web, monitor):
            client.wait_for(t("model"), b"end")
        assert not [m for m in monitor.received if m[1] == b"from web"], monitor.received
        assert web.disconnects == 0 and monitor.disconnects == 0  # two users: neither took the other's session
    finally:
        for c in (web, monitor, coordinator):
            c.close()
