"""Per-device identity on the scale-out tier: a cluster started with a device store (tier/devices.py) sends every
MQTT login but the tier user's to the auth callout service (tier/auth.py), which gives a device its own topics only.

Real nats-server processes, the real auth service, a real root and worker, a real edge_agent, and MQTT 3.1.1
clients (paho) with their own credentials:
- a device with valid credentials of its own cannot publish on another device's update, update chunk, status,
  statistics, schema or secure-aggregation topics, nor a partial or the retained model: nothing of it reaches the
  node's subscribers (a tier-user tap on the whole fleet, which sees the device's own status published after the
  forgeries), and the victim never appears in
  the root's audit; it cannot subscribe to another device's ack, nor to every ack (SUBACK failure), while the real
  agent's acks reach the tap there; the real agent with its credentials trains through the tier version after version;
- a wrong password, no credentials, another device's client id, a device removed from the store: refused
  (the agent: one error line, exit 1); a device added to the running store connects at once;
- the auth service killed -9: no device gets in (fail closed) while tier processes still do; started again, the
  same device connects;
- on 3 nodes, a device gets in through each (the request crosses the routes to the service), and after kill -9 of
  the node the service is connected to, through the others;
- with a session limit (tier.auth --session-s), a device removed from the store is cut within it and refused;
- the nodes' authorization requests (each with a device's password in the clear) reach the auth user alone: the tier
  user over NATS and over MQTT, the route credentials and a device, each subscribing to `$SYS.REQ.USER.AUTH`,
  `$SYS.>` and `>` / `#` while a device logs in, see no request and no password (a permissions violation, a SUBACK
  failure or a refused connect), where a subscriber as the auth user sees it. Seen red on the old config (the tier
  user with every right): the tier user read the device's password on all three subjects, over NATS and MQTT.
Seen red with the shared device user's allow-lists (`upd.*.*`, `ack.*`, ...) returned by the auth service: the
forged update reached the tap as `upd/<P>/dev-victim` and the ack subscriptions were granted.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fleet import spawn
from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.cluster import (AUTH_PASSWORD_ENV, AUTH_TIMEOUT_S, AUTH_USER, CALLOUT_SUBJECT, ROUTE_USER, TIER_USER,
                          NatsCluster, partition_of)
from tier.devices import add_devices, remove_devices
from tier.nkey import PREFIX_ACCOUNT, decode_jwt
from tier.xkey import SERVER_XKEY_HEADER, VERSION, XKey
from tier.fleet import (FLEET, N_FEATURES, ROOT, START_S, TOPICS, ModelWatch, Tier, device_client, regression_shard,
                        wait_until)

OWN, VICTIM, EVIL = "dev-own", "dev-victim", "dev-evil"
PARTITIONS = 4


@pytest.fixture
def store(tmp_path):
    """The device store with three devices of the fleet, and their password files."""
    path, secrets = tmp_path / "devices", tmp_path / "secrets"
    add_devices(path, secrets, FLEET, [OWN, VICTIM, EVIL])
    return path, secrets


@pytest.fixture
def cluster(tmp_path, store):
    """One real nats-server with the device store: auth callout to a real tier/auth.py."""
    with NatsCluster(tmp_path / "nats", nodes_count=1, partitions=PARTITIONS, devices=store[0]) as c:
        yield c


def _password(store, agent: str) -> str:
    return (store[1] / f"{agent}.password").read_text().strip()


class Device:
    """A paho MQTT 3.1.1 connection as a device: what its CONNACK, SUBACKs and messages were."""

    def __init__(self, cluster: NatsCluster, client_id: str, user: str | None, password: str | None,
                 node: int = 0) -> None:
        self.client, self.connected = device_client(client_id, user, password)
        self.connack = None
        self.answered = threading.Event()
        self.subacks: dict[int, list] = {}
        self.subscribed = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []

        def on_connect(client, userdata, flags, reason_code, properties):
            self.connack = reason_code
            if not reason_code.is_failure:
                self.connected.set()
            self.answered.set()

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            with self.subscribed:
                self.subacks[mid] = reason_codes
                self.subscribed.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.reconnect_delay_set(30, 60)  # one attempt per test step: no retry behind its back
        self.client.connect_async("127.0.0.1", cluster.nodes[node].mqtt_port, 30)
        self.client.loop_start()

    def wait_answer(self, timeout: float) -> object:
        """The CONNACK's reason code (None: no answer within `timeout`)."""
        self.answered.wait(timeout)
        return self.connack

    def subscribe(self, topic: str, timeout: float = 30.0) -> list:
        _, mid = self.client.subscribe(topic, 1)
        with self.subscribed:
            assert self.subscribed.wait_for(lambda: mid in self.subacks, timeout), f"no SUBACK for {topic}"
            return self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _as_device(cluster, store, agent: str, client_id: str | None = None, password: str | None = None,
               node: int = 0) -> Device:
    return Device(cluster, client_id or agent, agent, password if password is not None else _password(store, agent),
                  node)



