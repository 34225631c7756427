"""The tier's device authorization service: NATS auth callout for the MQTT listeners' devices.

With a device store (tier/devices.py), the nodes' config names this service's account key as the
`auth_callout` issuer (tier/cluster.py). Every MQTT client but the `tier` user is then sent here: the node
publishes an authorization request (a JWT it signs) on `$SYS.REQ.USER.AUTH`, this service checks the
client's username (the agent id) and password against the store and answers with a user JWT it signs,
whose permissions are that agent's own subjects only: publish its update, update chunks and
secure-aggregation messages (on their mapped subjects: that is what the node checks) and its status,
statistics, schema and key; subscribe to the fleet's model, status, cohort and keys, its own ack and its
own inbox. Anything else, or no answer (this service down), and the node refuses the connection:
fail closed. Several instances may run (one queue group); each connect costs one PBKDF2 check. At start it
checks that the nodes' mapping sends agents to the partitions its --partitions computes. It connects as the auth
user (FEDMQ_TIER_AUTH_PASSWORD), the only one the nodes let read their requests, which carry each device's password.
With --xkey-seed-file (the nodes' `auth_callout.xkey` its public key, tier/cluster.py `callout_authorization`) the
requests come sealed to this service's xkey and its answers go sealed to the node's (tier/xkey.py): whoever else
reads the subject, the auth password leaked say, sees ciphertext; a request that does not open is ignored.

    python -m tier.auth --nats nats://n1:4222,... --devices FILE --issuer-seed-file FILE --xkey-seed-file FILE
    python -m tier.auth --make-issuer FILE     (new account and xkey seeds; prints the public keys for the nodes)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from protocol.config import layered_parser, parse_layered
from protocol.topics import parse_tier, tier_subject
from tier.cluster import (AUTH_PASSWORD_ENV, AUTH_USER, CALLOUT_SUBJECT, DEFAULT_PARTITIONS, DEVICES_ENV, ISSUER_ENV,
                          PROBE_FLEET, XKEY_ENV, device_subjects, partition_of, xkey_seed_beside)
from tier.cluster import subject_token as token
from tier.devices import Device, Store
from tier.nkey import PREFIX_SERVER, PREFIX_USER, KeyPair, decode_jwt, decode_public, encode_jwt
from tier.xkey import SERVER_XKEY_HEADER, XKey

log = logging.getLogger(__name__)

QUEUE = "fedmq-auth"
ACCOUNT = "$G"  # devices land in the global account: the one with the partition mapping and the tier user
SEED_ENV = "FEDMQ_TIER_AUTH_SEED_FILE"
XKEY_SEED_ENV = "FEDMQ_TIER_AUTH_XKEY_SEED_FILE"
SESSION_ENV = "FEDMQ_TIER_AUTH_SESSION_S"
READY = "serving device authorization"  # logged once subscribed (--ready-file is what launchers wait for)
SECAGG_MAPPED = ("share", "masked", "reveal")


def device_permissions(device: Device, *, prefix: str = "fedmq", partitions: int = DEFAULT_PARTITIONS) -> dict:
    """The `pub` and `sub` allow-lists of one agent: its own subjects in its own fleet. An update is checked
    by the node on its subject after the account mapping (tests/test_tier_auth.py measured it), so the
    update, chunk and secure-aggregation subjects name the agent's own partition."""
    publish, subscribe = device_subjects(f"{prefix}.{token(device.fleet)}", token(device.agent),
                                         str(partition_of(device.agent, partitions)), SECAGG_MAPPED)
    return {"pub": {"allow": publish}, "sub": {"allow": subscribe}}


def _dict(value) -> dict:
    """`value` if it is a JSON object, else empty: a request's parts are read without trusting their shape."""
    return value if isinstance(value, dict) else {}


class Refused(Exception):
    """Why a connect is refused (said in the node's log, not to the client)."""


def check_request(request: dict, store: Store) -> Device:
    """The device an authorization request's client is, or Refused: an MQTT client whose username is an agent
    of the store, whose password matches, and whose client id is its username (the agent's own, as mosquitto's
    use_username_as_clientid makes it: another id could take over that client's session)."""
    info, opts = _dict(request.get("client_info")), _dict(request.get("connect_opts"))
    user, password = str(opts.get("user") or ""), str(opts.get("pass") or "")
    if str(info.get("type", "")).lower() != "mqtt":
        raise Refused(f"not an MQTT client ({info.get('type') or info.get('kind')!r}, user {user!r})")
    if not user:
        raise Refused(f"MQTT client {info.get('mqtt_id')!r} gave no username")
    device = store.check(user, password)
    if device is None:
        raise Refused(f"user {user!r}: unknown device or wrong password")
    if info.get("mqtt_id") != device.agent:
        raise Refused(f"user {user!r} connected with client id {info.get('mqtt_id')!r}: a device's is its agent id")
    return device