def _agent(cluster, store, tmp_path, password_file, log):
    return spawn("edge_agent", "--broker", cluster.mqtt_urls[0], "--fleet", FLEET, "--id", OWN, "--username", OWN,
                 "--password-file", password_file, "--data", regression_shard(tmp_path / "agent.csv"),
                 "--connect-timeout", "20", log=log)


def test_a_device_cannot_publish_or_read_as_another_and_its_own_updates_flow(tmp_path, cluster, store):
    assert partition_of(VICTIM, PARTITIONS) != partition_of(EVIL, PARTITIONS)  # the victim's worker is elsewhere
    tier = Tier(cluster, tmp_path, partitions=PARTITIONS, buffer_size=1)
    watch = ModelWatch(cluster)
    tap = Device(cluster, "test-tap", TIER_USER, cluster.password)  # the tier user: sees every subject of the fleet
    evil = agent = None
    try:
        assert tap.connected.wait(30)
        assert not tap.subscribe(f"fedmq/{FLEET}/#")[0].is_failure
        tier.start_root()
        tier.start_worker()
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        start = watch.version
        evil = _as_device(cluster, store, EVIL)
        assert evil.wait_answer(30) is not None and evil.connected.is_set(), (evil.connack, cluster.auth_log.read_text())
        delta = codec.encode(np.full(N_FEATURES + 1, 0.01), "int8", np.random.default_rng(0))
        forged = encode_update(UpdateMessage(VICTIM, 1, max(start, 0), 10, delta))
        for topic, payload in [(TOPICS.update(VICTIM), forged), (TOPICS.update_chunk(VICTIM), b"chunk"),
                               (TOPICS.agent_status(VICTIM), b'{"agent": "dev-victim", "state": "offline"}'),
                               (TOPICS.stats(VICTIM), b"stats"), (TOPICS.schema(VICTIM), b"schema"),
                               (TOPICS.secagg("share", VICTIM), b"share"), (TOPICS.secagg("key", VICTIM), b"key"),
                               # and what only tier processes may publish: a partial, the retained model
                               (f"fedmq/{FLEET}/partial/{partition_of(VICTIM, PARTITIONS)}", b"forged partial"),
                               (TOPICS.model, b"forged model")]:
            evil.client.publish(topic, payload, qos=1, retain=topic == TOPICS.model).wait_for_publish(10)
        # its own secure-aggregation share goes through, mapped to its own partition, then its own status
        evil.client.publish(TOPICS.secagg("share", EVIL), b"own share", qos=1).wait_for_publish(10)
        own = TOPICS.agent_status(EVIL)
        evil.client.publish(own, b'{"agent": "dev-evil"}', qos=1).wait_for_publish(10)
        # the same connection's next message reached the tap: so would the forgeries have (plus a margin)
        assert wait_until(lambda: any(t == own for t, _ in tap.messages), 30), tap.messages[-5:]
        time.sleep(1.0)
        assert not [t for t, p in tap.messages if VICTIM in t or p.startswith(b"forged")], [t for t, _ in tap.messages]
        assert (f"fedmq/{FLEET}/psecagg/{partition_of(EVIL, PARTITIONS)}/share/{EVIL}", b"own share") in tap.messages

        agent = _agent(cluster, store, tmp_path, store[1] / f"{OWN}.password", tmp_path / "agent.log")
        assert wait_until(lambda: watch.version >= start + 3, 180), \
            (watch.version, (tmp_path / "agent.log").read_text()[-2000:], tier.logs(), cluster.auth_log.read_text())
        audit = tier.audit.read_text()
        assert OWN in audit and VICTIM not in audit and EVIL not in audit, audit[-2000:]
        # the real agent's ack reached the tap (live: docs/architecture.md, "Acks on the tier"); another device may not subscribe to it
        assert wait_until(lambda: any(t == TOPICS.ack(OWN) for t, _ in tap.messages), 30)
        for topic in (TOPICS.ack(OWN), TOPICS.ack(VICTIM), f"fedmq/{FLEET}/ack/+", f"fedmq/{FLEET}/#"):
            assert evil.subscribe(topic)[0].is_failure, topic
        assert evil.subscribe(TOPICS.secagg("inbox", VICTIM))[0].is_failure
        for topic in (TOPICS.model, TOPICS.secagg("inbox", EVIL), f"fedmq/{FLEET}/secagg/key/+", TOPICS.secagg_cohort):
            assert not evil.subscribe(topic)[0].is_failure, topic  # what a device reads is still granted
        assert wait_until(lambda: any(t == TOPICS.model for t, _ in evil.messages), 30)
        assert not [t for t, _ in evil.messages if "/ack/" in t], evil.messages
        assert evil.connected.is_set()  # refused messages and subscriptions, not a cut connection
    finally:
        for proc in [agent] if agent is not None else []:
            proc.kill()
            proc.wait(10)
        for d in (evil, tap):
            if d is not None:
                d.close()
        watch.close()
        tier.stop()


def test_wrong_or_missing_credentials_are_refused_and_the_store_is_read_live(tmp_path, cluster, store):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "--broker", cluster.mqtt_urls[0], "--fleet", FLEET,
                           "--id", OWN, "--username", OWN, "--password-file", str(wrong),
                           "--data", str(regression_shard(tmp_path / "agent.csv")), "--connect-timeout", "20"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and errors == [
        f"fedmq-agent: error: broker at {cluster.mqtt_urls[0]} refused the connection: Not authorized"], proc.stderr
    assert "Traceback" not in proc.stderr
    refusals = [
        _as_device(cluster, store, OWN, password=""),                    # no password
        Device(cluster, "anonymous-1", None, None),                     # no credentials at all
        _as_device(cluster, store, EVIL, client_id=VICTIM),             # its own password, another device's session
        Device(cluster, "x-ghost", "ghost", "whatever"),               # not in the store
    ]
    try:
        for d in refusals:
            rc = d.wait_answer(AUTH_TIMEOUT_S + 10)
            assert rc is not None and rc.is_failure and str(rc) == "Not authorized", (d.client._client_id, rc)
        log = cluster.auth_log.read_text()
        assert f"user {OWN!r}: unknown device or wrong password" in log and "gave no username" in log
        assert f"user {EVIL!r} connected with client id {VICTIM!r}" in log and "user 'ghost'" in log
        # the store changes while everything runs: a new device gets in, a removed one no longer does
        add_devices(store[0], store[1], FLEET, ["dev-new"])
        remove_devices(store[0], [VICTIM])
        new, gone = _as_device(cluster, store, "dev-new"), _as_device(cluster, store, VICTIM)
        assert new.wait_answer(30) is not None and new.connected.is_set(), new.connack
        assert str(gone.wait_answer(AUTH_TIMEOUT_S + 10)) == "Not authorized"
        refusals += [new, gone]
    finally:
        for d in refusals:
            d.close()


def test_the_auth_service_down_lets_no_device_in_and_back_up_it_serves_again(cluster, store):
    before = _as_device(cluster, store, OWN)
    assert before.wait_answer(30) is not None and before.connected.is_set(), before.connack
    before.close()
    assert cluster.auth_ready.exists()  # the --ready-file a compose healthcheck tests: there while it serves
    cluster.stop_auth()
    assert not cluster.auth_ready.exists()  # and gone once it stops
    cluster.start_auth()
    cluster.stop_auth(kill=True)  # kill -9
    down = [_as_device(cluster, store, OWN), _as_device(cluster, store, EVIL)]
    tier_user = Device(cluster, "tier-while-down", TIER_USER, cluster.password)
    try:
        t0 = time.monotonic()
        for d in down:
            rc = d.wait_answer(AUTH_TIMEOUT_S + 10)
            assert rc is not None and rc.is_failure, rc  # refused, not let in
        assert time.monotonic() - t0 < AUTH_TIMEOUT_S + 10
        assert not any(d.connected.is_set() for d in down)
        assert tier_user.wait_answer(30) is not None and tier_user.connected.is_set()  # tier processes still connect
        cluster.start_auth()
        back = _as_device(cluster, store, OWN)
        down.append(back)
        assert back.wait_answer(30) is not None and back.connected.is_set(), back.connack
    finally:
        for d in [*down, tier_user]:
            d.close()