def respond(request: dict, issuer: KeyPair, *, device: Device | None, error: str = "", prefix: str = "fedmq",
            partitions: int = DEFAULT_PARTITIONS, session_s: float = 0) -> bytes:
    """The authorization response JWT for `request`: a user JWT for `device` (MQTT connections only; with
    `session_s`, expiring that many seconds on: the node then closes the connection and the device logs in again,
    so a device removed from the store is out within it), or `error`."""
    user_nkey = str(request.get("user_nkey", ""))
    server_id = str(_dict(request.get("server_id")).get("id", ""))
    decode_public(user_nkey, PREFIX_USER)  # ValueError: a request no node made
    decode_public(server_id, PREFIX_SERVER)
    body: dict = {"type": "authorization_response", "version": 2}
    if device is not None:
        user = {**device_permissions(device, prefix=prefix, partitions=partitions),
                "subs": -1, "data": -1, "payload": -1, "allowed_connection_types": ["MQTT"],
                "type": "user", "version": 2}
        claims = {"sub": user_nkey, "aud": ACCOUNT, "name": device.agent, "nats": user}
        if session_s > 0:
            claims["exp"] = int(time.time() + session_s)
        body["jwt"] = encode_jwt(claims, issuer)
    else:
        body["error"] = error or "not authorized"
    return encode_jwt({"sub": user_nkey, "aud": server_id, "nats": body}, issuer).encode()


def _header(headers: dict | None, name: str) -> str:
    """A message header's value, its name in any case ('' if absent)."""
    return next((str(v) for k, v in (headers or {}).items() if str(k).lower() == name.lower()), "")


class Service:
    """Answers the nodes' authorization requests from the store, signed with `issuer`; with `xkey`, requests
    sealed to it only, each answer sealed to its node's xkey."""

    def __init__(self, store: Store, issuer: KeyPair, *, prefix: str, partitions: int, session_s: float = 0,
                 xkey: XKey | None = None) -> None:
        self.store, self.issuer, self.prefix, self.partitions = store, issuer, prefix, partitions
        self.session_s, self.xkey = session_s, xkey
        self.accepted = self.refused = 0

    def _opened(self, data: bytes, server_xkey: str) -> bytes:
        """The request JWT in `data`: opened with this service's xkey from the node's `server_xkey` if it has one,
        as it is otherwise (ValueError: not what the nodes' config and this service's agree on)."""
        if self.xkey is None:
            if server_xkey:
                raise ValueError("it is encrypted (the nodes' auth_callout has an xkey): give this service its seed, "
                                 "--xkey-seed-file")
            return data
        if not server_xkey:
            raise ValueError(f"it is in the clear, without {SERVER_XKEY_HEADER}: the nodes' auth_callout has no "
                             "xkey, this service has one")
        return self.xkey.open(data, server_xkey)

    def answer(self, data: bytes, headers: dict | None = None) -> bytes | None:
        """The response to one request's payload and headers; None for one that is no node's request, or not
        sealed to this service's xkey (no answer: the node refuses at its timeout)."""
        server_xkey = _header(headers, SERVER_XKEY_HEADER)
        try:
            request = _dict(decode_jwt(self._opened(data, server_xkey).decode(errors="replace"),
                                       PREFIX_SERVER).get("nats"))
            if server_xkey and _dict(request.get("server_id")).get("xkey") != server_xkey:
                raise ValueError(f"its {SERVER_XKEY_HEADER} is not the xkey its server signed")
        except ValueError as exc:
            log.warning("ignored an authorization request: %s", exc)
            return None
        try:
            self.store.refresh()
            device, error = check_request(request, self.store), ""
        except (Refused, OSError) as exc:
            device, error = None, str(exc)
        try:
            out = respond(request, self.issuer, device=device, error=error, prefix=self.prefix,
                          partitions=self.partitions, session_s=self.session_s)
        except ValueError as exc:
            log.warning("ignored an authorization request without a user or server key: %s", exc)
            return None
        if device is None:
            self.refused += 1
            log.warning("refused: %s", error)
        else:
            self.accepted += 1
            log.debug("accepted %s (fleet %s)", device.agent, device.fleet)
        return out if self.xkey is None else self.xkey.seal(out, server_xkey)


PROBE_AGENTS = 8


class Misconfigured(Exception):
    """The nodes map agents to partitions otherwise than this service's --partitions and --topic-prefix."""