def test_every_node_of_three_asks_the_one_service_and_it_survives_its_nodes_death(tmp_path, store):
    """The callout request goes over the cluster's routes to the auth service wherever it is connected; kill -9
    of that node: the service reconnects to another and devices get in through the surviving nodes."""
    with NatsCluster(tmp_path / "nats3", nodes_count=3, partitions=PARTITIONS, devices=store[0]) as c:
        served = c.auth_log.read_text().split("serving device authorization", 1)[1].split("\n", 1)[0]
        home = next(i for i, n in enumerate(c.nodes) if served.endswith(f":{n.client_port}"))
        for i, agent in enumerate((OWN, VICTIM, EVIL)):  # one device through each node: two are not the service's
            d = _as_device(c, store, agent, node=i)
            try:
                assert d.wait_answer(30) is not None and d.connected.is_set(), (i, d.connack)
            finally:
                d.close()
        c.kill(home)
        assert wait_until(lambda: "NATS connection back" in c.auth_log.read_text(), 30), c.auth_log.read_text()
        for i in (i for i in range(3) if i != home):
            d = _as_device(c, store, OWN, node=i)
            try:
                assert d.wait_answer(AUTH_TIMEOUT_S + 30) is not None and d.connected.is_set(), (i, d.connack)
            finally:
                d.close()



def test_with_a_session_limit_a_removed_device_is_shut_out_within_it(tmp_path, store):
    """tier.auth --session-s: the user JWT expires, the node closes the connection, the device logs in again; one
    removed from the store meanwhile is refused, one still there gets back in."""
    session = 3.0
    with NatsCluster(tmp_path / "nats", nodes_count=1, partitions=PARTITIONS, devices=store[0],
                     auth_session_s=session) as c:
        gone, kept = _as_device(c, store, VICTIM), _as_device(c, store, OWN)
        try:
            for d in (gone, kept):
                assert d.wait_answer(30) is not None and d.connected.is_set(), d.connack
            remove_devices(store[0], [VICTIM])
            t0 = time.monotonic()
            assert wait_until(lambda: not gone.connected.is_set() and not kept.connected.is_set(), session + 10)
            assert time.monotonic() - t0 <= session + 10
            again_gone, again_kept = _as_device(c, store, VICTIM), _as_device(c, store, OWN)
            gone.close(), kept.close()
            gone, kept = again_gone, again_kept
            assert str(gone.wait_answer(AUTH_TIMEOUT_S + 10)) == "Not authorized"
            assert kept.wait_answer(30) is not None and kept.connected.is_set(), kept.connack
        finally:
            gone.close()
            kept.close()


def test_the_service_refuses_to_start_against_nodes_that_map_another_partition_count(cluster, store):
    """With another --partitions (or --topic-prefix) than the nodes' mapping, every device's updates would be refused
    by the node without a word: the service probes the mapping as the auth user and exits with one line."""
    base = [sys.executable, "-m", "tier.auth", "--nats", ",".join(cluster.nats_urls), "--devices", str(store[0]),
            "--issuer-seed-file", str(cluster.issuer_seed), "--xkey-seed-file", str(cluster.xkey_seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), AUTH_PASSWORD_ENV: cluster.auth_password}
    for extra, part in ((["--partitions", "5"], "--partitions 5 is not the nodes' mapping"),
                        (["--topic-prefix", "other"], "check --topic-prefix other")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("tier.auth: ") and part in proc.stderr, \
            proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    env.pop(AUTH_PASSWORD_ENV)  # the tier password is not the auth user's: one line, exit 2
    proc = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**env, "FEDMQ_TIER_PASSWORD": cluster.password})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"tier.auth: {AUTH_PASSWORD_ENV} is not set: the service connects as the auth user, the one user the nodes let "
        "read the devices' logins"), proc.stderr


def _holds(payload: bytes, secret: str) -> bool:
    """`secret` is in `payload`, in the clear or inside a JWT's base64 parts (how a node's request carries it)."""
    parts = payload.split(b".")
    try:
        decoded = b"".join(base64.urlsafe_b64decode(x + b"=" * (-len(x) % 4)) for x in parts[:2]) if len(parts) == 3 else b""
    except ValueError:
        decoded = b""
    return secret.encode() in payload or secret.encode() in decoded


async def _nats_tap(cluster, user: str, password: str, subjects: list[str], login) -> tuple:
    """Subscribe as `user` over NATS to `subjects`, run `login()` (a device logging in) and flush: (messages as
    (subscription, subject, payload, headers), errors), or (None, [the connect error]). The node sent its request
    before the device's CONNACK, so a copy for this connection is queued before the flush's PONG."""
    import nats

    got, errors = [], []

    async def error(exc) -> None:
        errors.append(str(exc))

    try:
        nc = await nats.connect(cluster.nats_urls, user=user, password=password, error_cb=error,
                                allow_reconnect=False, connect_timeout=AUTH_TIMEOUT_S + 5)
    except Exception as exc:  # refused at connect
        return None, [f"{type(exc).__name__}: {exc}"]
    for subject in subjects:
        async def on(msg, subject=subject) -> None:
            got.append((subject, msg.subject, msg.data, msg.headers or {}))

        await nc.subscribe(subject, cb=on)
    await nc.flush(5)
    await asyncio.get_running_loop().run_in_executor(None, login)
    await nc.flush(5)
    await nc.close()
    return got, errors


def _login(cluster, store) -> tuple[list[bool], object]:
    """(what each call got, a call): one login of OWN, True if the node let it in."""
    logins = []

    def login() -> None:
        device = _as_device(cluster, store, OWN)
        logins.append(device.wait_answer(30) is not None and device.connected.is_set())
        device.close()

    return logins, login


def test_the_nodes_authorization_requests_reach_the_auth_user_alone(cluster, store):
    password = _password(store, OWN)
    logins, login = _login(cluster, store)

    subjects = [CALLOUT_SUBJECT, "$SYS.>", ">"]
    # control: the auth user (the service's) gets the request, so the check below can fail
    got, _ = asyncio.run(_nats_tap(cluster, AUTH_USER, cluster.auth_password, [CALLOUT_SUBJECT], login))
    assert [t for _, t, _, _ in got] == [CALLOUT_SUBJECT], got
    got, errors = asyncio.run(_nats_tap(cluster, TIER_USER, cluster.password, subjects, login))
    assert got is not None and not any(_holds(data, password) for _, _, data, _ in got), [g[:2] for g in got]
    assert not [t for _, t, _, _ in got if t.startswith("$SYS.")], [g[:2] for g in got]
    assert sum("permissions violation" in e for e in errors) == 2, errors  # $SYS.REQ.USER.AUTH and $SYS.>
    got, errors = asyncio.run(_nats_tap(cluster, ROUTE_USER, cluster.password, subjects, login))
    assert got is None and "Authorization" in errors[0], errors  # the route user is for the cluster port only
    taps = [Device(cluster, "tier-tap", TIER_USER, cluster.password), _as_device(cluster, store, EVIL)]
    try:
        for tap in taps:
            assert tap.wait_answer(30) is not None and tap.connected.is_set(), tap.connack
            refused = [tap.subscribe(t)[0].is_failure for t in ("$SYS/REQ/USER/AUTH", "$SYS/#")]
            assert refused == [True, True], refused
        assert not taps[0].subscribe("#")[0].is_failure  # the tier user reads the fleet's topics, not $SYS
        marker = TOPICS.ack(EVIL)
        assert not taps[1].subscribe(marker)[0].is_failure
        login()
        # a message after the login, to both taps: what the login's request would have brought is there before it
        taps[0].client.publish(marker, b"after the login", qos=1).wait_for_publish(10)
        assert wait_until(lambda: all((marker, b"after the login") in tap.messages for tap in taps), 30)
        for tap in taps:
            assert not any(_holds(payload, password) for _, payload in tap.messages), [t for t, _ in tap.messages]
            assert not [t for t, _ in tap.messages if t.startswith("$SYS")]
    finally:
        for tap in taps:
            tap.close()
    assert logins == [True] * 3, logins