async def check_mapping(nc, prefix: str, partitions: int, timeout: float = 5.0) -> None:
    """Publish an update subject for a few probe agents (as the auth user: PROBE_FLEET's subjects only) and read where the nodes' account mapping
    sends them: Misconfigured unless each lands in partition_of(agent, partitions). With another N every device's
    own updates would be refused by the node without a word (its allow-list names the wrong partition)."""
    got: dict[str, int] = {}
    done = asyncio.Event()
    fleet = f"{prefix}.{PROBE_FLEET}"

    async def on_mapped(msg) -> None:
        parsed = parse_tier(msg.subject[len(fleet) + 1:].split("."))
        if parsed is not None:
            got[parsed[2][0]] = parsed[1]
        if len(got) == PROBE_AGENTS:
            done.set()

    sub = await nc.subscribe(tier_subject(fleet, "update", fill="*"), cb=on_mapped)
    await nc.flush(timeout)
    for i in range(PROBE_AGENTS):
        await nc.publish(f"{fleet}.update.probe-{i}", b"")
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        raise Misconfigured(f"the nodes mapped no {prefix}.<fleet>.update.<agent> subject to .upd.<P>.<agent> within "
                            f"{timeout:g} s: check --topic-prefix {prefix} against the nodes' mappings") from None
    finally:
        await sub.unsubscribe()
    wrong = {a: p for a, p in got.items() if p != partition_of(a, partitions)}
    if wrong:
        agent, p = next(iter(wrong.items()))
        raise Misconfigured(f"--partitions {partitions} is not the nodes' mapping: they send {agent} to partition {p}, "
                            f"{partitions} partitions would send it to {partition_of(agent, partitions)}")


def mark_ready(path: Path | None, ready: bool) -> None:
    """Create (serving) or remove (not serving) the --ready-file a container healthcheck tests."""
    if path is None:
        return
    if ready:
        path.write_text(f"{os.getpid()}\n")
    else:
        path.unlink(missing_ok=True)