def test_a_reader_of_the_requests_without_the_services_xkey_seed_sees_ciphertext_only(cluster, store):
    """The nodes seal each request to the service's xkey (`auth_callout.xkey`): a subscriber with the auth user's
    rights, the auth password leaked, reads no byte of the device's password, where the same request opened with
    the service's seed (and the node's xkey from its header) holds it. Seen red with the xkey left out of the nodes'
    config: the password in the clear in the request's JWT."""
    password = _password(store, OWN)
    logins, login = _login(cluster, store)

    got, errors = asyncio.run(_nats_tap(cluster, AUTH_USER, cluster.auth_password, [CALLOUT_SUBJECT], login))
    assert len(got) == 1 and not errors, (got, errors)
    _, _, data, headers = got[0]
    assert not _holds(data, password) and data.startswith(VERSION) and b"eyJ" not in data, data[:64]
    assert logins == [True], logins
    assert password.encode() not in str(headers).encode(), headers
    opened = XKey.from_seed(cluster.xkey_seed.read_text().strip()).open(data, headers[SERVER_XKEY_HEADER])
    assert _holds(opened, password)  # the control: this check can fail


def test_a_garbage_or_wrongly_sealed_request_is_ignored_with_one_line_and_the_service_keeps_serving(
        tmp_path, store, monkeypatch):
    """The real service with its xkey on a node where the auth user may publish on the callout subject (no user of
    the callout config may: the node writes the requests itself): requests that are not sealed to the service's
    xkey from the node xkey in their header, or not a server's JWT inside, each cost one warning line in its log
    and get no answer, and a good request sealed from a node xkey right after is answered, sealed to that xkey.
    Seen red with the service's callback given the payload without its headers (every request "in the clear",
    the good one unanswered)."""
    from test_tier_device_store import _request  # a server's authorization request JWT, signed

    from tier import cluster as cluster_module
    from tier.auth import make_issuer, make_xkey

    real = cluster_module.authorization_users
    c = NatsCluster(tmp_path / "nats", nodes_count=1, partitions=PARTITIONS)
    monkeypatch.setattr(cluster_module, "authorization_users",
                        lambda *a: real(*a) + [{"user": AUTH_USER, "password": c.auth_password}])
    with c:
        c.devices, c.issuer_seed = store[0], tmp_path / "auth" / "issuer.seed"
        make_issuer(c.issuer_seed)
        service = make_xkey(c.xkey_seed).public
        c.start_auth()
        node, other = XKey.create(), XKey.create()
        request = _request(OWN, _password(store, OWN), OWN, server_xkey=node.public)[0]
        bad = [(b"\x00 not sealed", node.public), (VERSION + bytes(80), node.public),
               (node.seal(request, other.public), node.public), (other.seal(request, service), node.public),
               (node.seal(b"eyJ.not.a-jwt", service), node.public), (request, None)]
        replies = asyncio.run(_requests(c, [*bad, (node.seal(request, service), node.public)]))
        text = c.auth_log.read_text()
        lines = [line for line in text.splitlines() if "ignored an authorization request" in line]
        assert len(lines) == len(bad) and "Traceback" not in text and c.auth_proc.poll() is None, text[-3000:]
        assert len(replies) == 1, replies
        response = decode_jwt(node.open(replies[0], service).decode(), PREFIX_ACCOUNT)
        assert decode_jwt(response["nats"]["jwt"], PREFIX_ACCOUNT)["name"] == OWN, response


async def _requests(cluster, requests: list[tuple[bytes, str | None]]) -> list[bytes]:
    """Publish each (payload, node xkey header) on the callout subject as the auth user with one reply subject, the
    last a good one: the replies that came once the last one's did (bounded). The service reads its requests in
    order, so one it answered would have been answered before the last."""
    import nats

    nc = await nats.connect(cluster.nats_urls, user=AUTH_USER, password=cluster.auth_password, allow_reconnect=False)
    replies, last = [], asyncio.Event()
    try:
        inbox = nc.new_inbox()

        async def on_reply(msg) -> None:
            replies.append(msg.data)
            last.set()

        await nc.subscribe(inbox, cb=on_reply)
        for payload, xkey in requests:
            headers = {SERVER_XKEY_HEADER: xkey} if xkey else None
            await nc.publish(CALLOUT_SUBJECT, payload, reply=inbox, headers=headers)
        await nc.flush(5)
        await asyncio.wait_for(last.wait(), 30)
        await nc.flush(5)
    finally:
        await nc.close()
    return replies