async def serve(servers: list[str], service: Service, stop: asyncio.Event, name: str,
                ready_file: Path | None = None) -> None:
    """Connect, check the nodes' mapping (Misconfigured), answer requests until `stop`; `ready_file` exists
    while the callout subscription is in place and the connection up."""
    import nats

    async def on_request(msg) -> None:
        out = service.answer(msg.data, msg.headers)
        if out is not None and msg.reply:
            await msg.respond(out)

    closing = []  # set when this service closes its connection itself: no warning then

    async def disconnected() -> None:
        mark_ready(ready_file, False)
        if not closing:
            log.warning("lost the NATS connection: devices cannot connect until it is back")

    async def reconnected() -> None:
        log.info("NATS connection back")
        mark_ready(ready_file, True)

    async def error(exc) -> None:
        log.debug("nats: %s", exc)

    nc = await nats.connect(servers=servers, name=name, user=AUTH_USER, password=os.environ.get(AUTH_PASSWORD_ENV),
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=5,
                            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
    try:
        await check_mapping(nc, service.prefix, service.partitions)
    except Misconfigured:
        closing.append(1)
        await nc.close()
        raise
    await nc.subscribe(CALLOUT_SUBJECT, queue=QUEUE, cb=on_request)
    await nc.flush(5)
    log.info("%s for %d device(s) of %s on %s", READY, len(service.store.devices), service.store.path,
             nc.connected_url.netloc if nc.connected_url else "?")
    mark_ready(ready_file, True)
    try:
        await stop.wait()
    finally:
        mark_ready(ready_file, False)
        closing.append(1)
        await nc.drain()


def _kept_key(path: Path, load, create):
    """The key whose seed is in `path` (mode 600): `load(seed)`, or `create()` written there first if missing."""
    if path.exists():
        return load(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = create()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pair.seed + "\n")
    return pair


def make_issuer(path: Path) -> KeyPair:
    """The account key in `path` (an nkey seed, mode 600), made there first if missing."""
    return _kept_key(path, KeyPair.from_seed, KeyPair.create)


def make_xkey(path: Path) -> XKey:
    """The xkey in `path` (an xkey seed, mode 600), made there first if missing."""
    return _kept_key(path, XKey.from_seed, XKey.create)


def _checked_key(key, path: Path, env: str):
    """`key` (read from `path`) if the nodes' public key in `env` is unset or its own, else ValueError: every
    answer would be refused by the nodes, or every request fail to open."""
    expected = os.environ.get(env)
    if expected and expected != key.public:
        raise ValueError(f"{path} is the key of {key.public}, but the nodes' {env} is {expected}")
    return key


def build_parser() -> argparse.ArgumentParser:
    parser = layered_parser(
        "python -m tier.auth",
        "The scale-out tier's device authorization (NATS auth callout): checks each MQTT device's "
                    "username (its agent id) and password against the device store and gives it the rights to "
                    "its own topics only. Connects as the auth user (FEDMQ_TIER_AUTH_PASSWORD). Without it running, "
                    "no device can connect to nodes configured with the store (fail closed).")
    parser.add_argument("--nats", help="comma-separated nats:// URLs of the cluster's nodes")
    parser.add_argument("--devices", type=Path, default=os.environ.get(DEVICES_ENV),
                        help=f"the device store (python -m tier.devices add; env {DEVICES_ENV}); re-read when it changes")
    parser.add_argument("--issuer-seed-file", type=Path, default=os.environ.get(SEED_ENV),
                        help=f"the account nkey seed that signs the answers; the nodes' auth_callout issuer is its "
                             f"public key (env {SEED_ENV})")
    parser.add_argument("--xkey-seed-file", type=Path, default=os.environ.get(XKEY_SEED_ENV),
                        help="the xkey (curve25519) seed the nodes seal their requests to, each holding a device's "
                             "password; the nodes' auth_callout xkey is its public key, and this service seals its "
                             f"answers to the node's (env {XKEY_SEED_ENV}; required unless --no-xkey)")
    parser.add_argument("--no-xkey", action="store_true",
                        help="take the nodes' requests in the clear, for nodes whose auth_callout has no xkey: every "
                             "device's password is then readable by whoever can read the callout subject (default: "
                             "off, --xkey-seed-file required)")
    parser.add_argument("--make-issuer", type=Path, metavar="FILE",
                        help="write a new issuer seed to FILE and a new xkey seed to xkey.seed beside it (mode 600; "
                             f"each kept if present), print their public keys as {ISSUER_ENV}=... and {XKEY_ENV}=... "
                             "(what the nodes' configs read) and exit")
    parser.add_argument("--topic-prefix", default="fedmq", help="first topic level (default: fedmq)")
    parser.add_argument("--session-s", type=float, default=float(os.environ.get(SESSION_ENV, 0)), metavar="S",
                        help="a device's login lasts S seconds: then the node closes its connection and the device "
                             "logs in again (its MQTT session stays), so removing it from the store shuts it out within "
                             f"S; costs every device one connect per S (env {SESSION_ENV}; default 0: until it disconnects)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help=f"N of the cluster's partition(N, agent) mapping (default {DEFAULT_PARTITIONS})")
    parser.add_argument("--id", default=f"auth-{os.getpid()}", help="this instance's name on its NATS connection")
    parser.add_argument("--ready-file", type=Path, metavar="FILE",
                        help="exists while this instance serves (subscribed, connected): a container healthcheck "
                             "tests it, so `docker compose up --wait` returns only once devices can log in "
                             "(default: none)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level, on stderr (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_layered(parser, argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.make_issuer:
            print(f"{ISSUER_ENV}={make_issuer(args.make_issuer).public}")
            print(f"{XKEY_ENV}={make_xkey(xkey_seed_beside(args.make_issuer)).public}")
            return 0
        if not args.nats or not args.devices or not args.issuer_seed_file:
            parser.error("--nats, --devices and --issuer-seed-file are required")
        if args.xkey_seed_file is None and not args.no_xkey:
            parser.error("--xkey-seed-file is required: the nodes seal each login, a device's password inside, to it "
                         "(--no-xkey: take the logins in the clear)")
        issuer = _checked_key(KeyPair.from_seed(args.issuer_seed_file.read_text().strip()), args.issuer_seed_file,
                              ISSUER_ENV)
        xkey = None if args.xkey_seed_file is None else _checked_key(
            XKey.from_seed(args.xkey_seed_file.read_text().strip()), args.xkey_seed_file, XKEY_ENV)
        store = Store(args.devices)
        if store.error:
            raise ValueError(store.error)
        if args.session_s < 0:
            raise ValueError(f"--session-s must be 0 (no limit) or more, got {args.session_s:g}")
        if not 1 <= args.partitions <= 1024:
            raise ValueError(f"--partitions must be in 1..1024, got {args.partitions}")
    except (ValueError, OSError) as exc:
        print(f"tier.auth: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get(AUTH_PASSWORD_ENV):
        print(f"tier.auth: {AUTH_PASSWORD_ENV} is not set: the service connects as the auth user, the one user the "
              "nodes let read the devices' logins", file=sys.stderr)
        return 2
    service = Service(store, issuer, prefix=args.topic_prefix, partitions=args.partitions, session_s=args.session_s,
                      xkey=xkey)
    mark_ready(args.ready_file, False)  # one left by a kill -9 (a restarted container keeps its /tmp)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.nats.split(","), service, stop, f"fedmq-auth-{args.id}", args.ready_file)

    try:
        asyncio.run(run())
    except Misconfigured as exc:
        print(f"tier.auth: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"tier.auth: cannot reach NATS at {args.nats}: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
